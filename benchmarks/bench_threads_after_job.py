"""The thread default in the two cases it must tell apart (issue 32): a command started
seconds after a heavy job *finished*, and one started beside a program *running now*.

    python benchmarks/bench_threads_after_job.py [--job-seconds 40] [--json]

1. A two-thread job (torch matmuls on every core) runs `--job-seconds`, then ends.
   Within a second, /proc/loadavg is read nine times 25 ms apart (the readings the
   policy takes) and `gptlab train` starts: a tiny run of 2 steps, whose metrics start
   record says the threads it took. The 1-minute load average then still says ~1.9.
2. A program starts spinning (`while True: pass`), and one second later the same readings
   and the same `gptlab train`: the load average has hardly moved, one core is taken.

Prints the recorded lines (tests/test_threads.py replays such a sequence), the threads
each train took with its note, and the threads the 1-minute average would have given.
Run it on an otherwise quiet machine: its own job and spinner are the load it measures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = r"""
import sys, time, torch
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    a = torch.tanh(a @ a)
"""
SPIN = "while True: pass"


def _readings(n: int = 9, interval: float = 0.025) -> list[str]:
    lines = []
    for i in range(n):
        if i:
            time.sleep(interval)
        lines.append(Path("/proc/loadavg").read_text().strip())
    return lines


def _train(tmp: Path, name: str) -> dict:
    """A tiny `gptlab train` with the default thread policy; its start record and note."""
    text = tmp / "text.txt"
    if not text.exists():
        text.write_text("Every effort moves you forward, line by line.\n" * 400)
    out = tmp / name
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "gptlab", "train", "--data", str(text), "--preset", "tiny",
         "--out", str(out), "--max-steps", "2", "--quiet"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    start = next(
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"start"' in line
    )
    note = next((ln for ln in proc.stdout.splitlines() if "thread(s)" in ln), None)
    return {"threads": start["threads"], "note": note, "seconds": time.monotonic() - t0}


def _average_policy(line: str, cores: int = 2) -> int:
    """The threads the old default (floor of the 1-minute average) would have taken."""
    return cores - min(math.floor(float(line.split()[0])), cores - 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job-seconds", type=float, default=40.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        subprocess.run([sys.executable, "-c", JOB, str(args.job_seconds)], check=True)
        ended = time.monotonic()
        lines = _readings()
        gap = time.monotonic() - ended
        row = _train(tmp, "after_job")
        row.update(case="after a finished job", train_started_after_s=round(gap, 2))
        row.update(readings=lines, average_policy=_average_policy(lines[0]))
        rows.append(row)
        spinner = subprocess.Popen([sys.executable, "-c", SPIN])
        try:
            time.sleep(1.0)
            lines = _readings()
            row = _train(tmp, "beside_spinner")
        finally:
            spinner.kill()
            spinner.wait()
        row.update(case="beside a spinning program", readings=lines)
        row.update(average_policy=_average_policy(lines[0]))
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(
                f"{r['case']}: train took {r['threads']} thread(s) (1-minute average "
                f"policy: {r['average_policy']}); note: {r['note']}"
            )
            print("  /proc/loadavg:", *r["readings"], sep="\n    ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
