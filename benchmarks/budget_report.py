"""What a time-budget run did, from its files: the end record, the recorded schedule and the
learning rate its last logged step used (issue 20's check that the schedule reached its floor).

    python benchmarks/budget_report.py RUN_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gptlab.observe.metrics import read_metrics
from gptlab.train.budget import read_schedule


def main(argv: list[str]) -> int:
    run = Path(argv[0])
    records = read_metrics(run / "metrics.jsonl")
    end = [r for r in records if r.get("event") == "end"][-1]
    steps = [r for r in records if r.get("event") == "train" and "lr" in r]
    budget_s, progress = read_schedule(run)
    report = {
        "reason": end.get("reason"),
        "steps": end.get("step"),
        "val_loss": end.get("val_loss"),
        "budget_s": budget_s,
        "last_progress": progress[-1],
        "first_lr": steps[0]["lr"] if steps else None,
        "last_lr": steps[-1]["lr"] if steps else None,
        "evals": sum(r.get("event") == "eval" for r in records),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
