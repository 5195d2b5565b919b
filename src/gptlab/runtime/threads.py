"""How many CPU threads torch uses: the cores this process may run on, fewer when other
programs are running on them now.

PyTorch starts one OpenMP thread per core. When another program keeps a core busy, the
threads of every parallel region wait for the slowest one, which shares its core: a
2-thread decode on a 2-core machine with one other busy process runs ~10x slower than a
1-thread one. So the default (`choose_threads(None)`):

    cores = the CPUs this process may use (its affinity mask, e.g. a container's cpuset)
    busy  = the programs running at this moment besides this one, at most cores - 1:
            the median of a few readings of Linux's /proc/loadavg running count over
            ~0.2 s (`running_now`), less this process's own running threads
    threads = cores - busy

Only what runs *now* counts. The 1-minute load average is the wrong input: it still holds
a command that finished seconds ago (preparing a corpus, then training on it, is the most
common sequence there is), so a run started after it took half the cores for its whole
budget. A median of readings ignores a program that runs for a moment (a shell, a `git`)
and sees one that spins (it is runnable in every reading).
`--threads N` says how many to use. OMP_NUM_THREADS, when set, is the request. A server
(`reserve=1`) keeps a core for its HTTP loop beside the engine's threads, whatever asked.

A resumed run with neither asks for the threads its run last started with (its metrics
start record): a CPU sum split over another number of threads rounds differently, so a
resume on other threads would not be bit-exact with the uninterrupted run.
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
    """The programs running at this moment besides this one: the median, over `samples`
    readings `interval` seconds apart, of /proc/loadavg's running count less this process's
    own running threads at that reading; 0 where the OS does not say. `read` returns one
    /proc/loadavg line per call (tests pass a recorded sequence)."""
    read = _read_loadavg if read is None else read
    counts = []
    for i in range(samples):
        if i:
            time.sleep(interval)  # spread the readings: one instant may catch a blip
        running = _running_count(read())
        if running is None:
            return 0
        counts.append(max(running - _own_running_threads(), 0))
    return sorted(counts)[len(counts) // 2]


def _read_loadavg() -> str:
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""


def _running_count(line: str) -> int | None:
    """The fourth field of a /proc/loadavg line ("running/total"): the threads runnable at
    that instant, the reader among them; None for a line that is not one."""
    try:
        return int(line.split()[3].split("/")[0])
    except (ValueError, IndexError):
        return None


def _own_running_threads() -> int:
    """This process's threads in state R (running), at least 1 (the caller)."""
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
    """The torch threads the run in `run_dir` last started with (the last start record of
    its metrics.jsonl), or None where no record says."""
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
    """(torch threads to use, a note saying why when it is fewer than asked or than the
    cores, else None). `requested` None or 0: the policy above; `reserve` cores are kept for
    other threads of this process (a server's HTTP loop); `resumed`: the threads of the run
    being resumed, used when nothing asks (see above). `cores`, `running` (other programs
    running now) and `env` default to the machine's (tests pass them)."""
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
    """Set torch's CPU threads by the policy above: `requested` (0: chosen), else the
    threads the run in `resumed_run` last started with (a bit-exact resume), keeping
    `reserve` cores for other threads of this process. Returns the note that says why fewer
    were chosen (choose_threads), or None."""
    import torch

    resumed = run_threads(resumed_run) if resumed_run else None
    n, note = choose_threads(requested or None, resumed=resumed, reserve=reserve)
    torch.set_num_threads(n)
    return note
