"""Decoding beside another busy program: the thread policy (gptlab.runtime.threads) against
torch's default of one thread per core (issue 20's target: at least 10 tokens/s).

    python benchmarks/bench_busy_decode.py [--busy 1] [--new-tokens 200] [--json]

The walk-through's weights (torch.manual_seed(123); GPTModel(GPT_CONFIG_124M), 163M
parameters), the prompt "Every effort moves you", greedy with the KV cache, as `gptlab
generate` decodes: tokens/s counts the new tokens of one generate() call, prefill
included, after one warm-up call. `--busy N` programs spin (`while True: pass`) on the cores
for the whole benchmark; each row is a fresh process that sets its threads as `gptlab
generate` would: `policy` is `choose_threads(None)` (the default, `--threads 0`), `all`
one thread per core (what torch does by itself, and gptlab before the policy), `1` one.
Rows run one after another, never side by side. Run it on an otherwise quiet machine: the
spinners are the only other load it means to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import torch
from gptlab.config.schema import GPT_CONFIG_124M
from gptlab.infer.sampling import generate, text_to_token_ids
from gptlab.model.gpt import GPTModel
from gptlab.runtime.threads import choose_threads, usable_cores
from gptlab.data.tokenizer import GPT2Tokenizer

mode, new = sys.argv[1], int(sys.argv[2])
if mode == "policy":
    n, note = choose_threads(None)
else:
    n, note = (usable_cores() if mode == "all" else int(mode)), None
torch.set_num_threads(n)
torch.manual_seed(123)
model = GPTModel(GPT_CONFIG_124M).eval()
idx = text_to_token_ids("Every effort moves you", GPT2Tokenizer())
with torch.no_grad():
    generate(model, idx, 8, GPT_CONFIG_124M["context_length"])  # warm-up
    t0 = time.perf_counter()
    out = generate(model, idx, new, GPT_CONFIG_124M["context_length"])
    dt = time.perf_counter() - t0
print(json.dumps({"mode": mode, "threads": n, "note": note, "new_tokens": out.shape[1] - idx.shape[1],
                  "seconds": dt, "tokens_per_s": (out.shape[1] - idx.shape[1]) / dt}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", type=int, default=1, help="spinning programs beside the decode")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--modes", default="policy,all,1")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
    ]
    rows = []
    try:
        time.sleep(1.0)  # the spinners are running before the first row starts
        for mode in args.modes.split(","):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, mode, str(args.new_tokens)],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": ""},
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        for s in spinners:
            s.kill()
    cores = len(os.sched_getaffinity(0))
    print(f"{args.busy} busy program(s) on {cores} cores, {args.new_tokens} new tokens, greedy")
    print(f"{'threads':<22} {'n':>3} {'tokens/s':>9}")
    for r in rows:
        print(f"{r['mode']:<22} {r['threads']:>3} {r['tokens_per_s']:>9.1f}")
        if args.json:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
