"""The thread policy (gptlab.runtime.threads) with injected cores, load and environment, and that
`--threads` really sets torch's threads in a command."""

from __future__ import annotations

import pytest
import torch
from run_helpers import cli_flags, records, write_corpus

from gptlab.cli import main as cli
from gptlab.errors import GptlabError
from gptlab.runtime import threads
from gptlab.runtime.threads import choose_threads, usable_cores


@pytest.fixture
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    "cores, running, want, noted",
    [
        (2, 0, 2, False),  # a quiet machine: every core
        (2, 1, 1, True),  # one other program running: leave it its core
        (2, 7, 1, True),  # never fewer than one
        (16, 3, 13, True),
        (1, 5, 1, False),  # one core: nothing to give up
    ],
)
def test_auto_threads_leave_the_busy_cores(cores, running, want, noted):
    n, note = choose_threads(None, cores=cores, running=running, env={})
    assert n == want
    assert (note is not None) == noted
    if noted:
        assert f"--threads {cores}" in note and f"{running} other program(s) running" in note


def test_asked_threads_are_used_and_omp_num_threads_is_a_request():
    assert choose_threads(3, cores=2, running=9, env={}) == (3, None)
    assert choose_threads(None, cores=8, running=0, env={"OMP_NUM_THREADS": "2"}) == (2, None)
    assert choose_threads(0, cores=8, running=0, env={"OMP_NUM_THREADS": "junk"})[0] == 8
    with pytest.raises(GptlabError, match="--threads"):
        choose_threads(-1, cores=2, running=0, env={})


def test_a_server_keeps_a_core_for_its_http_loop():
    assert choose_threads(None, reserve=1, cores=2, running=0, env={}) == (1, None)
    n, note = choose_threads(2, reserve=1, cores=2, running=0, env={})
    assert n == 1 and "HTTP loop" in note
    assert choose_threads(None, reserve=1, cores=8, running=2, env={})[0] == 6
    assert choose_threads(None, reserve=1, cores=1, running=0, env={})[0] == 1
    assert 1 <= usable_cores()


def test_train_threads_flag_sets_torchs_threads(tmp_path, keep_torch_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    text = write_corpus(tmp_path / "text.txt")
    for n in (1, 2):
        run = tmp_path / f"run{n}"
        assert cli.main([*cli_flags(text, run, steps=2), "--quiet", "--threads", str(n)]) == 0
        (start,) = records(run, "start")
        assert start["threads"] == n == torch.get_num_threads()


def test_threads_flag_refuses_nonsense(capsys):
    assert cli.main(["generate", "--threads", "-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0]


def test_auto_threads_note_comes_once_training_starts(
    tmp_path, keep_torch_threads, monkeypatch, capsys
):
    """A busy machine (injected load) gets one thread and a note; an error stays one line."""
    from gptlab.runtime import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "running_now", lambda: 1)
    text = write_corpus(tmp_path / "text.txt")
    run = tmp_path / "run"
    assert cli.main([*cli_flags(text, run, steps=2), "--quiet"]) == 0
    (start,) = records(run, "start")
    assert start["threads"] == 1
    out = capsys.readouterr().out  # with the progress lines; stderr is for errors
    assert "1 thread(s) on 2 cores" in out and "--threads 2" in out
    assert cli.main([*cli_flags(text, tmp_path / "bad", steps=2), "--model.n_heads", "3"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# /proc/loadavg as benchmarks/bench_threads_after_job.py read it, every 25 ms, on a 2-core
# AMD EPYC (2026-12-07): 0.2 s after a 40 s two-thread job ended (the 1-minute average still
# 1.60 from it, only the reader running), and a second after a program began spinning (two
# running: the reader and it). The kernel refreshes the averages every 5 s, the running
# count at every read.
AFTER_A_JOB = ["1.60 2.17 2.28 1/112 25301"] * 9
BESIDE_A_SPINNER = ["1.51 2.13 2.26 2/113 25307"] * 9
# A made-up sequence: a shell starting beside the reader in one reading of nine.
WITH_A_BLIP = AFTER_A_JOB[:4] + ["1.60 2.17 2.28 2/113 25302"] + AFTER_A_JOB[5:]


def _replay(lines: list[str]):
    return iter(lines).__next__


def test_a_finished_job_leaves_every_core(monkeypatch):
    """The 1-minute average still says 1.6 (a job that ended), nothing else runs: 2 threads.
    A blip (a shell starting: 2 running in one reading) is outvoted by the median."""
    monkeypatch.setattr(threads, "_own_running_threads", lambda: 1)
    assert threads.running_now(read=_replay(AFTER_A_JOB), interval=0) == 0
    assert threads.running_now(read=_replay(WITH_A_BLIP), interval=0) == 0
    monkeypatch.setattr(threads, "_read_loadavg", _replay(AFTER_A_JOB))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert choose_threads(None, cores=2, env={}) == (2, None)


def test_a_program_spinning_now_takes_a_core(monkeypatch):
    """A program that began spinning a second ago (the average has hardly moved) is running
    in nearly every reading: it keeps its core, and the note says why."""
    monkeypatch.setattr(threads, "_own_running_threads", lambda: 1)
    assert threads.running_now(read=_replay(BESIDE_A_SPINNER), interval=0) == 1
    monkeypatch.setattr(threads, "_read_loadavg", _replay(BESIDE_A_SPINNER))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    n, note = choose_threads(None, cores=2, env={})
    assert n == 1 and "1 other program(s) running now" in note and "--threads 2" in note


def test_running_now_leaves_out_this_process_and_nonsense(monkeypatch):
    """Threads of this process that are running (torch's OpenMP threads spin a while after
    each parallel region) are not other programs; a line that is no loadavg means 0."""
    lines = ["0.0 0.0 0.0 3/99 1"] * 3
    monkeypatch.setattr(threads, "_own_running_threads", lambda: 3)
    assert threads.running_now(samples=3, read=_replay(lines), interval=0) == 0
    monkeypatch.setattr(threads, "_own_running_threads", lambda: 1)
    assert threads.running_now(samples=3, read=_replay(lines), interval=0) == 2
    assert threads.running_now(samples=3, read=_replay(["garbage"] * 3), interval=0) == 0
    assert threads.running_now(samples=3, read=_replay([""] * 3), interval=0) == 0


def test_own_running_threads_counts_the_caller():
    """Read from /proc on Linux: the thread asking is running, so at least one."""
    assert threads._own_running_threads() >= 1


def test_running_now_reads_this_machine():
    """The real /proc/loadavg: a count, never negative (0 where the OS has none)."""
    assert threads.running_now(samples=3, interval=0.001) >= 0


def test_a_resume_asks_for_the_threads_its_run_had():
    """Bit-exact CPU resume needs the same threads: nothing asked -> the run's count."""
    n, note = choose_threads(None, resumed=1, cores=2, running=0, env={})
    assert n == 1 and "as the run had" in note and "--threads 2" in note
    assert choose_threads(None, resumed=2, cores=2, running=0, env={}) == (2, None)
    assert choose_threads(None, resumed=2, cores=2, running=1, env={})[0] == 2
    assert choose_threads(3, resumed=1, cores=4, running=0, env={}) == (3, None)  # asked
    assert choose_threads(None, resumed=1, cores=4, running=0, env={"OMP_NUM_THREADS": "4"})[0] == 4
    assert choose_threads(None, resumed=None, cores=4, running=0, env={})[0] == 4


def test_run_threads_reads_the_last_start_record(tmp_path):
    assert threads.run_threads(tmp_path) is None  # no metrics.jsonl
    (tmp_path / "metrics.jsonl").write_text(
        '{"event": "start", "step": 0, "threads": 2}\n'
        '{"event": "train", "step": 1, "loss": 3.0}\n'
        '{"event": "start", "step": 1, "threads": 1}\n'
        '{"event": "train", "step": 2, "lo'  # a line cut short by a kill
    )
    assert threads.run_threads(tmp_path) == 1
    (tmp_path / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    assert threads.run_threads(tmp_path) is None


def test_train_resume_keeps_the_runs_threads_under_load(
    tmp_path, keep_torch_threads, monkeypatch, capsys
):
    """A run started on 2 threads, resumed while the load says 1: it resumes on 2."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    text = write_corpus(tmp_path / "text.txt")
    run = tmp_path / "run"
    monkeypatch.setattr(threads, "running_now", lambda: 0)
    assert cli.main([*cli_flags(text, run, steps=2), "--quiet"]) == 0
    monkeypatch.setattr(threads, "running_now", lambda: 1)
    capsys.readouterr()
    assert cli.main([*cli_flags(text, run, steps=4), "--quiet", "--resume"]) == 0
    assert [r["threads"] for r in records(run, "start")] == [2, 2]
    assert "as the run had" in capsys.readouterr().out
    assert cli.main([*cli_flags(text, run, steps=6), "--quiet", "--resume", "--threads", "1"]) == 0
    assert [r["threads"] for r in records(run, "start")] == [2, 2, 1]
