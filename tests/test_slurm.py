"""The SLURM scripts on a real local cluster (munge + slurmctld + slurmd, see tests/slurm_cluster.py): lint, a job to
COMPLETED, two "machines" rendezvousing through multinode.sbatch, and preemption -> checkpoint -> requeue -> resume
ending with exactly the weights of an uninterrupted run. The failure paths: a bad override fails at once (no requeue),
requeueing stops at MAX_RESTARTS, a plain scancel saves but does not requeue, a time limit saves and requeues.

Needs root (the cluster's daemons run as root) and the Debian packages slurmctld slurmd slurm-client munge (installed
on the fly with apt-get when missing); skipped with the reason otherwise, except under CI=true as root, where a
cluster that cannot run fails the suite. shellcheck is needed for its test only.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from cifar.checkpoint import read_pointer, step_of, verify
from conftest import DEBUG, ROOT, env, max_diff, read_json, weights
from slurm_cluster import SlurmCluster, Unavailable, alive, ensure_installed
from test_run_folder import hashes, hold_lock

SCRIPTS = ["slurm/train.sbatch", "slurm/multinode.sbatch", "slurm/sweep.sbatch", "slurm/common.sh"]
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]   # overrides of the scripts' GPU headers
# Far more steps than any test waits for (about 64 steps/s on one core): a restart that must still be training when
# signalled, where no hold can be placed (CIFAR_FAULT holds at one step, and a restart has the first run's environment)
LONG_RUN = ["configs/debug.yaml", "train.epochs=200", "checkpoint.every_steps=20"]
HELD_RUN = ["configs/debug.yaml", "checkpoint.every_steps=20"]    # 192 steps, held at 40 with HOLD
# A job that must surely be mid-run when a signal comes is held there instead: train.py's main process stops after
# its save at step HELD_AT (cifar/checkpoint.py) until SIGUSR2, which the test sends once the signal has arrived.
HELD_AT = 40   # a save every 8 (the debug baseline's) or 20 steps (the other jobs') is one at step 40
HOLD = {"CIFAR_FAULT": f"pause-after-save:{HELD_AT}"}


def must_run_here() -> bool:
    """CI (CI=true) as root: the SLURM tests must run, so a cluster that cannot start fails the suite."""
    return os.environ.get("CI") == "true" and os.geteuid() == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root; run the tests as root")
    try:
        ensure_installed()
    except Unavailable as e:
        if must_run_here():
            pytest.fail(f"CI=true as root, yet the local SLURM cluster cannot run: {e}", pytrace=False)
        pytest.skip(str(e))
    c = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    c.start()
    try:
        yield c
    finally:
        pids = dict(c.pids)
        c.stop()
        left = [f"{name} {pid}" for name, pid in pids.items() if alive(pid)] + [str(p) for p in c.stray_processes()]
        assert not left, f"still running after the cluster stopped: {left}"


def job_env(cluster, tmp_path, **extra) -> dict:
    e = env(PYTHON=sys.executable, CPU="1", RUNS_DIR=str(tmp_path / "runs"), **extra)
    e.update(cluster.env)   # SLURM_CONF, and no SLURM_* of an outer allocation
    return e


def submit(cluster, tmp_path, script, args, sbatch=(), output="slurm-%j.out", **extra) -> tuple[str, str]:
    """sbatch from the project folder as a user would; returns (job id, its output file: for an array, with %a left
    for the task)."""
    out = str(tmp_path / output)
    job = cluster.sbatch([*CPU_JOB, f"--output={out}", *sbatch, script, *args], cwd=ROOT,
                         env=job_env(cluster, tmp_path, **extra))
    return job, out.replace("%j", job).replace("%A", job)


def read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def newest_step(run) -> int:
    """The highest N of RUN/checkpoints/step-N (completed saves only: a save is renamed into place), -1 if none."""
    return max((step_of(p) for p in glob.glob(str(run / "checkpoints" / "step-*"))), default=-1)


def wait_for_checkpoint(cluster, job, run, after_step=-1, timeout=120) -> int:
    """Wait, while the job runs, for a checkpoint RUN/checkpoints/step-N with N > after_step; returns N."""
    deadline = time.monotonic() + timeout
    while newest_step(run) <= after_step:
        info = cluster.job(job)
        assert info.get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"), \
            f"job ended before a checkpoint after step {after_step} appeared in {run}/checkpoints\n" \
            f"{cluster.job_output(info)}"
        assert time.monotonic() < deadline, f"no checkpoint after step {after_step} in {run}/checkpoints after " \
                                            f"{timeout} s\n{cluster.job_output(info)}"
        time.sleep(0.1)
    return newest_step(run)


def preempt_after_checkpoint(cluster, job, run, after_step=-1) -> int:
    """Wait for a checkpoint newer than after_step, then send SIGUSR1 to the batch shell only, as
    `--signal=B:USR1@N` does (which itself fires only within ~30 s of its time, too loose for a test)."""
    step = wait_for_checkpoint(cluster, job, run, after_step)
    proc = cluster.run(["scancel", "--batch", "--signal=USR1", job])
    assert proc.returncode == 0, proc.stderr
    return step


def wait_restarted(cluster, job, restarts: int, timeout=60, running=True) -> dict:
    """Wait until the job has been requeued `restarts` times (and, when `running`, runs again)."""
    deadline, info = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        info = cluster.job(job)
        if info.get("Restarts") == str(restarts) and (info.get("JobState") == "RUNNING" or not running):
            return info
        time.sleep(0.2)
    raise AssertionError(f"job {job} not {'running ' if running else ''}after {restarts} restart(s) within "
                         f"{timeout} s: {info.get('JobState')} Restarts={info.get('Restarts')}\n"
                         f"{cluster.job_output(info)}")


def wait_for_line(cluster, job, out, text, timeout=120) -> str:
    """Wait, while the job is not over, until its output file holds `text`; returns the output."""
    deadline = time.monotonic() + timeout
    while text not in (log := read(out) if os.path.exists(out) else ""):
        info = cluster.job(job)
        assert info.get("JobState") in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"), \
            f"job {job} is {info.get('JobState')}, yet {text!r} is not in its output\n{log[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in the output of job {job} after {timeout} s\n{log[-4000:]}"
        time.sleep(0.1)
    return log


def held_trainer(cluster, job) -> psutil.Process:
    """The job's train.py main process (rank 0 or the only one; not a launcher), found by its SLURM_JOB_ID (an array
    task's own job id)."""
    job = cluster.job(job).get("JobId", job)
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if not any(a.endswith("train.py") for a in cmdline) or "accelerate.commands.launch" in cmdline:
            continue
        try:
            environ = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if environ.get("SLURM_JOB_ID") == job and environ.get("RANK", "0") == "0":
            found.append(p)
    assert len(found) == 1, f"job {job}: train.py main processes {found}"
    return found[0]


def wait_held(cluster, job, out, timeout=150) -> None:
    """Wait until the job's train.py is held after its save at step HELD_AT (HOLD)."""
    wait_for_line(cluster, job, out, "paused until SIGUSR2", timeout)


def release(cluster, job, out, received="") -> None:
    """Once the held train.py has received a stop signal (`received`, e.g. SIGUSR1; any when empty), let it go on
    (SIGUSR2): it stops at once, on that signal."""
    wait_for_line(cluster, job, out, f"{received} received: stopping")
    held_trainer(cluster, job).send_signal(signal.SIGUSR2)


def preempt_held(cluster, job, out) -> None:
    """USR1 to the batch shell only, as `--signal=B:USR1@N` does, while the job is held mid-run; then release it."""
    wait_held(cluster, job, out)
    proc = cluster.run(["scancel", "--batch", "--signal=USR1", job])
    assert proc.returncode == 0, proc.stderr
    release(cluster, job, out, "SIGUSR1")


def assert_stopped_with_checkpoint(run, signal: str) -> int:
    """status.json says training stopped on `signal`, and checkpoints/latest names the step-N folder it saved, whose
    manifest verifies (every file's size and SHA-256). Returns N."""
    status = read_json(run / "status.json")
    assert status["state"] == "stopped" and status["signal"] == signal, status
    latest = read_pointer(str(run / "checkpoints"), "latest")
    assert latest and step_of(latest) == status["step"], (latest, status)
    assert verify(latest) is None, f"{latest}: {verify(latest)}"
    return status["step"]


def test_scripts_parse():
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"bash -n {script}: {proc.stderr}"


def test_scripts_shellcheck_clean():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_sbatch_runs_to_completion(cluster, tmp_path):
    job, out = submit(cluster, tmp_path, "slurm/train.sbatch", ["configs/debug.yaml", "train.epochs=1"])
    info = cluster.wait(job, {"COMPLETED"}, timeout=120)
    run = tmp_path / "runs" / f"debug-job{job}"   # keyed by the job id
    assert (run / "model.safetensors").exists() and (run / "summary.json").exists(), cluster.job_output(info)
    assert read_json(run / "summary.json")["world_size"] == 1
    log = read(out)
    assert "training finished" in log and info["Restarts"] == "0", log[-3000:]


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_exactly(cluster, tmp_path, baseline):
    """USR1 to the batch shell (what `--signal=B:USR1@N` sends) while the job is held after its save at step 40 ->
    checkpoint at step 41, exit 75 -> requeue -> resume from step 41, finish; the final weights equal those of the
    same command run without interruption (the debug baseline)."""
    job, out = submit(cluster, tmp_path, "slurm/train.sbatch", list(DEBUG[1:]), **HOLD)
    run = tmp_path / "runs" / f"debug-job{job}"
    preempt_held(cluster, job, out)
    uninterrupted = weights(baseline(*DEBUG))       # trained here while the job waits to restart
    info = cluster.wait(job, {"COMPLETED"}, timeout=150)

    log = read(out)
    assert info["Restarts"] == "1", log[-4000:]
    assert "SIGUSR1 received" in log and "requeueing (restart 1" in log, log[-4000:]
    assert "restart 1 of this job: resuming" in log and "training finished" in log, log[-4000:]
    stopped = re.search(r"^stopped: SIGUSR1 at step (\d+); checkpoint (\S+);", log, re.M)
    assert stopped and int(stopped[1]) == HELD_AT + 1, log[-4000:]      # at the step boundary after the hold
    assert f"resuming from {stopped[2]} (step {stopped[1]}," in log, log[-4000:]
    assert log.count("starting in") == 1, "the output file should hold both runs of the job, the first once"
    assert (run / "summary.json").exists()
    resumed = weights(run)
    assert resumed.keys() == uninterrupted.keys()
    different = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert not different, f"weights differ after preemption + resume: {different}"


# tests/test_worlds.py's recipe: a global batch of 32, 2 processes x 16 or 1 x 16 accumulated twice; 32 steps
WORLDS = ["configs/debug.yaml", "data.limit_train=512", "data.limit_test=64", "data.global_batch=32",
          "data.batch_size=16", "train.epochs=2", "train.ema.decay=0.9", "checkpoint.every_steps=4",
          "train.log_every_steps=2"]


@pytest.mark.slow
@pytest.mark.budget(seconds=100, reason="a 2-process SLURM job preempted mid-epoch and requeued (~6 s) on 1, and the "
                                        "shared uninterrupted 2-process run it is compared with")
def test_a_two_process_job_requeued_on_one_process_resumes_as_the_uninterrupted_run(cluster, tmp_path, baseline):
    """The job's allocation changes while it waits to restart: 2 CPUs (CPUS_PER_PROCESS=1: 2 processes), preempted
    mid-epoch while held after its save at step 20, requeued, its CPUs cut to 1 while pending (`scontrol update`, as
    a requeue onto a smaller allocation); the same script and recipe, unedited, start 1 process, which resumes with
    train.grad_accum_steps 2 and ends with the uninterrupted 2-process run's weights and moving average (within
    1e-5: another order of float sums).

    Checked that it fails: without data.global_batch in the recipe the restart was refused (the checkpoint's global
    batch of 32 against 16) and the job FAILED with exit 2, not requeued."""
    job, out = submit(cluster, tmp_path, "slurm/train.sbatch", WORLDS, sbatch=["--cpus-per-task=2"],
                      CPUS_PER_PROCESS="1", CIFAR_FAULT="pause-after-save:20")
    run = tmp_path / "runs" / f"debug-job{job}"
    preempt_held(cluster, job, out)
    deadline, info = time.monotonic() + 60, {}
    while not (info.get("Restarts") == "1" and info.get("JobState") == "PENDING"):
        assert time.monotonic() < deadline, f"job {job} not pending after its requeue: {info}\n{read(out)[-3000:]}"
        time.sleep(0.1)
        info = cluster.job(job)
    update = cluster.run(["scontrol", "update", f"JobId={job}", "CPUsPerTask=1"])
    assert update.returncode == 0, update.stderr
    uninterrupted = baseline(*(["--config"] + WORLDS), procs=2)      # trained here while the job waits to restart
    info = cluster.wait(job, {"COMPLETED"}, timeout=150)
    log = read(out)
    assert info["Restarts"] == "1" and "requeueing (restart 1" in log, log[-4000:]
    first, second = log.split("restart 1 of this job: resuming")
    assert "2 process(es) on cpu" in first and "1 process(es) on cpu" in second, log[-4000:]
    stopped = re.search(r"^stopped: SIGUSR1 at step (\d+);", first, re.M)
    assert stopped and int(stopped[1]) == 21, log[-4000:]                   # mid epoch 1
    assert "resuming at step 21, saved by 2 process(es), on 1" in second, second[-3000:]
    assert read_json(run / "summary.json")["world_size"] == 1
    assert max_diff(weights(run), weights(uninterrupted)) <= 1e-5
    ema = [load_file(folder / "model-ema.safetensors") for folder in (run, uninterrupted)]
    assert max_diff(*ema) <= 1e-5


@pytest.mark.slow
@pytest.mark.budget(seconds=100, reason="a 2-machine SLURM job run twice (preempted, requeued ~6 s later): two "
                                        "c10d rendezvous of two launchers each")
def test_multinode_two_machines_rendezvous_and_resume_after_preemption(cluster, tmp_path):
    """Two "machines" (two srun tasks on the one node) x 1 process: c10d rendezvous, world size 2. Preempted while
    rank 0 is held after its save at step 40: the batch shell passes USR1 to srun, srun to each machine's task, each
    task to its training process; the launchers report 75; the job requeues, both machines rendezvous again and
    finish."""
    job, out = submit(cluster, tmp_path, "slurm/multinode.sbatch", ["configs/debug.yaml", "train.epochs=2",
                                                                    "checkpoint.every_steps=20"],
                      sbatch=["--nodes=1", "--ntasks-per-node=2"], MACHINES_PER_NODE="2", **HOLD)
    run = tmp_path / "runs" / f"debug-job{job}"
    preempt_held(cluster, job, out)
    info = cluster.wait(job, {"COMPLETED"}, timeout=150)
    assert (run / "summary.json").exists(), cluster.job_output(info)
    assert read_json(run / "summary.json")["world_size"] == 2
    log = read(out)
    assert "--num_machines 2 --machine_rank 0" in log and "--rdzv_backend c10d" in log, log[-3000:]
    assert info["Restarts"] == "1", log[-4000:]
    assert "training stopped with a checkpoint (status.json)" in log and "restart 1 of this job: resuming" in log, log[-4000:]
    assert log.count("--num_machines 2 --machine_rank 0") == 2, log[-4000:]    # machine 0's launch, in both runs


# ----------------------------------------------------------------------------- failure paths


@pytest.mark.slow
def test_bad_override_fails_at_once_with_one_line(cluster, tmp_path):
    """A bad value and an unknown key, each submitted through train.sbatch: train.py exits 2 with one `error:` line
    (no traceback) that lands in slurm-<id>.out, the script logs that it is not requeueing, and the job ends FAILED
    with exit code 2 and Restarts=0 (a real failure is never requeued)."""
    bad = {"optim.lr=abc": "optim.lr", "optim.nosuch=1": "nosuch"}   # both jobs run at once (one core each)
    jobs = {override: submit(cluster, tmp_path, "slurm/train.sbatch", ["configs/debug.yaml", override])
            for override in bad}
    for override, (job, out) in jobs.items():
        info = cluster.wait(job, {"FAILED"}, timeout=60)
        log = read(out)
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and bad[override] in errors[0], log
        assert "Traceback" not in log, log
        assert "training failed (exit 2): not requeueing" in log, log
        assert info["ExitCode"] == "2:0" and info["Restarts"] == "0", (info["ExitCode"], info["Restarts"], log)


@pytest.mark.slow
def test_a_job_whose_run_folder_is_held_elsewhere_fails_at_once_without_requeue(cluster, tmp_path):
    """The job's output_dir is locked by a process outside the job (a local run of the same folder): train.py refuses
    before any work with one line naming the holder, the script reads the folder's state (running: held elsewhere)
    and says why it is not training, and the job ends FAILED, exit 2, Restarts=0; the holder's folder is untouched."""
    folder = tmp_path / "held"
    holder = hold_lock(folder)
    try:
        before = hashes(folder)
        job, out = submit(cluster, tmp_path, "slurm/train.sbatch", ["configs/debug.yaml", f"output_dir={folder}"])
        info = cluster.wait(job, {"FAILED"}, timeout=60)
        assert hashes(folder) == before and holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
    log = read(out)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{folder} is in use by train.py pid {holder.pid}" in errors[0], log
    assert f"{folder} is held by another process (see the error line above): not training here" in log, log
    assert f"training did not start: {folder} is in use by another process: not requeueing" in log, log
    assert info["ExitCode"] == "2:0" and info["Restarts"] == "0", (info["ExitCode"], info["Restarts"], log)


@pytest.mark.slow
def test_requeueing_stops_at_max_restarts(cluster, tmp_path):
    """MAX_RESTARTS=1: the first preemption (USR1 to the batch shell) requeues; the restart resumes and saves; a
    second preemption ends the job with the line saying it stopped after 1 restart and is not requeued. The job ends
    FAILED with exit 75 (resumable) and Restarts=1, and the run folder's latest checkpoint is the one that second stop
    saved, intact (manifest verifies), so `output_dir=<run>` continues it."""
    job, out = submit(cluster, tmp_path, "slurm/train.sbatch", LONG_RUN, MAX_RESTARTS="1", **HOLD)
    run = tmp_path / "runs" / f"debug-job{job}"
    preempt_held(cluster, job, out)
    wait_restarted(cluster, job, 1)
    first_stop = newest_step(run)   # the first run saved this on USR1 before it requeued
    preempt_after_checkpoint(cluster, job, run, after_step=first_stop)   # once the restart has saved one of its own
    info = cluster.wait(job, {"FAILED"}, timeout=60)
    log = read(out)
    assert info["ExitCode"] == "75:0" and info["Restarts"] == "1", (info["ExitCode"], info["Restarts"], log[-4000:])
    assert log.count("requeueing (restart 1 of at most 1)") == 1, log[-4000:]
    assert "stopped with a checkpoint after 1 restarts (MAX_RESTARTS=1): not requeueing" in log, log[-4000:]
    assert f"submit again with output_dir={run}" in log, log[-4000:]
    assert assert_stopped_with_checkpoint(run, "SIGUSR1") > first_stop


@pytest.mark.slow
def test_scancel_saves_and_does_not_requeue(cluster, tmp_path):
    """A plain `scancel` (SIGTERM to every process of the job, SIGKILL KillWait seconds later: 10 s on this cluster,
    30 s by SLURM's default): the batch shell and train.py get SIGTERM, training saves a checkpoint within the grace,
    the script sees the job being cancelled and says it is not requeued. The job ends CANCELLED with Restarts=0."""
    job, out = submit(cluster, tmp_path, "slurm/train.sbatch", HELD_RUN, **HOLD)
    run = tmp_path / "runs" / f"debug-job{job}"
    wait_held(cluster, job, out)
    proc = cluster.run(["scancel", job])
    assert proc.returncode == 0, proc.stderr
    release(cluster, job, out, "SIGTERM")
    info = cluster.wait(job, {"CANCELLED"}, timeout=60)
    log = read(out)
    assert info["Restarts"] == "0", log[-4000:]
    assert f"JOB {job} ON {cluster.host} CANCELLED AT" in log and "SIGTERM received" in log, log[-4000:]
    assert "the job was cancelled, so it is not requeued" in log and "requeueing" not in log, log[-4000:]
    assert_stopped_with_checkpoint(run, "SIGTERM")   # saved, not cut short by the SIGKILL


@pytest.mark.slow
@pytest.mark.budget(seconds=120, reason="slurmctld tests time limits every 30 s (compiled in): the job ends 0-30 s "
                                        "after its limit is lowered, then its restart runs to the end")
def test_time_limit_saves_and_requeues(cluster, tmp_path):
    """A job that reaches its time limit: SLURM ends it (Reason=TimeLimit), its SIGTERM reaches the batch shell and
    train.py, training saves, the script requeues (restart 1), and the restart resumes from that checkpoint.

    SLURM's shortest --time is 1 minute and slurmctld tests time limits only every 30 s (PERIODIC_TIMEOUT, compiled
    in), so a --time=1 job would end 60-90 s after it starts; and with the script's `--signal=B:USR1@120` it would
    get the USR1 warning at the first test, never reaching its limit. So the limit is shortened on the running job
    instead: `scontrol update EndTime=<now>` (which also sets TimeLimit), and the job ends at slurmctld's next
    time-limit test, 0-30 s later. (An end even one second later could meet that test first, which then sends only
    the USR1 warning: the preemption path, tested above.) At the limit SLURM sends the warning (USR1, not sent yet)
    and SIGTERM in the same second, as to any job whose warning came too late: the log shows both. The job waits
    for its limit held after its save at step 40, so it is surely mid-run when the limit comes."""
    job, out = submit(cluster, tmp_path, "slurm/train.sbatch", HELD_RUN, **HOLD)
    wait_held(cluster, job, out)
    for _ in range(5):   # EndTime=now: a time already past is refused, so try again when the second turns
        proc = cluster.run(["scontrol", "update", f"JobId={job}", f"EndTime={time.strftime('%Y-%m-%dT%H:%M:%S')}"])
        if proc.returncode == 0 or "Invalid time" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr
    try:
        release(cluster, job, out)      # on whichever of the limit's USR1 and SIGTERM reaches train.py first
        wait_restarted(cluster, job, 1, timeout=75, running=False)
        stopped = re.search(r"^stopped: SIG\w+ at step (\d+); checkpoint (\S+);", read(out), re.M)
        assert stopped, read(out)[-4000:]
        assert verify(stopped[2]) is None      # now: the restart, run to its end, prunes it
        # the restart would keep the lowered 1-minute limit, and so get the USR1 warning at slurmctld's next check
        proc = cluster.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"])
        assert proc.returncode == 0, proc.stderr
        info = cluster.wait(job, {"COMPLETED"}, timeout=150)
        log = read(out)
    finally:
        cluster.run(["scancel", job])   # a no-op once the job is over; else (a failure above) no job is left behind
    assert f"JOB {job} ON {cluster.host} CANCELLED AT" in log and "DUE TO TIME LIMIT" in log, log[-4000:]
    assert "SIGTERM received" in log, log[-4000:]
    assert "stopped with a checkpoint: requeueing (restart 1 of at most 10)" in log, log[-4000:]
    assert "restart 1 of this job: resuming" in log and f"resuming from {stopped[2]} (step {stopped[1]}," in log, \
        log[-4000:]
    assert info["Restarts"] == "1" and "training finished" in log, log[-4000:]    # the restart runs to the end


@pytest.mark.slow
def test_ci_fails_when_the_cluster_cannot_run(tmp_path):
    """The cluster fixture, in a pytest of its own with SLURM missing and no apt-get to install it (PATH emptied):
    under CI=true as root the SLURM tests fail, naming why; without CI=true they are skipped with the reason. (The
    skip for a user who is not root is the fixture's first line; it is not run here because this interpreter may
    live where other users cannot run it, as in /root/.pyenv.)"""
    if os.geteuid() != 0:
        pytest.skip("the fail-under-CI rule is for root; this run is not root")
    empty = tmp_path / "empty"
    empty.mkdir()
    procs = {}
    try:
        for name, ci in (("ci", "true"), ("dev", "")):
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--basetemp={tmp_path / name}",
                 f"{ROOT}/tests/test_slurm.py::test_train_sbatch_runs_to_completion"],
                cwd=ROOT, env=env(PATH=str(empty), CI=ci), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        outputs = {name: (proc.communicate(timeout=120)[0], proc.returncode) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output, rc = outputs["ci"]
    assert rc == 1 and "1 error" in output and "CI=true as root, yet the local SLURM cluster cannot run" in output \
        and "slurmctld/slurmd/munge are not installed" in output, output[-3000:]
    output, rc = outputs["dev"]
    assert rc == 0 and "1 skipped" in output and "slurmctld/slurmd/munge are not installed" in output, output[-3000:]


def test_a_failed_save_is_not_requeued_even_behind_a_launcher(tmp_path):
    """train.py exits 74 when a checkpoint cannot be written (disk full); `accelerate launch` turns that into its own
    exit 1, so the scripts read the run folder's state (python -m cifar.run_folder state): save-failed is exit 74,
    logged as such, and never requeued. Both what train.py writes now and what it wrote before save-failed was a
    state (failed, with a SaveFailed error) read so."""
    for status in ('{"state": "save-failed", "error": "SaveFailed: could not save checkpoint"}\n',
                   '{"state": "failed", "error": "SaveFailed: could not save checkpoint"}\n'):
        (tmp_path / "status.json").write_text(status)
        script = ('source slurm/common.sh; MARKER=$(mktemp); touch -d "1 hour ago" "$MARKER"; run_status; '
                  'finish 74')
        proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                              env=env(RUN_DIR=str(tmp_path), PYTHON=sys.executable, SLURM_JOB_ID="7"))
        assert proc.returncode == 74, proc.stdout + proc.stderr
        assert proc.stdout.startswith("save-failed\n"), proc.stdout
        assert "a write to" in proc.stdout and "not requeueing" in proc.stdout and "requeueing (" not in proc.stdout


# ----------------------------------------------------------------------------- a sweep as a job array

# The tiny sweep of the array tests: 2 x 2 runs of 16 steps each (configs/debug.yaml on 256 images)
TINY = ["data.limit_train=256", "data.limit_test=128", "train.epochs=2", "checkpoint.every_steps=2"]


def write_sweep(tmp_path, fixed=TINY, parameters=("optim.lr: {values: [0.01, 0.05]}", "seed: {values: [0, 1]}"),
                name="tiny") -> str:
    """A W&B sweep file (grid) on configs/debug.yaml with `fixed` overrides in its command; returns its path."""
    command = ["${env}", "${interpreter}", "${program}", "--config", "configs/debug.yaml", *fixed, "${args_no_hyphens}"]
    lines = [f"name: {name}", "program: train.py", "method: grid", "command:", *(f"  - {w}" for w in command),
             "parameters:", *(f"  {p}" for p in parameters)]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def submit_sweep(cluster, tmp_path, sweep, array, **extra) -> tuple[str, str]:
    """sbatch --array=ARRAY slurm/sweep.sbatch SWEEP --runs-dir=TMP/runs; returns (array id, log with %a)."""
    return submit(cluster, tmp_path, "slurm/sweep.sbatch", [sweep, f"--runs-dir={tmp_path / 'runs'}"],
                  sbatch=[f"--array={array}"], output="slurm-%A_%a.out", **extra)


def local_sweep(*args) -> subprocess.Popen:
    """`python -m cifar.sweep ...` run here, as a user would, in the background."""
    return subprocess.Popen([sys.executable, "-m", "cifar.sweep", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_local(proc: subprocess.Popen, timeout=150) -> str:
    try:
        log, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log[-3000:]
    return log


def dry_run_folders(output: str) -> dict[int, str]:
    """The folder column of `python -m cifar.sweep --dry-run`'s table, by run index (a long folder wraps: rejoined)."""
    folders, index = {}, None
    for line in output.splitlines():
        cells = line.split("│")
        if len(cells) < 5:
            continue
        if cells[1].strip():
            index = int(cells[1])
            folders[index] = ""
        folders[index] += cells[2].strip()
    return folders


def assert_same_weights(run, reference):
    a, b = weights(run), weights(reference)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{run} and {reference}: weights differ in {different}"


@pytest.mark.slow
def test_sweep_array_matches_the_local_runner(cluster, tmp_path):
    """`sbatch --array=0-3 slurm/sweep.sbatch SWEEP --runs-dir=D`: every task COMPLETED, once, in exactly the folders
    `python -m cifar.sweep SWEEP --runs-dir D --dry-run` lists (which then calls them finished), and run 1's weights
    equal bitwise those of `python -m cifar.sweep SWEEP --index 1` run here."""
    sweep = write_sweep(tmp_path)
    reference = local_sweep(sweep, "--runs-dir", str(tmp_path / "local"), "--index", "1")
    try:
        job, out = submit_sweep(cluster, tmp_path, sweep, "0-3")
        infos = [cluster.wait(f"{job}_{i}", {"COMPLETED"}, timeout=150) for i in range(4)]
    finally:
        finish_local(reference)
    for i, info in enumerate(infos):
        log = read(out.replace("%a", str(i)))
        assert info["Restarts"] == "0" and info["ExitCode"] == "0:0", log[-3000:]
        assert f"slurm job {job}_{i}]" in log and f"run {i} (task {job}_{i} = job {info['JobId']})" in log, log[-3000:]
        assert log.count("starting in") == 1 and "training finished" in log, log[-3000:]

    # The dry run from TMP (its table cuts long folders short) with --runs-dir runs: the same folders, written short
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")   # the recipe, as in the project folder
    dry = subprocess.run([sys.executable, "-m", "cifar.sweep", sweep, "--runs-dir", "runs", "--dry-run"],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    listed = {i: str(tmp_path / folder) for i, folder in dry_run_folders(dry.stdout).items()}
    made = sorted(str(p) for p in (tmp_path / "runs" / "tiny").iterdir())
    assert sorted(listed.values()) == made and len(made) == 4, (dry.stdout, made)
    assert listed[1] == str(tmp_path / "runs" / "tiny" / "01-optim.lr=0.01,seed=1")
    assert dry.stdout.count(" finished ") == 4, dry.stdout
    for i, folder in listed.items():
        assert f"starting in {folder}\n" in read(out.replace("%a", str(i)))
    assert_same_weights(listed[1], tmp_path / "local" / "tiny" / "01-optim.lr=0.01,seed=1")
    a, b = weights(listed[0]), weights(listed[1])   # another seed: another model (the parameters reach train.py)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_usr1_to_one_array_task_requeues_that_task_alone(cluster, tmp_path):
    """USR1 to the batch shell of one task (what `--signal=B:USR1@N` sends it): that task saves, requeues alone, and
    resumes in its run folder to COMPLETED with the weights of an uninterrupted local run of that index; the other
    tasks run once. The task signalled is the last to start, 3, the one whose own SLURM_JOB_ID is the array's id:
    `scontrol requeue <array id>` would requeue every task of the array, finished ones too, so the script requeues
    <array id>_<task>."""
    sweep = write_sweep(tmp_path, fixed=["data.limit_train=1024", "data.limit_test=128", "train.epochs=4",
                                         "checkpoint.every_steps=20"])   # 128 steps a run, each held at 40
    job, out = submit_sweep(cluster, tmp_path, sweep, "0-3", **HOLD)
    run = tmp_path / "runs" / "tiny" / "03-optim.lr=0.05,seed=1"
    for i in range(3):     # the others go on from their hold untouched, as they reach it (a core each, in turn)
        wait_held(cluster, f"{job}_{i}", out.replace("%a", str(i)))
        held_trainer(cluster, f"{job}_{i}").send_signal(signal.SIGUSR2)
    wait_held(cluster, f"{job}_3", out.replace("%a", "3"))
    assert cluster.job(f"{job}_3")["JobId"] == job, "task 3, the last to start, should hold the array's id"
    proc = cluster.run(["scancel", "--batch", "--signal=USR1", f"{job}_3"])
    assert proc.returncode == 0, proc.stderr
    release(cluster, f"{job}_3", out.replace("%a", "3"), "SIGUSR1")
    # the uninterrupted run, here, while task 3 waits to restart (a core is free)
    reference = local_sweep(sweep, "--runs-dir", str(tmp_path / "local"), "--index", "3")
    try:
        infos = [cluster.wait(f"{job}_{i}", {"COMPLETED"}, timeout=150) for i in range(4)]
    finally:
        finish_local(reference)
    log = read(out.replace("%a", "3"))
    assert [info["Restarts"] for info in infos] == ["0", "0", "0", "1"], log[-4000:]
    assert "SIGUSR1 received" in log and "requeueing (restart 1" in log, log[-4000:]
    assert "restart 1 of this job: resuming" in log and "training finished" in log, log[-4000:]
    assert f"resuming from {run}/checkpoints/step-{HELD_AT + 1} (step {HELD_AT + 1}," in log, log[-4000:]
    assert log.count("starting in") == 1, "the task's output file should hold both its runs, the first once"
    for i in range(3):
        other = read(out.replace("%a", str(i)))
        assert "SIGUSR1" not in other and "restart 1" not in other and "training finished" in other, other[-3000:]
    assert_same_weights(run, tmp_path / "local" / "tiny" / run.name)


@pytest.mark.slow
def test_sweep_array_bad_index_fails_at_once(cluster, tmp_path):
    """`--array=5` on a 4-run sweep, and a sweep file whose parameter train.py does not know: each task fails at once
    (exit 2, Restarts=0, no training) with cifar.sweep's one `error:` line in its log, no traceback."""
    sweep = write_sweep(tmp_path)
    bad = write_sweep(tmp_path, parameters=("optim.nosuch: {values: [1, 2]}",), name="bad")
    jobs = {"index": (*submit_sweep(cluster, tmp_path, sweep, "5"), 5,
                      "run index 5 is outside this sweep's runs 0..3"),
            "file": (*submit_sweep(cluster, tmp_path, bad, "0"), 0, "nosuch")}
    for what, (job, out, task, message) in jobs.items():
        info = cluster.wait(f"{job}_{task}", {"FAILED"}, timeout=60)
        log = read(out.replace("%a", str(task)))
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], log
        assert "Traceback" not in log and "starting in" not in log, log
        assert f"--index {task} --print-args exited 2 (the reason is above): not training, not requeueing" in log, log
        assert info["ExitCode"] == "2:0" and info["Restarts"] == "0", (info["ExitCode"], info["Restarts"], log)
    assert not (tmp_path / "runs").exists()


def test_sweep_sbatch_outside_an_array_says_how_to_submit(tmp_path):
    """Run without --array (no SLURM_ARRAY_TASK_ID): one line naming the fix, exit 2, before any Python runs."""
    env_ = env(PYTHON="/nonexistent/python", SLURM_JOB_ID="7")
    env_.pop("SLURM_ARRAY_TASK_ID", None)
    proc = subprocess.run(["bash", "slurm/sweep.sbatch", "configs/sweeps/debug-lr-seed.yaml"], cwd=ROOT,
                          capture_output=True, text=True, env=env_, timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: not an array task: submit with sbatch --array=0-N" in proc.stderr, proc.stderr
    assert "configs/sweeps/debug-lr-seed.yaml --slurm" in proc.stderr and not proc.stdout, proc.stdout
