"""A real single-node SLURM cluster (munge + slurmctld + slurmd) in a private folder, for tests and by hand.

    with SlurmCluster(tmpdir) as cluster:          # starts in about a second; stops everything on exit
        job = cluster.sbatch(["slurm/train.sbatch", "configs/debug.yaml"], cwd=ROOT)
        cluster.wait(job, {"COMPLETED"})

    python tests/slurm_cluster.py [DIR]           # start one by hand; prints `export SLURM_CONF=...`; Ctrl-C stops it

Everything runs as root from DIR (state, spool, logs, pid files, munge key and socket) on free ports, so several
clusters (two test sessions at once) do not meet. Facts this relies on are in the notes on local SLURM:
daemons that exit linger as zombies here (PID 1 reaps late), so liveness is read from /proc/PID/status; pid
files vanish when a daemon stops, so pids are read before stopping.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

DAEMONS = ("slurmd", "slurmctld", "munged")   # stop order
INSTALL = ["slurmctld", "slurmd", "slurm-client", "munge"]


class Unavailable(Exception):
    """SLURM is not installed and cannot be installed here."""


def ensure_installed(timeout: int = 600) -> None:
    """Install the Debian packages when missing (as root, with apt-get); Unavailable when that is impossible."""
    if all(shutil.which(p) for p in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("slurmctld/slurmd/munge are not installed and this is not root with apt-get; run "
                          "`apt-get install -y --no-install-recommends " + " ".join(INSTALL) + "`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *INSTALL]
    tries = [install, ["apt-get", "update"], install]
    proc = None
    for cmd in tries:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if cmd is not tries[1] and proc.returncode == 0:
            break
    if not all(shutil.which(p) for p in ("slurmctld", "slurmd", "sbatch", "munged")):
        raise Unavailable(f"could not install SLURM with apt-get: {(proc.stderr or proc.stdout)[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Running, not a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split()[1] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
    return False


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def _wait_dead(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    pids = [p for p in pids if alive(p)]
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = [p for p in pids if alive(p)]
    return pids


class SlurmCluster:
    def __init__(self, base: str, cpus: int | None = None):
        self.base = os.path.abspath(base)
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.base, "etc", "slurm.conf")
        self.munge_socket = os.path.join(self.base, "munge", "munge.socket")
        self.pid_files = {name: os.path.join(self.base, "run", f"{name}.pid") for name in DAEMONS}
        self.pids: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle

    @property
    def env(self) -> dict:
        """os.environ plus SLURM_CONF: pass as env= to sbatch/squeue/scontrol (jobs inherit it)."""
        e = dict(os.environ, SLURM_CONF=self.conf)
        for key in [k for k in e if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del e[key]   # when run inside another allocation, its variables would leak into our jobs
        return e

    def start(self, timeout: float = 60) -> "SlurmCluster":
        ensure_installed()
        for d in ("etc", "run", "log", "state", "spool", "munge"):
            os.makedirs(os.path.join(self.base, d), exist_ok=True)
        os.chmod(os.path.join(self.base, "munge"), 0o755)
        key = os.path.join(self.base, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self._write_conf()
        try:
            self._daemon("munged", ["munged", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                                    f"--pid-file={self.pid_files['munged']}",
                                    f"--log-file={os.path.join(self.base, 'log', 'munged.log')}",
                                    f"--seed-file={os.path.join(self.base, 'munge', 'munge.seed')}"])
            self._daemon("slurmctld", ["slurmctld", "-f", self.conf])
            self._daemon("slurmd", ["slurmd", "-f", self.conf])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_conf(self) -> None:
        b = self.base
        lines = [
            "ClusterName=cifartest",
            # job ids (and so the scripts' rendezvous ports, 20000 + id % 20000) differ between clusters run at once
            f"FirstJobId={random.randrange(1000, 1_000_000)}",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",   # bounds the restart delay after a requeue
            "CredType=cred/munge",
            f"StateSaveLocation={b}/state",
            f"SlurmdSpoolDir={b}/spool",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={b}/log/slurmctld.log",
            f"SlurmdLogFile={b}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SchedulerParameters=bf_interval=1,sched_interval=1",   # else a requeued job waits ~30 s
            "KillWait=10",
            "MinJobAge=600",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _daemon(self, name: str, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} did not start (exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n"
                               f"{self.logs()}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = _read_pid(self.pid_files[name])
            if pid and alive(pid):
                self.pids[name] = pid
                return
            time.sleep(0.05)
        raise RuntimeError(f"{name} started but wrote no live pid to {self.pid_files[name]}\n{self.logs()}")

    def _wait_idle(self, timeout: float) -> None:
        deadline, state = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            try:
                state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env,
                                       timeout=5).stdout.strip()
            except subprocess.TimeoutExpired:
                state = "(sinfo timed out)"
            if state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"node not idle after {timeout:.0f} s (sinfo says {state!r})\n{self.logs()}")

    def logs(self, tail: int = 20) -> str:
        out = []
        for name in ("slurmctld", "slurmd", "munged"):
            path = os.path.join(self.base, "log", f"{name}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name}.log\n" + "".join(f.readlines()[-tail:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel jobs, stop the daemons, then end anything still carrying this cluster's SLURM_CONF."""
        if self.pids.get("slurmctld") and alive(self.pids["slurmctld"]):
            subprocess.run(["scancel", "--full", "--user=root"], capture_output=True, env=self.env, timeout=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.squeue(states="RUNNING,COMPLETING,PENDING,REQUEUED"):
                time.sleep(0.2)
        for name in DAEMONS:
            pid = self.pids.get(name) or _read_pid(self.pid_files[name])   # read before stopping: files vanish
            if pid and alive(pid):
                os.kill(pid, signal.SIGTERM)
                if _wait_dead([pid], 10):
                    os.kill(pid, signal.SIGKILL)
                    _wait_dead([pid], 5)
        leftover = self.stray_processes()
        for pid in leftover:   # slurmstepd and job processes of this cluster only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_dead(leftover, 5)
        self.pids = {}

    def stray_processes(self) -> list[int]:
        """Live processes (other than this one and its parents) whose environment names this cluster's conf."""
        mine, pid = set(), os.getpid()
        while pid > 1:   # self and ancestors
            mine.add(pid)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    pid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ValueError, IndexError):
                break
        needle = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in mine:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0") and alive(int(entry)):
                        found.append(int(entry))
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                pass
        return found

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ jobs

    def run(self, cmd: list[str], timeout: float = 20, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)

    def sbatch(self, args: list[str], **kw) -> str:
        proc = self.run(["sbatch", "--parsable", *args], **kw)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...); {} once it is forgotten."""
        proc = self.run(["scontrol", "show", "job", "-o", job_id], timeout=10)
        info = {}
        for field in proc.stdout.split():
            key, sep, value = field.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def squeue(self, states: str = "all") -> list[str]:
        proc = self.run(["squeue", "-h", "-t", states, "-o", "%i %T"], timeout=10)
        return proc.stdout.split("\n") if proc.stdout.strip() else []

    def wait(self, job_id: str, states: set[str], timeout: float, poll: float = 0.25) -> dict:
        """Poll until JobState is in `states`; on a final state outside them, or the timeout, fail with the logs."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        deadline, info = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in states:
                return info
            if state in final:
                break
            time.sleep(poll)
        raise AssertionError(f"job {job_id} is {info.get('JobState', '?')} (exit {info.get('ExitCode', '?')}), "
                             f"wanted {'/'.join(sorted(states))} within {timeout:.0f} s\n"
                             f"{self.job_output(info)}\n{self.logs(10)}")

    @staticmethod
    def job_output(info: dict, tail: int = 6000) -> str:
        path = info.get("StdOut", "")
        if path and os.path.exists(path):
            with open(path, errors="replace") as f:
                return f"--- {path}\n" + f.read()[-tail:]
        return "(no job output file)"


def main(argv: list[str]) -> None:
    import tempfile
    base = argv[0] if argv else tempfile.mkdtemp(prefix="slurm-")
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # `kill PID` stops it cleanly too
    with SlurmCluster(base) as cluster:
        print(f"cluster up in {base}\nexport SLURM_CONF={cluster.conf}\n(Ctrl-C stops it)", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main(sys.argv[1:])
