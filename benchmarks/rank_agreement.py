"""How well the proxy ranks recipes as the whole run does: Spearman's and Kendall's rank
correlations between two `bench_quality.py --json` files, per corpus.

    python benchmarks/rank_agreement.py proxy.jsonl full.jsonl

Rows are matched by (data, recipe); the last row of each wins (a rerun replaces a run).
Lower bits per byte ranks first. Ties get their mean rank (Spearman) and count as
neither concordant nor discordant (Kendall's tau-a over all pairs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path


def read_rows(path: str) -> dict[tuple[str, str], float]:
    rows = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows[(row.get("data", ""), row["recipe"])] = row["bits_per_byte"]
    return rows


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var_a = sum((x - ma) ** 2 for x in ra)
    var_b = sum((y - mb) ** 2 for y in rb)
    return cov / (var_a * var_b) ** 0.5


def kendall(a: list[float], b: list[float]) -> float:
    def sign(x: float) -> int:
        return (x > 0) - (x < 0)

    pairs = list(itertools.combinations(range(len(a)), 2))
    return sum(sign(a[i] - a[j]) * sign(b[i] - b[j]) for i, j in pairs) / len(pairs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("proxy")
    p.add_argument("full")
    args = p.parse_args(argv)
    proxy, full = read_rows(args.proxy), read_rows(args.full)
    for data in sorted({d for d, _ in proxy} & {d for d, _ in full}):
        both = sorted(r for d, r in proxy if d == data and (d, r) in full)
        if len(both) < 3:
            continue
        a = [proxy[(data, r)] for r in both]
        b = [full[(data, r)] for r in both]
        print(f"{data}: {len(both)} recipes, Spearman {spearman(a, b):+.3f}, "
              f"Kendall {kendall(a, b):+.3f}")  # fmt: skip
        for r, x, y in sorted(zip(both, a, b, strict=True), key=lambda t: t[2]):
            print(f"  {y:.4f}  {x:.4f}  {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
