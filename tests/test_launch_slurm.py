"""launch/slurm/dig_grpo.sbatch submitted for real to a single-node SLURM on localhost, in dry-run mode.

The test starts munged (unless one already answers), slurmctld and slurmd with a private slurm.conf (own ports,
state in tmp), submits the sbatch script with `sbatch --wait`, and stops the daemons it started (by pid). The
job starts a real Ray head through srun, waits for it to join, runs the curriculum dry run on the head node
with trainer.nnodes from SLURM, and stops Ray. Needs root and Debian's slurm-wlm + munge
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
    if missing:
        pytest.skip(f"SLURM/munge not installed ({', '.join(missing)}): run `bash scripts/setup_slurm.sh`")
    if os.geteuid() != 0:
        pytest.skip("a local slurmctld/slurmd/munged needs root")
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


def test_sbatch_curriculum_dry_run_on_local_slurm(local_slurm, tmp_path):
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
    out_file = tmp_path / "job.out"
    result = subprocess.run(
        ["sbatch", "--wait", f"--output={out_file}", f"--chdir={REPO}", "launch/slurm/dig_grpo.sbatch",
         "trainer.total_epochs=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = out_file.read_text() if out_file.exists() else ""
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n--- job log ---\n{log[-6000:]}"
    assert "1 node(s)" in log and "Ray nodes alive: 1/1" in log
    for stage in (1, 2, 3):
        assert f"DRY_RUN: stage {stage} OK" in log
    commands = [line for line in log.splitlines() if line.startswith("[dig] command: ")]
    assert len(commands) == 3
    assert all("trainer.nnodes=1" in c and "trainer.total_epochs=2" in c for c in commands)
    assert "curriculum: done" in log and "finished with rc=0" in log and "stopping Ray" in log
