"""Kill the job at any instant, or signal any one of its processes: rerun the same command and it ends with exactly the
uninterrupted run's weights.

Every run here is a real train.py (under `accelerate launch` for 2 processes), killed or signalled from outside. The
runs are short; the instants are known rather than raced: CIFAR_FAULT holds a run after a step (pause-at-step:N) or
after a save (pause-after-save:N) until SIGUSR2 (cifar/checkpoint.py's pause_point), so a signal surely lands
mid-run, and the test reads the process's stderr line by line to know it is there. The random kills keep their
randomness: each lands at the first poll that sees a step drawn at random.
"""
import random
import re
import signal
import subprocess
import sys
import threading

import psutil
import pytest
from conftest import DEBUG, ROOT, command, env, read_json, run
from test_checkpoint import bitwise_equal, kill_tree, metric_rows, steps_of, wait_for

# The debug run's 192 steps (64 an epoch, a checkpoint every 8) on 2 processes with 16 images each: 1024 images, 32
# steps an epoch, 64 in all; no checkpoint but the last, so that a signal's checkpoint is the only one mid-run.
DDP = [*DEBUG, "data.limit_train=1024", "data.batch_size=16", "train.epochs=2", "checkpoint.every_steps=null",
       "checkpoint.every_epochs=null"]


@pytest.fixture(scope="module")
def reference(baseline):
    return baseline(*DEBUG)


@pytest.fixture(scope="module")
def ddp_reference(baseline):
    return baseline(*DDP, procs=2)


def start(args, procs=1, **extra) -> subprocess.Popen:
    """train.py in its own process group (a kill reaches the launcher and every rank); stderr read by the test."""
    return subprocess.Popen(command("train.py", args, procs), cwd=ROOT, env=env(**extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def read_until(proc: subprocess.Popen, text: str, times: int = 1) -> str:
    """stderr up to the `times`-th `text` (one per rank, say); fails if the process ends first. Counted in the text
    read, not per line: two ranks' lines may interleave (print writes a line's text and its newline apart)."""
    read = ""
    for line in proc.stderr:
        read += line
        if read.count(text) >= times:
            return read
    proc.wait()
    raise AssertionError(f"exited {proc.returncode} before printing {text!r} {times}x:\n{read[-3000:]}")


def rest_of(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The rest of stderr, until the process exits. Read through the same file object as read_until (communicate()
    would read the descriptor and lose what that object already buffered); killed if it hangs."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        err = proc.stderr.read()
        proc.wait()
    finally:
        watchdog.cancel()
    return err


def last_row_step(run_dir) -> int:
    """The step of metrics.jsonl's last complete row (0 before any): how far a run being written has come."""
    try:
        with open(run_dir / "metrics.jsonl") as f:
            done = [line for line in f.read().split("\n")[:-1] if '"step"' in line]
    except FileNotFoundError:
        return 0
    return max((int(re.search(r'"step": (\d+)', line).group(1)) for line in done), default=0)


@pytest.mark.slow
def test_kill_9_at_random_instants_then_rerun_gives_identical_weights(tmp_path, reference):
    """Three SIGKILLs of the debug run, each at the first poll that sees a metrics row at a step drawn at random
    beyond everything written so far (rows come every 4 steps, saves every 8: a kill lands mid-step, mid-row or
    mid-save as it falls), each rerun resuming; the last rerun finishes with the reference's weights and rows."""
    out = tmp_path / "run"
    rng = random.Random()
    seed = rng.randrange(2 ** 32)
    rng.seed(seed)
    kills = 0
    for _ in range(3):
        floor = last_row_step(out)                   # a row beyond it can only come from this attempt
        target = rng.randint(floor + 1, floor + 48)  # at most 3 x 48 + a poll's lag: well before step 192
        proc = start([*DEBUG, f"output_dir={out}"])
        wait_for(lambda: last_row_step(out) >= target, proc=proc, interval=0.01)
        assert proc.poll() is None, f"seed {seed}: the run ended before step {target}: {proc.communicate()[1]}"
        kill_tree(proc)
        kills += 1
        assert proc.returncode == -signal.SIGKILL
    assert kills == 3                                 # each attempt was killed mid-run
    done = run("train.py", *DEBUG, f"output_dir={out}")
    assert "resuming from" in done.stdout
    assert bitwise_equal(reference, out), f"seed {seed}"
    assert metric_rows(reference) == metric_rows(out), f"seed {seed}"   # no lost or repeated log rows either


@pytest.mark.slow
def test_kill_9_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path, reference):
    out = tmp_path / "run"
    # CIFAR_FAULT makes the process SIGKILL itself halfway through writing the step-24 checkpoint
    proc = run("train.py", *DEBUG, f"output_dir={out}", check=False, CIFAR_FAULT="kill-during-save:24")
    assert proc.returncode == -signal.SIGKILL
    assert steps_of(out) == [8, 16]
    assert [n for n in (out / "checkpoints").iterdir() if n.name.startswith(".tmp-")]   # the half-written one
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-16"
    done = run("train.py", *DEBUG, f"output_dir={out}")
    assert "checkpoints/step-16" in done.stdout
    assert not [n for n in (out / "checkpoints").iterdir() if n.name.startswith(".tmp-")]  # cleaned up
    assert bitwise_equal(reference, out)


@pytest.mark.slow
@pytest.mark.parametrize("step", [64, 120])
def test_kill_right_after_a_save_resumes_without_repeating_or_losing_rows(tmp_path, reference, step):
    # step 64 ends epoch 0 (64 steps of 32 images) and is also an every_steps multiple: the save must hold the
    # state after that epoch's evaluation, or the resumed run would log the epoch row a second time
    out = tmp_path / "run"
    proc = run("train.py", *DEBUG, f"output_dir={out}", check=False, CIFAR_FAULT=f"kill-after-save:{step}")
    assert proc.returncode == -signal.SIGKILL and max(steps_of(out)) == step
    run("train.py", *DEBUG, f"output_dir={out}")
    assert bitwise_equal(reference, out)
    assert metric_rows(reference) == metric_rows(out)


@pytest.mark.slow
def test_ddp_kill_9_then_rerun_gives_identical_weights(tmp_path, ddp_reference):
    """Both ranks and the launcher SIGKILLed (a node failure) while rank 0 is held right after its step-16 save;
    the rerun resumes and ends bitwise equal to a 2-process run that was never killed (and saved nothing mid-run:
    saving changes nothing of the training)."""
    args, out = [*DDP, "checkpoint.every_steps=8"], tmp_path / "run"
    proc = start([*args, f"output_dir={out}"], procs=2, CIFAR_FAULT="pause-after-save:16")
    read_until(proc, "fault: pause-after-save at step 16")
    kill_tree(proc)
    assert max(steps_of(out)) == 16 and not (out / "model.safetensors").exists()
    done = run("train.py", *args, f"output_dir={out}", procs=2)
    assert "resuming from" in done.stdout and "step-16" in done.stdout
    assert bitwise_equal(ddp_reference, out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_to_one_rank_stops_all_ranks_with_a_checkpoint(tmp_path, ddp_reference, sig):
    """Both ranks held after step 12; rank 1 alone gets the signal; released, every rank stops after that same
    step, with one checkpoint, exit 75 each; the rerun ends bitwise equal to the run never signalled."""
    out = tmp_path / "run"
    proc = start([*DDP, f"output_dir={out}"], procs=2, CIFAR_FAULT="pause-at-step:12")
    try:
        read_until(proc, "fault: pause-at-step at step 12", times=2)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "train.py" in " ".join(p.cmdline())]
        assert len(workers) == 2
        rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
        rank1.send_signal(sig)
        read_until(proc, f"{signal.Signals(sig).name} received: stopping at the next step boundary")
        for worker in workers:
            worker.send_signal(signal.SIGUSR2)
        err = rest_of(proc)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    # every rank exits with the resumable code (the launcher lists each rank's exit code), none is killed
    assert re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", err, re.M) == ["75", "75"], err[-3000:]
    assert err.count(f"stopped: {signal.Signals(sig).name} at step 12") == 2, err[-3000:]
    status = read_json(out / "status.json")
    assert status["state"] == "stopped" and status["signal"] == signal.Signals(sig).name
    stopped_at = steps_of(out)
    assert len(stopped_at) == 1 and stopped_at == [12]            # the one checkpoint the signal asked for
    assert stopped_at[0] < 64 and not (out / "model.safetensors").exists()
    run("train.py", *DDP, f"output_dir={out}", procs=2)
    assert bitwise_equal(ddp_reference, out)


SLOW_SHUTDOWN = """
import os
from cifar.errors import Stopped, cli
from cifar.signals import StopRequest

class SlowTeardown:                     # stands for a process group or W&B being torn down at interpreter exit
    def __del__(self):
        print("tearing down", flush=True)
        os.read(0, 1)                   # as long as the test says: until it closes our stdin

def main():
    StopRequest().install()
    raise Stopped("test")

keep = SlowTeardown()
cli(main)()
"""


def test_a_stopped_rank_terminated_during_shutdown_still_exits_resumable():
    """The launcher SIGTERMs the other ranks as soon as one exits; by then Python may have put the fatal default
    handlers back (interpreter shutdown), which once turned a rank's exit 75 into -15 in CI. The SIGTERM is sent
    while the teardown is held, before its stdin closes and lets it end."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SHUTDOWN], cwd=ROOT, env=env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "tearing down"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err


RANK_EXIT = """
import atexit, sys
from cifar.errors import Stopped, cli, exit_as_command, leave_without_finalizing

class Finalized:                        # stands for gloo's worker threads, destroyed at interpreter finalization
    def __del__(self):
        print("finalized", flush=True)

def main():
    leave_without_finalizing()          # as runtime.make_accelerator says for a rank of several
    atexit.register(lambda: print("exit handlers ran", file=sys.stderr, flush=True))
    print("buffered", end="")           # stdout is a pipe: still in the buffer at the end, to be flushed
    if sys.argv[1] == "stop":
        raise Stopped("test")

keep = Finalized()
if sys.argv[2] == "command":
    exit_as_command(cli(main))
    print("after main", flush=True)      # a rank's command ends in exit_as_command: never reached
else:
    cli(main)()                          # main called from one's own script returns, as any function does
    print("after main", flush=True)
"""


@pytest.mark.parametrize("how, code", [("finish", 0), ("stop", 75)])
def test_a_rank_leaves_without_interpreter_finalization(how, code):
    """A rank of several, as a command (errors.exit_as_command), ends without interpreter finalization, where
    destroying gloo's threads now and then aborted a finished rank (-6); its exit handlers still run, its output is
    flushed, its status kept. Called from one's own script, main returns and the script goes on."""
    proc = subprocess.run([sys.executable, "-c", RANK_EXIT, how, "command"], cwd=ROOT, env=env(), text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "buffered"                            # flushed; no finalizer ran, nothing after main
    assert proc.stderr.endswith("exit handlers ran\n") and ("stopped: test" in proc.stderr) == (how == "stop")
    if how == "finish":
        library = subprocess.run([sys.executable, "-c", RANK_EXIT, how, "library"], cwd=ROOT, env=env(), text=True,
                                 capture_output=True, timeout=60)
        assert library.returncode == 0 and library.stdout == "bufferedafter main\nfinalized\n", library.stderr


@pytest.mark.slow
def test_sigint_single_process_exits_resumable_and_resumes(tmp_path, reference):
    """Ctrl-C while held after the step-8 save: released, the run stops at the next step boundary (step 9) with a
    checkpoint, exit 75 and the advice to rerun; the rerun ends bitwise equal to the run never interrupted."""
    out = tmp_path / "run"
    proc = start([*DEBUG, f"output_dir={out}"], CIFAR_FAULT="pause-after-save:8")
    try:
        read_until(proc, "fault: pause-after-save at step 8")
        proc.send_signal(signal.SIGINT)
        read_until(proc, "SIGINT received")
        proc.send_signal(signal.SIGUSR2)
        err = rest_of(proc, timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 75, err
    assert "stopped: SIGINT" in err and "rerun the same command" in err
    assert max(steps_of(out)) == 9
    run("train.py", *DEBUG, f"output_dir={out}")
    assert bitwise_equal(reference, out)
