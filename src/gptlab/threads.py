"""How many CPU threads torch uses: the cores this process may run on, fewer when others
are busy on them.

PyTorch starts one OpenMP thread per core. When another program keeps a core busy, the
threads of every parallel region wait for the slowest one, which shares its core: a
2-thread decode on a 2-core machine with one other busy process runs ~10x slower than a
1-thread one. So the default (`choose_threads(None)`):

    cores = the CPUs this process may use (its affinity mask, e.g. a container's cpuset)
    load  = the larger of the 1-minute load average and the processes runnable right now
            besides this one (Linux's /proc/loadavg)
    busy  = floor(load), at most cores - 1
    threads = cores - busy

The load average counts runnable processes over the last minute, so a command started
right after another heavy one (a training run) may take one thread fewer than it could.
It also lags: one program that began spinning a few seconds ago has hardly moved it (and
one spinning for ever only approaches 1.0), which is why the processes runnable at this
moment count too;
`--threads N` says how many to use. OMP_NUM_THREADS, when set, is the request. A server
(`reserve=1`) keeps a core for its HTTP loop beside the engine's threads, whatever asked.

A resumed run with neither asks for the threads its run last started with (its metrics
start record): a CPU sum split over another number of threads rounds differently, so a
resume on other threads would not be bit-exact with the uninterrupted run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.metrics import read_metrics


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # macOS, Windows
        return max(os.cpu_count() or 1, 1)


def load_average() -> float:
    """How busy the machine is: the larger of the 1-minute load average and the number of
    processes runnable right now other than this one (0 where the OS tells neither)."""
    try:
        average = os.getloadavg()[0]
    except (AttributeError, OSError):
        average = 0.0
    return max(average, float(runnable_others()))


def runnable_others(path: str = "/proc/loadavg", own: int | None = None) -> int:
    """Threads runnable at this moment outside this process, from the fourth field of
    Linux's /proc/loadavg ("running/total") less this process's own running threads (the
    asking one, and torch's OpenMP threads, which spin a while after each parallel region);
    0 elsewhere."""
    try:
        with open(path, encoding="ascii") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(running - (_own_running_threads() if own is None else own), 0)


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
    load: float | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, str | None]:
    """(torch threads to use, a note saying why when it is fewer than asked or than the
    cores, else None). `requested` None or 0: the policy above; `reserve` cores are kept for
    other threads of this process (a server's HTTP loop); `resumed`: the threads of the run
    being resumed, used when nothing asks (see above). `cores`, `load` and `env` default to
    the machine's (tests pass them)."""
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
    load = load_average() if load is None else load
    busy = min(max(math.floor(load), 0), cores - 1)
    n = max(min(cores - busy, room), 1)
    if resumed and not reserve:
        if resumed == n:
            return n, None
        return resumed, (
            f"{resumed} thread(s), as the run had, so that the resume is bit-exact; "
            f"--threads {n} to use what the load allows now"
        )
    if busy and n < room:
        return n, (
            f"{n} thread(s) on {cores} cores: the machine's load ({load:.1f}) says others are "
            f"running; --threads {room} uses all"
        )
    return n, None
