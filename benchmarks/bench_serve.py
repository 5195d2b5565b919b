"""Load test for `gptlab serve`: concurrent streaming clients on loopback.

    python benchmarks/bench_serve.py [--checkpoint RUN] [--clients 1 4 16 64]

The server runs in its own process (so the clients' Python does not share its GIL): the
given run, or by default a randomly initialised model of the `cpu` preset (decode speed
does not depend on the weights). For each client count, that many clients each send
--requests streaming completions (max_tokens --max-tokens) back to back, bounded by
--max-time seconds per sweep point. Printed per point: aggregate completion tokens per
second, time to first token (p50, p95) and failed requests.

Targets (issue 14): 16 clients >= 4x the 1-client tokens/s; no failure at 64 clients.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def serve_forever(args: argparse.Namespace) -> None:
    """The server process: load or build the model, then serve until killed."""
    import torch

    from gptlab.data.tokenizer import GPT2Tokenizer
    from gptlab.infer.serve import serve
    from gptlab.interop.runs import Run, open_run
    from gptlab.model.gpt import GPTModel
    from gptlab.recipes.presets import preset

    if args.checkpoint:
        run = open_run(args.checkpoint, args.device)
    else:
        cfg = preset("cpu")
        torch.manual_seed(0)
        model = GPTModel(cfg.model).eval()
        run = Run(model, GPT2Tokenizer(), cfg, torch.device("cpu"), None)
    serve(
        run, port=args.port, max_batch=args.max_batch, on_ready=lambda url: print(url, flush=True)
    )


def one_request(host: str, port: int, body: dict) -> tuple[float, int]:
    """(seconds to the first text, completion tokens) of one streaming completion."""
    conn = http.client.HTTPConnection(host, port, timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}")
    first, tokens, buffer = None, None, b""
    while True:
        data = resp.read1(65536)
        if not data:
            break
        buffer += data
        *blocks, buffer = buffer.split(b"\n\n")
        for block in blocks:
            payload = block.removeprefix(b"data: ")
            if payload == b"[DONE]":
                conn.close()
                if first is None or tokens is None:
                    raise RuntimeError("stream ended without text or usage")
                return first, tokens
            chunk = json.loads(payload)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
    raise RuntimeError("stream cut short")


def sweep_point(host: str, port: int, clients: int, args: argparse.Namespace) -> dict:
    ttfts, tokens, failures = [], [0], [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + args.max_time

    def client(c: int) -> None:
        for r in range(args.requests):
            if time.perf_counter() > deadline:
                return
            body = {
                "prompt": f"Client {c} asks, for the {r}th time:",
                "max_tokens": args.max_tokens,
                "temperature": args.temperature,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            try:
                first, n = one_request(host, port, body)
            except Exception:  # counted, not raised: the figure is how many fail
                with lock:
                    failures[0] += 1
                continue
            with lock:
                ttfts.append(first)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) > 1 else ttfts * 19 or [float("nan")] * 19
    return {
        "clients": clients,
        "requests": len(ttfts),
        "tokens_per_s": tokens[0] / wall,
        "ttft_p50": q[9],
        "ttft_p95": q[18],
        "failed": failures[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help="a run to serve (default: a random `cpu`-preset model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-time", type=float, default=60.0, help="seconds per sweep point")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--server-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.server_only:
        serve_forever(args)
        return

    cmd = [sys.executable, str(Path(__file__).resolve()), "--server-only", "--port", str(args.port),
           "--max-batch", str(args.max_batch), "--device", args.device]  # fmt: skip
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        if not url:
            sys.exit("the server did not start")
        host, port = "127.0.0.1", args.port
        one_request(host, port, {"prompt": "warm up", "max_tokens": 4, "stream": True,
                                 "stream_options": {"include_usage": True}})  # fmt: skip
        print(f"server {url}, max_batch {args.max_batch}, max_tokens {args.max_tokens}")
        print(
            f"{'clients':>7} {'requests':>8} {'tokens/s':>9} {'ttft p50':>9} {'ttft p95':>9} {'failed':>6}"
        )
        rows = []
        for clients in args.clients:
            r = sweep_point(host, port, clients, args)
            rows.append(r)
            print(f"{r['clients']:>7} {r['requests']:>8} {r['tokens_per_s']:>9.1f} "
                  f"{r['ttft_p50']:>8.3f}s {r['ttft_p95']:>8.3f}s {r['failed']:>6}", flush=True)  # fmt: skip
        base = next((r for r in rows if r["clients"] == 1), None)
        for r in rows:
            if base and r["clients"] > 1 and base["tokens_per_s"] > 0:
                print(
                    f"{r['clients']} clients: {r['tokens_per_s'] / base['tokens_per_s']:.1f}x the 1-client tokens/s"
                )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
