"""launch/slurm/dig_grpo.sbatch submitted for real to a single-node SLURM on localhost, in dry-run mode.

The test starts munged (unless one already answers), slurmctld and slurmd with a private slurm.conf (own ports,
state in tmp), submits the sbatch script, and stops the daemons it started (by pid). The job starts a real Ray
head through srun and waits for it to join; the test then sends the time-limit signal (USR1), the job requeues
itself and stops Ray; the requeued run does the curriculum dry run on the head node with trainer.nnodes from
SLURM and stops Ray. (One node only: Debian's slurmd cannot run several nodes on one host, so the worker loop
runs zero times here.) Needs root and Debian's slurm-wlm + munge
(`bash scripts/setup_slurm.sh` installs them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.verl]

REPO = Path(__file__).resolve().parents[1]
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "sinfo", "munged", "munge")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def munge_works() -> bool:
    return subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0


def stop_pid_file(pid_file: Path) -> None:
    if pid_file.is_file():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    # CI runs as root and scripts/test.sh installs SLURM there: a skip in CI would hide a broken setup
    unavailable = pytest.fail if os.environ.get("CI") else pytest.skip
    if missing:
        unavailable(f"SLURM/munge not installed ({', '.join(missing)}): run `bash scripts/setup_slurm.sh` as root")
    if os.geteuid() != 0:
        unavailable("a local slurmctld/slurmd/munged needs root")
    root = tmp_path_factory.mktemp("slurm")
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=digtest
SlurmctldHost={node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
ReturnToService=2
MpiDefault=none
NodeName={node} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )
    (root / "state").mkdir()
    (root / "spool").mkdir()
    env = dict(os.environ, SLURM_CONF=str(conf))
    munge_pid_file = None
    if not munge_works():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        munge_pid_file = root / "munged.pid"
        subprocess.run(["munged", "--force", f"--pid-file={munge_pid_file}"], check=True)
        deadline = time.monotonic() + 10
        while not munge_works() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert munge_works(), "munged did not start"
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True)
    try:
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            time.sleep(1)
        assert state == "idle", f"local SLURM node not idle ({state!r}); see {root}/slurmctld.log, slurmd.log"
        yield env, root
    finally:
        stop_pid_file(root / "slurmd.pid")
        stop_pid_file(root / "slurmctld.pid")
        if munge_pid_file:
            stop_pid_file(munge_pid_file)


def job_field(job_id: str, field: str, env: dict) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith(f"{field}=")), "")


def wait_for(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            text = log.read_text()[-6000:] if log.exists() else "(no log)"
            pytest.fail(f"timed out waiting for {what}\n--- job log ---\n{text}")
        time.sleep(1)


def test_sbatch_curriculum_dry_run_with_requeue(local_slurm, tmp_path):
    """Submit, let Ray come up, send the time-limit signal (USR1): the job requeues itself, restarts, and the
    second run goes through the whole curriculum dry run and stops Ray."""
    env, root = local_slurm
    env = {k: v for k, v in env.items() if k not in ("MODEL", "INIT_MODEL", "GPUS_PER_NODE", "NNODES", "LOGGER")}
    env.update(
        DRY_RUN="1",
        STAGE="all",
        MODEL="qwen3_vl_4b_thinking",
        CKPT_DIR=str(tmp_path / "ckpt"),
        DATA_DIR=str(tmp_path / "data"),
        RAY_PORT=str(free_port()),
        RAY_HEAD_ARGS="--include-dashboard=false",
        RAY_JOIN_TIMEOUT="120",
    )
    log = tmp_path / "job.out"
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", f"--chdir={REPO}", "launch/slurm/dig_grpo.sbatch",
         "trainer.total_epochs=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: log.exists() and "Ray nodes alive: 1/1" in log.read_text(), 180, "the Ray head", log)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
        wait_for(lambda: job_field(job, "Restarts", env) == "1", 120, "the requeue", log)
        # SLURM holds a requeued job back for a while; start it now
        wait_for(lambda: job_field(job, "JobState", env) == "PENDING", 120, "the requeued job to pend", log)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
        wait_for(lambda: job_field(job, "JobState", env) in ("COMPLETED", "FAILED", ""), 300, "the job end", log)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
    text = log.read_text()
    assert job_field(job, "JobState", env) in ("COMPLETED", ""), text[-6000:]
    first, _, second = text.partition("requeueing job")
    assert second, text[-6000:]
    assert "Ray nodes alive: 1/1" in first and "curriculum: done" not in first
    assert text.count("slurm job") == 2 and "1 node(s)" in second and "Ray nodes alive: 1/1" in second
    for stage in (1, 2, 3):
        assert f"DRY_RUN: stage {stage} OK" in second
    commands = [line for line in second.splitlines() if line.startswith("[dig] command: ")]
    assert len(commands) == 3
    assert all("trainer.nnodes=1" in c and "trainer.total_epochs=2" in c for c in commands)
    assert "curriculum: done" in second and "finished with rc=0" in second
    assert text.count("[dig] stopping Ray") == 2  # both runs stop their Ray cluster
