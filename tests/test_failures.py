"""A failed rank ends the job (never hangs), and preemption checkpoints and resumes exactly.

Real ranks and real signals: ``kill -9`` of one rank at a random step and an exception on one rank
only, under horovodrun --gloo, horovodrun --mpi and mpirun + mpi4py, for user scripts on
hvdllm.torch / hvdllm.tensorflow collectives and for ``hvdllm train`` (torch and Keras): every trial
ends within 30 s, every rank process gone, the output naming the failed rank. SIGTERM/SIGUSR1 to one
rank mid-run, then ``--resume``: the metrics equal the uninterrupted run's bitwise.

``HVDLLM_FAILURE_TRIALS`` (default 3) sets the kill -9 trials of the torch user script per launcher;
the issue's 10 were measured with ``HVDLLM_FAILURE_TRIALS=10`` (README "When things fail").
"""
from __future__ import annotations

import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hvdllm.core import failure, preemption, waiting
from hvdllm.train.metrics import read_metrics
from tests.failing_jobs import Job

END_WITHIN_S = 30
STARTUP_S = 600          # a Keras trainer's start on 2 ranks took 140 s on a loaded 2-core host
TRIALS = int(os.environ.get("HVDLLM_FAILURE_TRIALS", "3"))
WORKER = str(Path(__file__).parent / "workers" / "failure_worker.py")
SMALL = ["--global-batch", "8", "--micro-batch", "4", "--set", "model.n_layer=2", "--set", "model.n_embd=64",
         "--set", "model.block_size=64", "--set", "run.threads=1", "--set", "run.tensorboard=false",
         "--set", "run.progress=false", "--set", "sample.tokens=5", "--set", "run.log_interval=1"]


# -- units ---------------------------------------------------------------------------------------------
def test_failure_line_names_rank_and_step() -> None:
    e = failure.mark_step(ValueError("bad\nthing"), 7)
    failure.mark_step(e, 9)                           # the innermost mark wins
    assert failure.failure_line(3, e) == "hvdllm: rank 3 failed at step 7: ValueError: bad thing"
    assert failure.failure_line(0, RuntimeError()) == "hvdllm: rank 0 failed: RuntimeError"


def test_a_survivors_line_says_a_collective_failed_and_names_the_step() -> None:
    class HorovodInternalError(RuntimeError):
        pass

    shutdown = "Horovod has been shut down. This was caused by an exception on one of the ranks or ..."
    e = failure.mark_step(HorovodInternalError(shutdown), 17)
    assert failure.failure_line(1, e) == f"hvdllm: rank 1 failed at step 17: {failure.PEER_FAILED}: " \
                                         "HorovodInternalError: Horovod has been shut down"
    tf = failure.mark_step(RuntimeError("{{function_node __wrapped__HorovodAllreduce}} " + shutdown), 3)
    assert failure.failure_line(0, tf).endswith(f"step 3: {failure.PEER_FAILED}: RuntimeError: "
                                                "Horovod has been shut down")
    timeout = waiting.CollectiveTimeout("a collective waited more than 5 s")
    assert failure.failure_line(0, timeout) == f"hvdllm: rank 0 failed: {failure.PEER_FAILED}: CollectiveTimeout: " \
                                               "a collective waited more than 5 s"
    assert not failure.peer_failed(ValueError("bad"))


def test_a_stop_signal_prints_the_rank_and_step(capfd: pytest.CaptureFixture) -> None:
    from hvdllm.train.loop import _announce_signal

    seen: list[int] = []
    stop = preemption.StopRequest(on_signal=seen.append).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)           # only the first one is announced
    finally:
        stop.uninstall()
    assert seen == [signal.SIGTERM]
    _announce_signal(1, signal.SIGTERM, 17)
    assert "hvdllm: rank 1 got SIGTERM at step 17: finishing the step" in capfd.readouterr().err


def test_excepthook_aborts_only_multi_rank_jobs(capsys: pytest.CaptureFixture) -> None:
    codes: list[int] = []
    e = failure.mark_step(KeyError("k"), 2)
    failure.AbortOnFailure(1, 2, previous=lambda *a: None, abort=codes.append)(KeyError, e, None)
    failure.AbortOnFailure(0, 1, previous=lambda *a: None, abort=codes.append)(KeyError, e, None)
    assert codes == [failure.EXIT_FAILED]
    assert capsys.readouterr().err.count("hvdllm: rank") == 2


class _Request:
    """A stand-in for an MPI request: done or never done."""

    def __init__(self, done: bool) -> None:
        self.done = done

    def Test(self) -> bool:  # noqa: N802 - mpi4py's name
        return self.done


def test_exit_guard_aborts_a_rank_that_leaves_alone(capsys: pytest.CaptureFixture) -> None:
    codes: list[int] = []
    exits: list[object] = []

    def guard(rank: int, others_leave: bool, timeout: float | None = 0.05) -> failure.ExitGuard:
        return failure.ExitGuard(rank, 2, lambda: _Request(others_leave), timeout, agree_s=0.05,
                                 previous=exits.append, abort=codes.append)

    guard(1, False).sys_exit(3)                        # alone: a line, MPI_Abort(3)
    guard(1, False).sys_exit("bad config")             # (a message: status 1)
    guard(1, True).sys_exit(2)                         # every rank leaves with it (bad input): a plain exit
    guard(1, False).sys_exit(0)                        # status 0: no wait here (at_exit bounds it)
    assert codes == [3, 1] and exits == [3, "bad config", 2, 0]   # (abort returns here: the test's stand-in)
    guard(0, False).at_exit()
    guard(0, True).at_exit()
    guard(0, False, timeout=None).at_exit()            # HVDLLM_WAIT_TIMEOUT_S=0: wait forever, as MPI does
    assert codes == [3, 1, failure.EXIT_FAILED]
    err = capsys.readouterr().err
    assert "hvdllm: rank 1 failed: sys.exit(3) on one rank of 2 while the others run on" in err and "bad config" in err
    assert "hvdllm: rank 0 failed: it ended, but the other ranks did not within 0.05 s" in err
    assert [failure.exit_code(s) for s in (None, 0, 5, "text")] == [0, 0, 5, 1]


def test_wait_until_has_a_deadline() -> None:
    with pytest.raises(waiting.CollectiveTimeout, match="HVDLLM_WAIT_TIMEOUT_S"):
        waiting.wait_until(lambda: False, timeout=0.05)
    waiting.wait_until(lambda: True, timeout=0.0)
    assert waiting.wait_timeout({}) == waiting.DEFAULT_WAIT_TIMEOUT_S
    assert waiting.wait_timeout({"HVDLLM_WAIT_TIMEOUT_S": "0"}) is None
    assert waiting.wait_timeout({"HVDLLM_WAIT_TIMEOUT_S": "2.5"}) == 2.5
    for bad in ("-1", "inf", "nan", "soon"):
        with pytest.raises(ValueError, match=f"HVDLLM_WAIT_TIMEOUT_S={bad!r}"):
            waiting.wait_timeout({"HVDLLM_WAIT_TIMEOUT_S": bad})


def test_stop_request_signal_budget_and_agreement() -> None:
    now = [0.0]
    stop = preemption.StopRequest(max_seconds=5, clock=lambda: now[0]).install()
    try:
        assert stop.code() == 0
        now[0] = 5.0
        assert stop.code() == preemption.TIME_BUDGET
        os.kill(os.getpid(), signal.SIGUSR1)           # a real signal: the handler notes it
        os.kill(os.getpid(), signal.SIGTERM)           # the first one is kept
        assert stop.code() == signal.SIGUSR1
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def two_ranks(v: np.ndarray) -> np.ndarray:        # rank 1 of 2 also asked: the time budget
        other = np.zeros_like(v)
        other[1] = preemption.TIME_BUDGET
        return v + other

    assert preemption.agreed_stop(0, 0, 2, lambda v: v) is None
    assert preemption.agreed_stop(15, 0, 2, two_ranks) == "SIGTERM on rank 0, run.max_minutes on rank 1"
    # started now (the codes as they are), finished later: the loop's overlap with the step
    calls: list[str] = []

    def start(v: np.ndarray):
        calls.append("start")
        return lambda: (calls.append("finish"), two_ranks(v))[1]

    finish = preemption.start_agreement(10, 0, 2, start)
    assert calls == ["start"]
    assert finish() == "SIGUSR1 on rank 0, run.max_minutes on rank 1" and calls == ["start", "finish"]


# -- a failed rank ends the job ------------------------------------------------------------------------
def _steps_seen(job: Job, rank: int) -> int:
    return len(re.findall(rf"worker rank {rank} step \d+", job.output()))


def _metrics_steps(run: Path) -> int:
    try:
        return sum(1 for r in read_metrics(run / "metrics.csv") if r.get("loss"))
    except (OSError, ValueError, KeyError):
        return 0


def _assert_ends(job: Job, since: float, names: str, what: str) -> float:
    """The launcher ends within END_WITHIN_S of ``since``, non-zero, no rank left, output matching ``names``."""
    rc = job.wait(END_WITHIN_S - (time.monotonic() - since))
    out = job.output()
    assert rc is not None, f"{what}: still running {END_WITHIN_S} s after the failure:\n{out[-6000:]}"
    assert rc != 0, f"{what}: exit 0 after a failure:\n{out[-6000:]}"
    while job.ranks() and time.monotonic() - since < END_WITHIN_S:
        time.sleep(0.2)
    assert not job.ranks(), f"{what}: rank processes left {job.ranks()}:\n{out[-3000:]}"
    assert re.search(names, out), f"{what}: the output does not name the failed rank ({names!r}):\n{out[-6000:]}"
    job.kill()
    return time.monotonic() - since


def _killed_rank_named(rank: int) -> str:
    # horovodrun --gloo: "Process name: R / Exit code: 137"; mpirun: "process rank R ... exited on signal 9"
    return rf"(Process name: {rank}\s|process rank {rank} )"


def _survivor_named(rank: int, step: str = r"\d+") -> str:
    """A surviving ``rank``'s own line naming its step: its collective failed (horovodrun --gloo), or the
    launcher's SIGTERM reached it (mpirun, horovodrun --mpi: SIGTERM, then SIGKILL)."""
    return rf"hvdllm: rank {rank} (failed at step {step}: collective failed|got SIGTERM at step {step}:)"


def _kill_trial(launcher: str, argv: list[str], out: Path, rank: int, ready: callable, what: str,
                timeout: float = 180, survivor: str | None = None) -> float:
    job = Job(launcher, argv, out)
    try:
        job.wait_for(ready(job), timeout)
        t = job.signal_rank(rank, signal.SIGKILL)
        seconds = _assert_ends(job, t, _killed_rank_named(rank), what)
        if survivor is not None:
            assert re.search(survivor, job.output()), f"{what}: no line {survivor!r}:\n{job.output()[-6000:]}"
        return seconds
    finally:
        job.kill()


def _raise_trial(launcher: str, argv: list[str], out: Path, names: str, what: str,
                 before: callable | None = None, survivor: str | None = None) -> float:
    """The job raises on one rank by itself; timed from the moment the failure line appears."""
    job = Job(launcher, argv, out)
    try:
        if before is not None:
            before(job)
        job.wait_for(lambda: re.search(names, job.output()) is not None or job.proc.poll() is not None)
        seconds = _assert_ends(job, time.monotonic(), names, what)
        if survivor is not None:
            assert re.search(survivor, job.output()), f"{what}: no line {survivor!r}:\n{job.output()[-6000:]}"
        return seconds
    finally:
        job.kill()


@pytest.mark.parametrize("launcher", ["gloo", "horovod-mpi", "mpirun"])
@pytest.mark.timeout(2400)
def test_a_failed_rank_ends_the_job(launcher: str, tmp_path: Path) -> None:
    rng = random.Random(f"fail-{launcher}")
    seconds = []
    for trial in range(TRIALS):                          # kill -9 of a random rank at a random step
        rank, step = rng.randrange(2), rng.randrange(1, 12)
        seconds.append(_kill_trial(launcher, [WORKER, "torch", "400"], tmp_path / f"kill{trial}", rank,
                                   lambda job: lambda: _steps_seen(job, rank) > step,
                                   f"{launcher} torch script, kill -9 rank {rank} after step {step}"))
    seconds.append(_kill_trial(launcher, [WORKER, "tensorflow", "400"], tmp_path / "kill-tf", 1,
                               lambda job: lambda: _steps_seen(job, 1) > 3, f"{launcher} TF script, kill -9"))
    for fw in ("torch", "tensorflow"):                   # an exception on one rank only
        rank, step = rng.randrange(2), rng.randrange(1, 8)
        seconds.append(_raise_trial(launcher, [WORKER, fw, "400", "raise", str(rank), str(step)],
                                    tmp_path / f"raise-{fw}",
                                    rf"hvdllm: rank {rank} failed: RuntimeError: injected failure at step {step}",
                                    f"{launcher} {fw} script, rank {rank} raises at step {step}"))
    # hvdllm train: kill -9 mid-run (torch); rank 0's checkpoint folder is a file (torch and Keras)
    run = tmp_path / "train-kill"
    train = ["-m", "hvdllm.cli", "train", "--max-steps", "300", *SMALL, "--set", "run.eval_interval=0"]
    seconds.append(_kill_trial(launcher, [*train, "--out", str(run)], tmp_path / "train-kill-job", 1,
                               lambda job: lambda: _metrics_steps(run) >= 3, f"{launcher} hvdllm train, kill -9",
                               timeout=STARTUP_S, survivor=_survivor_named(0)))
    # (Keras under horovodrun --mpi runs the same Horovod TF ops as under --gloo, and its abort path is
    # the TF script's above; left out because one such launch takes minutes on a loaded 2-core host)
    for fw in ("torch",) if launcher == "horovod-mpi" else ("torch", "tensorflow"):
        run = tmp_path / f"train-raise-{fw}"

        def block_checkpoints(job: Job, run: Path = run) -> None:
            job.wait_for(lambda: _metrics_steps(run) >= 1, timeout=STARTUP_S)
            assert _metrics_steps(run) < 40 and not (run / "checkpoints").exists()
            (run / "checkpoints").write_text("a file where the checkpoints folder should be")

        seconds.append(_raise_trial(launcher, [*train, "--framework", fw, "--out", str(run), "--set",
                                               "run.checkpoint_interval=40"], tmp_path / f"train-raise-{fw}-job",
                                    r"hvdllm: rank 0 failed at step 40: \w+Error", f"{launcher} {fw} train, "
                                    "rank 0 cannot write its checkpoint", before=block_checkpoints,
                                    # rank 1 waits in step 40's collectives: its collective fails at
                                    # step 40, or the launcher's SIGTERM comes after it read its stop
                                    # code for step 40, so it is announced for step 41
                                    survivor=_survivor_named(1, "4[01]")))
    print(f"{launcher}: {len(seconds)} trials ended in {min(seconds):.1f}-{max(seconds):.1f} s", file=sys.stderr)


# -- preemption --------------------------------------------------------------------------------------------
RESUMABLE = ["-m", "hvdllm.cli", "train", "--max-steps", "12", *SMALL, "--set", "run.eval_interval=4",
             "--set", "run.checkpoint_interval=0", "--set", "model.dropout=0.1"]
COMPARED = ("loss", "val_loss", "lr", "grad_norm")
# the signalled job runs long enough that the signal lands mid-run: a Keras step on 2 ranks can take
# 0.15 s, and finding the rank's pid plus the poll interval once let 12 steps finish first (CI)
SIGNALLED_STEPS = 40


def _columns(run: Path) -> dict[str, list[tuple[int, str]]]:
    """Each compared metrics column as (step, text) where set: repr'd floats, so equal text = equal bits."""
    rows = read_metrics(run / "metrics.csv")
    return {c: [(int(r["step"]), str(r[c])) for r in rows if r.get(c) not in (None, "")] for c in COMPARED}


def _checkpoint_steps(run: Path) -> list[int]:
    from hvdllm.train import checkpoint as ckpt

    return [s for s, _ in ckpt.list_checkpoints(run)]


@pytest.mark.parametrize("launcher,framework,sig,rank,overlap", [("gloo", "torch", signal.SIGTERM, 1, False),
                                                                 ("mpirun", "tensorflow", signal.SIGUSR1, 0, False),
                                                                 ("gloo", "torch", signal.SIGUSR1, 0, True)])
@pytest.mark.timeout(2400)
def test_a_signal_to_one_rank_checkpoints_and_resume_is_bitwise(launcher: str, framework: str, sig: int, rank: int,
                                                                overlap: bool, tmp_path: Path) -> None:
    """The ranks finish the step the signalled rank announces (with run.stop_check_overlap, the next one),
    checkpoint it, exit 75, and the resumed run matches the uninterrupted one to the last bit."""
    args = [*RESUMABLE, "--framework", framework, "--max-steps", str(SIGNALLED_STEPS),
            "--set", f"run.stop_check_overlap={str(overlap).lower()}"]
    one_go, halves = tmp_path / "one-go", tmp_path / "halves"
    job = Job(launcher, [*args, "--out", str(one_go)], tmp_path / "job1")
    assert job.wait(STARTUP_S) == 0, job.output()[-6000:]

    job = Job(launcher, [*args, "--out", str(halves)], tmp_path / "job2")
    job.wait_for(lambda: _metrics_steps(halves) >= 3, timeout=STARTUP_S)
    job.signal_rank(rank, sig)
    rc = job.wait(120)
    out = job.output()
    stopped = re.search(rf"stopping early \({signal.Signals(sig).name} on rank {rank}\) after step (\d+)", out)
    assert rc not in (None, 0) and stopped, f"exit {rc}:\n{out[-6000:]}"
    assert "failed" not in out, out[-6000:]
    at = int(stopped.group(1))
    assert 3 <= at < SIGNALLED_STEPS and _checkpoint_steps(halves) == [at], (at, _checkpoint_steps(halves))
    announced = re.search(rf"rank {rank} got {signal.Signals(sig).name} at step (\d+)", out)
    assert announced and at == int(announced.group(1)) + overlap, out[-6000:]
    if launcher == "mpirun":
        assert rc == preemption.EXIT_PREEMPTED
    else:   # horovodrun reports the ranks' status, then exits 1
        assert f"Exit code: {preemption.EXIT_PREEMPTED}" in out, out[-3000:]

    job = Job(launcher, [*args, "--out", str(halves), "--resume"], tmp_path / "job3")
    assert job.wait(STARTUP_S) == 0, job.output()[-6000:]
    assert _columns(halves) == _columns(one_go)
    assert _checkpoint_steps(halves) == [at, SIGNALLED_STEPS]


@pytest.mark.timeout(300)
def test_max_minutes_stops_with_a_checkpoint_and_resume_is_bitwise(tmp_path: Path) -> None:
    from hvdllm.cli import main

    args = RESUMABLE[2:]                                 # from "train" on: in-process
    one_go, halves = tmp_path / "one-go", tmp_path / "halves"
    assert main([*args, "--out", str(one_go)]) == 0
    # a budget spent during the first step: the run stops after it, checkpointed
    assert main([*args, "--out", str(halves), "--set", "run.max_minutes=1e-6"]) == preemption.EXIT_PREEMPTED
    assert _checkpoint_steps(halves) == [1]
    assert main([*args, "--out", str(halves), "--resume", "--set", "run.stop_check_interval=5",
                 "--set", "run.max_minutes=60"]) == 0
    assert _columns(halves) == _columns(one_go)


@pytest.mark.timeout(600)
def test_sys_exit_on_one_mpi4py_rank_ends_the_job(tmp_path: Path) -> None:
    """mpirun + mpi4py: sys.exit(3) on rank 1 while rank 0 waits in a collective: MPI_Abort after
    failure.EXIT_AGREE_S (without it, rank 1's MPI_Finalize waits for rank 0, which waits for rank 1).
    sys.exit(0) on rank 0 mid-run: the end-of-job guard's bounded barrier (HVDLLM_WAIT_TIMEOUT_S), or
    rank 1's bounded wait, ends the job."""
    _raise_trial("mpirun", [WORKER, "torch", "400", "exit", "1", "3"], tmp_path / "exit3",
                 r"hvdllm: rank 1 failed: sys.exit\(3\) on one rank of 2", "mpirun: sys.exit(3) on rank 1")
    job = Job("mpirun", [WORKER, "torch", "400", "exit0", "0", "3"], tmp_path / "exit0",
              env={"HVDLLM_WAIT_TIMEOUT_S": "5"})
    try:
        job.wait_for(lambda: "worker rank 0 exits at step 3" in job.output())
        _assert_ends(job, time.monotonic(), r"hvdllm: rank [01] failed: [^\n]*waited more than 5 s",
                     "mpirun: sys.exit(0) on rank 0 mid-run")
    finally:
        job.kill()


@pytest.mark.parametrize("launcher", ["gloo", "mpirun"])
@pytest.mark.timeout(600)
def test_a_stalled_rank_ends_the_job_at_the_wait_deadline(launcher: str, tmp_path: Path) -> None:
    """Rank 1 stops issuing collectives but lives: no launcher ends the job; rank 0's bounded wait does."""
    job = Job(launcher, [WORKER, "torch", "400", "stall", "1", "3"], tmp_path / "job",
              env={"HVDLLM_WAIT_TIMEOUT_S": "5"})
    try:
        job.wait_for(lambda: _steps_seen(job, 0) >= 3)
        _assert_ends(job, time.monotonic(), r"hvdllm: rank 0 failed: collective failed [^:]*: CollectiveTimeout: "
                                            r"an? [\w ]+ waited more than 5 s", f"{launcher}: rank 1 stalls")
    finally:
        job.kill()
