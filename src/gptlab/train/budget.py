"""A time budget: where a run stands in it, when it is spent, and its recorded schedule.

With `train.budget = "time"` the learning rate follows progress, the fraction of the budget
(`train.max_time` seconds) passed when a step ends (`optim.lr_at_progress`). Elapsed time is
the sum of the measured step times (not start-up, a compiling first step, evaluations or
checkpoints), so a machine twice as fast runs twice the steps. Progress before step n+1 =
(elapsed after n steps + the mean step time) / budget, capped at 1; the run stops when one
more step at the mean time would end past the budget.

Each step's progress is recorded in the checkpoints and in `schedule.json`;
`train.replay_schedule` replays one instead of reading the clock, so a run resumed with the
uninterrupted run's schedule ends with its weights, bit for bit (CPU, fp32).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gptlab.atomic import write_json
from gptlab.errors import GptlabError

SCHEDULE_FILE = "schedule.json"
SCHEDULE_FORMAT = 1


class TimeBudget:
    """Progress through `seconds` of training, from the measured step times or from a
    recorded schedule (`replay`: each step's progress, in order)."""

    def __init__(self, seconds: float, replay: list[float] | None = None):
        self.seconds = seconds
        self.replay = replay

    def progress(self, elapsed: float, timed_steps: int, step: int) -> float:
        """The progress step `step` (0-based) runs at, after `timed_steps` measured steps took
        `elapsed` seconds."""
        if self.replay is not None:
            return self.replay[step] if step < len(self.replay) else 1.0
        mean = elapsed / timed_steps if timed_steps else 0.0
        return min((elapsed + mean) / self.seconds, 1.0)

    def spent(self, elapsed: float, timed_steps: int, step: int) -> bool:
        """True when the budget (or the replayed schedule) has no room for step `step`."""
        if self.replay is not None:
            return step >= len(self.replay)
        if not timed_steps:
            return False
        return elapsed + elapsed / timed_steps > self.seconds


def crossed(before: float, after: float, every: float) -> bool:
    """True when progress passed a multiple of `every` going from `before` to `after`."""
    return math.floor(after / every + 1e-9) > math.floor(before / every + 1e-9)


def write_schedule(run_dir: Path, seconds: float, progress: list[float]) -> Path:
    """Write the budget and each step's progress to run_dir/schedule.json; returns its path."""
    body = {"format": SCHEDULE_FORMAT, "budget_s": seconds, "progress": progress}
    return write_json(Path(run_dir) / SCHEDULE_FILE, body)


def read_schedule(path: str | Path) -> tuple[float, list[float]]:
    """(the budget in seconds, each step's progress) from a schedule.json or its run directory."""
    p = Path(path)
    if p.is_dir():
        p = p / SCHEDULE_FILE
    fix = "give the schedule.json of a run trained with --train.budget time"
    try:
        body = json.loads(p.read_text(encoding="utf-8"))
    except OSError:
        raise GptlabError(f"train.replay_schedule: {str(p)!r} not found; {fix}") from None
    except ValueError:
        raise GptlabError(f"train.replay_schedule: {str(p)!r} is not JSON; {fix}") from None
    progress = body.get("progress") if isinstance(body, dict) else None
    if (
        not isinstance(progress, list)
        or not progress
        or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in progress)
    ):
        raise GptlabError(
            f"train.replay_schedule: {str(p)!r} holds no list of progress values in [0, 1]; {fix}"
        )
    seconds = body.get("budget_s")
    seconds = float(seconds) if isinstance(seconds, (int, float)) else 0.0
    return seconds, [float(v) for v in progress]
