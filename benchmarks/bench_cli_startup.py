"""How long the CLI takes to answer when nothing heavy is needed: `gptlab --help`,
`gptlab train --help`, `gptlab generate --help` and `gptlab --version`, each run as a fresh
process (`python -m gptlab ...`) N times.

    python benchmarks/bench_cli_startup.py [--runs 10]

Prints one row per command: the median and best wall-clock seconds of the N runs, the
exit status, and which of torch, numpy and matplotlib the command imported. The imports are
read from one more, untimed run under `python -X importtime`, so the timed runs are the
plain command. Figures go in BENCHMARKS.md, not in this file.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

COMMANDS: tuple[tuple[str, ...], ...] = (
    ("--help",),
    ("train", "--help"),
    ("generate", "--help"),
    ("--version",),
)
HEAVY = ("torch", "numpy", "matplotlib")


@dataclass
class Row:
    command: str  # as a user types it, e.g. "gptlab train --help"
    runs: int
    median_s: float
    best_s: float
    exit_code: int
    heavy: list[str]  # which of HEAVY the command imported


def _gptlab(args: tuple[str, ...], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-m", "gptlab", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )


def heavy_in(importtime_stderr: str) -> list[str]:
    """Which of HEAVY appear in `python -X importtime`'s report on stderr (lines
    `import time: self | cumulative | name`, the name indented by nesting)."""
    names = {
        line.rsplit("|", 1)[-1].strip()
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:")
    }
    return [m for m in HEAVY if m in names]


def imported_heavy(args: tuple[str, ...]) -> list[str]:
    """Which of HEAVY `gptlab ARGS` imports (one untimed run under -X importtime)."""
    return heavy_in(_gptlab(args, "-X", "importtime").stderr)


def measure(commands: tuple[tuple[str, ...], ...] = COMMANDS, runs: int = 10) -> list[Row]:
    """One Row per command: `runs` timed fresh processes, then one untimed import check."""
    rows = []
    for args in commands:
        times = []
        code = 0
        for _ in range(runs):
            start = time.perf_counter()
            code = _gptlab(args).returncode
            times.append(time.perf_counter() - start)
        rows.append(
            Row(
                command=" ".join(("gptlab", *args)),
                runs=runs,
                median_s=statistics.median(times),
                best_s=min(times),
                exit_code=code,
                heavy=imported_heavy(args),
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    """A Markdown table: a header line, a rule, then one line per row."""
    lines = [
        "| command | runs | median s | best s | exit | imported (of torch, numpy, matplotlib) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        heavy = ", ".join(r.heavy) or "none"
        lines.append(
            f"| `{r.command}` | {r.runs} | {r.median_s:.3f} | {r.best_s:.3f} | "
            f"{r.exit_code} | {heavy} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="fresh processes per command")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    print(f"python {sys.version.split()[0]}, {args.runs} runs per command")
    print(format_table(measure(COMMANDS, args.runs)))


if __name__ == "__main__":
    main()
