"""The SLURM scripts on a real local cluster (munge + slurmctld + slurmd, see tests/slurm_cluster.py): lint, a job to
COMPLETED, two "machines" rendezvousing through multinode.sbatch, and preemption -> checkpoint -> requeue -> resume
ending with exactly the weights of an uninterrupted run.

Needs root (the cluster's daemons run as root) and the Debian packages slurmctld slurmd slurm-client munge (installed
on the fly with apt-get when missing); skipped with the reason otherwise. shellcheck is needed for its test only.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, env, read_json, weights
from slurm_cluster import SlurmCluster, Unavailable, alive, ensure_installed

SCRIPTS = ["slurm/train.sbatch", "slurm/multinode.sbatch", "slurm/common.sh"]
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]   # overrides of the scripts' GPU headers


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root; run the tests as root")
    try:
        ensure_installed()
    except Unavailable as e:
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


def submit(cluster, tmp_path, script, args, sbatch=(), **extra) -> tuple[str, str]:
    """sbatch from the project folder as a user would; returns (job id, its output file)."""
    out = str(tmp_path / "slurm-%j.out")
    job = cluster.sbatch([*CPU_JOB, f"--output={out}", *sbatch, script, *args], cwd=ROOT,
                         env=job_env(cluster, tmp_path, **extra))
    return job, out.replace("%j", job)


def read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def preempt_after_first_checkpoint(cluster, job, run, timeout=120):
    """Wait for DIR/checkpoints/step-*, then send SIGUSR1 to the batch shell only, as `--signal=B:USR1@N` does
    (which itself fires only within ~30 s of its time, too loose for a test)."""
    deadline = time.monotonic() + timeout
    while not glob.glob(str(run / "checkpoints" / "step-*")):
        info = cluster.job(job)
        assert info.get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"), \
            f"job ended before a checkpoint appeared in {run}/checkpoints\n{cluster.job_output(info)}"
        assert time.monotonic() < deadline, f"no checkpoint in {run}/checkpoints after {timeout} s\n" \
                                            f"{cluster.job_output(info)}"
        time.sleep(0.1)
    proc = cluster.run(["scancel", "--batch", "--signal=USR1", job])
    assert proc.returncode == 0, proc.stderr


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
def test_multinode_two_machines_rendezvous(cluster, tmp_path):
    """Two "machines" (two srun tasks on the one node) x 1 process: c10d rendezvous, world size 2."""
    job, out = submit(cluster, tmp_path, "slurm/multinode.sbatch", ["configs/debug.yaml", "train.epochs=1"],
                      sbatch=["--nodes=1", "--ntasks-per-node=2"], MACHINES_PER_NODE="2")
    info = cluster.wait(job, {"COMPLETED"}, timeout=150)
    run = tmp_path / "runs" / f"debug-job{job}"
    assert (run / "summary.json").exists(), cluster.job_output(info)
    assert read_json(run / "summary.json")["world_size"] == 2
    log = read(out)
    assert "--num_machines 2 --machine_rank 0" in log and "--rdzv_backend c10d" in log, log[-3000:]


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_exactly(cluster, tmp_path):
    """USR1 to the batch shell (what `--signal=B:USR1@N` sends) -> checkpoint, exit 75 -> requeue -> resume, finish;
    the final weights equal those of the same command run without interruption."""
    # 1536 steps: long enough that USR1 lands mid-run however idle the machine
    args = ["configs/debug.yaml", "train.epochs=6", "checkpoint.every_steps=20", "data.limit_train=8192"]
    reference = subprocess.Popen([sys.executable, "train.py", "--config", *args,
                                  f"output_dir={tmp_path / 'reference'}"], cwd=ROOT, env=env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        job, out = submit(cluster, tmp_path, "slurm/train.sbatch", args)
        run = tmp_path / "runs" / f"debug-job{job}"
        preempt_after_first_checkpoint(cluster, job, run)
        info = cluster.wait(job, {"COMPLETED"}, timeout=150)
        ref_log, _ = reference.communicate(timeout=150)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert reference.returncode == 0, ref_log[-3000:]

    log = read(out)
    assert info["Restarts"] == "1", log[-4000:]
    assert "SIGUSR1 received" in log and "requeueing (restart 1" in log, log[-4000:]
    assert "restart 1 of this job: resuming" in log and "training finished" in log, log[-4000:]
    assert log.count("starting in") == 1, "the output file should hold both runs of the job, the first once"
    assert (run / "summary.json").exists()
    resumed, uninterrupted = weights(run), weights(tmp_path / "reference")
    assert resumed.keys() == uninterrupted.keys()
    different = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert not different, f"weights differ after preemption + resume: {different}"


@pytest.mark.slow
def test_preempted_multinode_job_requeues_and_resumes(cluster, tmp_path):
    """The same on two machines: the batch shell passes USR1 to srun, srun to each machine's task, each task to its
    training process; the launchers report 75; the job requeues, both machines rendezvous again and finish."""
    args = ["configs/debug.yaml", "train.epochs=4", "checkpoint.every_steps=20", "data.batch_size=16",
            "data.limit_train=8192"]
    job, out = submit(cluster, tmp_path, "slurm/multinode.sbatch", args,
                      sbatch=["--nodes=1", "--ntasks-per-node=2"], MACHINES_PER_NODE="2")
    run = tmp_path / "runs" / f"debug-job{job}"
    preempt_after_first_checkpoint(cluster, job, run)
    info = cluster.wait(job, {"COMPLETED"}, timeout=150)
    log = read(out)
    assert info["Restarts"] == "1", log[-4000:]
    assert "training stopped with a checkpoint (status.json)" in log and "restart 1 of this job: resuming" in log, log[-4000:]
    assert read_json(run / "summary.json")["world_size"] == 2
