"""A time budget: where a run stands in it, when it is spent, and its recorded schedule.

With `train.budget = "time"` the learning rate is a function of progress, the fraction of
the budget (`train.max_time` seconds of training steps) that will have passed when a step
ends, not of the step number (`optim.lr_at_progress`). Elapsed time is the sum of the
measured step times: start-up, the first step of a compiled run (it compiles),
evaluations, samples and checkpoints are not counted, and on a GPU each step's time is
read after its one host sync. So a machine twice as fast runs twice the steps and both
reach the floor in their last steps.

Progress before step n+1 = (elapsed after n steps + the mean step time so far) / budget,
capped at 1 (0 for the first step, whose gradient then only seeds the optimizer's
moments when warm-up is on). The run stops when one more step at the mean time would end
past the budget, so it ends within it and its last step runs at (or next to) progress 1.

Each step's progress is recorded in the training state (checkpoints) and in the run's
`schedule.json`. "Bit-exact" with a time budget means: given the same progress values,
a run is the same run. `train.replay_schedule = RUN/schedule.json` replays a recorded
schedule instead of reading the clock (the same steps at the same learning rates and the
same evaluations), so a run resumed from any checkpoint with the uninterrupted run's
schedule ends with its weights, bit for bit (CPU, fp32); resuming without it continues the
budget where it stopped (elapsed time is part of the checkpoint), on the clock.
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
        """The progress step `step` (0-based, the next one) runs at, after `timed_steps`
        measured steps took `elapsed` seconds in all."""
        if self.replay is not None:
            return self.replay[step] if step < len(self.replay) else 1.0
        mean = elapsed / timed_steps if timed_steps else 0.0
        return min((elapsed + mean) / self.seconds, 1.0)

    def spent(self, elapsed: float, timed_steps: int, step: int) -> bool:
        """True when the budget has no room for step `step`: the replayed schedule has no
        more steps, or one more step at the mean time would end past the budget."""
        if self.replay is not None:
            return step >= len(self.replay)
        if not timed_steps:
            return False
        return elapsed + elapsed / timed_steps > self.seconds


def crossed(before: float, after: float, every: float) -> bool:
    """True when progress passed a multiple of `every` (e.g. each 10% of the budget) going
    from `before` to `after`."""
    return math.floor(after / every + 1e-9) > math.floor(before / every + 1e-9)


def write_schedule(run_dir: Path, seconds: float, progress: list[float]) -> Path:
    """Write the run's schedule (the budget and each step's progress) atomically to
    run_dir/schedule.json; returns its path."""
    body = {"format": SCHEDULE_FORMAT, "budget_s": seconds, "progress": progress}
    return write_json(Path(run_dir) / SCHEDULE_FILE, body)


def read_schedule(path: str | Path) -> tuple[float, list[float]]:
    """(the budget in seconds, each step's progress) from a schedule.json (or a run
    directory holding one)."""
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
    return (float(seconds) if isinstance(seconds, (int, float)) else 0.0), [
        float(v) for v in progress
    ]
