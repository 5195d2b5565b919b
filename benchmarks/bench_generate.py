"""Generation speed: gptlab uncached, cached (and compiled) against transformers' generate.

The gpt2-small shape with random weights (nothing is downloaded): batch 1, a 16-token
prompt, 256 new tokens, greedy. transformers runs the same weights, converted with
gptlab.hf, and every mode must produce the same tokens as the uncached path (the table
says so). Each mode is warmed up once, then the modes are timed in turns, --repeats rounds,
and each keeps its best run.

    python benchmarks/bench_generate.py                    # CPU: uncached, cached, hf
    python benchmarks/bench_generate.py --device cuda --modes uncached,cached,compiled,hf,hf-static
    python benchmarks/bench_generate.py --json             # one JSON object per mode

Modes: uncached (recompute the window each step), cached (KV cache), compiled (static
cache + torch.compile; CUDA graphs on CUDA), hf (transformers' generate, its dynamic
cache), hf-static (transformers with cache_implementation="static", which it compiles on
CUDA).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from gptlab import hf
from gptlab.config import preset
from gptlab.generate import generate
from gptlab.model import GPTModel

MODES = ("uncached", "cached", "compiled", "hf", "hf-static")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(device: torch.device, dtype: torch.dtype, preset_name: str):
    """(ours, theirs): the same random GPT-2 weights in gptlab's model and transformers'."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = preset(preset_name).model
    cfg.drop_rate, cfg.qkv_bias, cfg.tie_weights, cfg.init = 0.0, True, True, "gpt2"
    torch.manual_seed(0)
    ours = GPTModel(cfg).eval()
    config = hf.config_to_hf(cfg)
    config.pop("architectures"), config.pop("model_type")
    theirs = GPT2LMHeadModel(GPT2Config(**config)).eval()
    missing, unexpected = theirs.load_state_dict(hf.state_dict_to_hf(ours), strict=False)
    assert not unexpected and missing in ([], ["lm_head.weight"]), (missing, unexpected)
    return ours.to(device, dtype), theirs.to(device, dtype)


def run_mode(mode: str, ours, theirs, idx: torch.Tensor, n: int) -> torch.Tensor:
    if mode in ("uncached", "cached", "compiled"):
        return generate(ours, idx, n, use_cache=mode != "uncached", compile=mode == "compiled")
    kw = {"cache_implementation": "static"} if mode == "hf-static" else {}
    with torch.inference_mode():
        return theirs.generate(
            idx,
            attention_mask=torch.ones_like(idx),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            **kw,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--modes", default="uncached,cached,hf", help=f"comma list of {MODES}")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per mode (best kept)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--json", action="store_true", help="print one JSON object per mode")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ours, theirs = build(device, dtype, args.preset)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50257, (args.batch, args.prompt_tokens), generator=gen).to(device)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    where = where or platform.machine()
    if not args.json:
        print(
            f"generation: {args.preset}, batch {args.batch}, {args.prompt_tokens}-token prompt, "
            f"{args.new_tokens} new tokens, greedy, {args.dtype} on {device} ({where}, "
            f"{torch.get_num_threads()} threads), torch {torch.__version__}"
        )
        print(
            f"{'mode':<10} {'tokens/s':>10} {'seconds':>9} {'x uncached':>11}  same tokens as uncached"
        )
    # Warm up every mode (compiling where it compiles), then time them in turns, so a
    # machine whose load changes (a shared CPU) slows all modes alike; the best run counts.
    best: dict[str, float] = {}
    outs: dict[str, torch.Tensor] = {}
    for mode in modes:
        try:
            run_mode(mode, ours, theirs, idx, min(8, args.new_tokens))
            if mode in ("compiled", "hf-static"):
                run_mode(mode, ours, theirs, idx, args.new_tokens)  # every shape it will use
            best[mode] = float("inf")
        except Exception as e:  # a mode this machine cannot run is reported, not fatal
            print(f"{mode:<10} failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr)
    for _ in range(args.repeats):
        for mode in best:
            sync(device)
            t0 = time.perf_counter()
            out = run_mode(mode, ours, theirs, idx, args.new_tokens)
            sync(device)
            seconds = time.perf_counter() - t0
            best[mode] = min(best[mode], seconds)
            outs[mode] = out.cpu()
            print(f"  ({mode}: {seconds:.2f} s)", file=sys.stderr, flush=True)
    results = []
    reference = outs.get("uncached", next(iter(outs.values()), None))
    for mode, seconds in best.items():
        out = outs[mode]
        same = out.shape == reference.shape and bool(torch.equal(out, reference))
        tps = args.batch * args.new_tokens / seconds
        r = {
            "mode": mode,
            "tokens_per_s": round(tps, 1),
            "seconds": round(seconds, 3),
            "same_tokens_as_uncached": same,
            "device": str(device),
            "device_name": where,
            "dtype": args.dtype,
            "batch": args.batch,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        results.append(r)
        base = best.get("uncached")
        speedup = f"{base / seconds:.1f}x" if base else "-"
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(
                f"{mode:<10} {tps:>10.1f} {seconds:>9.2f} {speedup:>11}  {'yes' if same else 'NO'}",
                flush=True,
            )
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
