"""How many CPU threads torch uses: the cores this process may run on, less the programs
running on them now.

PyTorch starts one OpenMP thread per core, and every parallel region waits for its slowest
thread: one sharing a core with a busy program makes a 2-thread decode on 2 cores ~10x
slower than a 1-thread one. Only what runs *now* counts: the 1-minute load average still
holds a command that finished seconds ago (preparing the corpus before training on it).

`--threads N` or OMP_NUM_THREADS is the request; a server (`reserve=1`) keeps a core for
its HTTP loop. A resumed run with neither takes the threads it last started with, so that
its CPU sums round as before and the resume is bit-exact.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.observe.metrics import read_metrics


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # macOS, Windows
        return max(os.cpu_count() or 1, 1)


def running_now(
    samples: int = 9, interval: float = 0.025, read: Callable[[], str] | None = None
) -> int:
    """The programs running now besides this one: the median of `samples` /proc/loadavg
    readings `interval` s apart (`read` returns one line a call); 0 where the OS does not say."""
    read = _read_loadavg if read is None else read
    counts = []
    for i in range(samples):
        if i:
            time.sleep(interval)  # spread the readings: one instant may catch a blip
        line = read()
        try:  # the fourth field, "running/total": the threads runnable now, the reader among them
            running = int(line.split()[3].split("/")[0])
        except (ValueError, IndexError):
            return 0
        counts.append(max(running - _own_running_threads(), 0))
    return sorted(counts)[len(counts) // 2]


def _read_loadavg() -> str:
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""


def _own_running_threads() -> int:
    """This process's running threads, at least 1 (the caller)."""
    n = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        n += state == "R"
    return max(n, 1)


def run_threads(run_dir: str | Path) -> int | None:
    """The torch threads the run in `run_dir` last started with, or None where no record says."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    starts = [
        r["threads"]
        for r in read_metrics(path)
        if r.get("event") == "start" and isinstance(r.get("threads"), int) and r["threads"] > 0
    ]
    return starts[-1] if starts else None


def choose_threads(
    requested: int | None,
    *,
    resumed: int | None = None,
    reserve: int = 0,
    cores: int | None = None,
    running: int | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, str | None]:
    """(torch threads to use, a note saying why when fewer than asked or than the cores);
    `requested` None or 0: the policy above. `cores`, `running`, `env` default to the machine's."""
    if requested is not None and requested < 0:
        raise GptlabError(f"--threads {requested}: give 0 (automatic) or a number of threads")
    cores = usable_cores() if cores is None else cores
    env = os.environ if env is None else env
    if not requested and env.get("OMP_NUM_THREADS", "").strip().isdigit():
        requested = int(env["OMP_NUM_THREADS"]) or None
    room = max(cores - reserve, 1)
    if requested:
        if requested > room and reserve:
            return room, (
                f"{room} thread(s) instead of {requested}: {reserve} of the {cores} cores "
                "is kept for the HTTP loop"
            )
        return requested, None
    running = running_now() if running is None else running
    busy = min(max(running, 0), cores - 1)
    n = max(min(cores - busy, room), 1)
    if resumed and not reserve:
        if resumed == n:
            return n, None
        return resumed, (
            f"{resumed} thread(s), as the run had, so that the resume is bit-exact; "
            f"--threads {n} to use what is free now"
        )
    if busy and n < room:
        return n, (
            f"{n} thread(s) on {cores} cores: {running} other program(s) running now; "
            f"--threads {room} uses all"
        )
    return n, None


def apply_threads(
    requested: int, resumed_run: str | Path | None = None, reserve: int = 0
) -> str | None:
    """Set torch's CPU threads by `choose_threads`; returns its note, or None."""
    import torch

    resumed = run_threads(resumed_run) if resumed_run else None
    n, note = choose_threads(requested or None, resumed=resumed, reserve=reserve)
    torch.set_num_threads(n)
    return note
