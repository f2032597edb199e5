"""launch/slurm/dig_grpo.sbatch submitted for real to a two-node SLURM cluster on this machine.

The test starts munged (unless one already answers), slurmctld and two slurmd (`slurmd -N dig1`, `-N dig2`: one
host, two SLURM nodes, each with its own port and spool) with a private slurm.conf (own ports, state in tmp),
and stops the daemons it started (by pid). `sbatch --nodes=2` then runs the script as users do: a Ray head on
dig1 and a Ray worker on dig2 through srun (own ports and RAY_TMPDIR, so no Ray state lands in /tmp/ray), the
join wait until 2 nodes are alive, the curriculum on the head with trainer.nnodes=2 and the GPU count, and a
USR1 (the time-limit signal) after which the job requeues itself, stops Ray, restarts and skips the finished
stages. Dry-run mode and real mode (GPUs declared to Ray; the trainer is interrupted by the requeue before it
needs them). Needs root and Debian's slurm-wlm + munge (`bash scripts/setup_slurm.sh` installs them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from ray_local import free_port_range, free_ports, ray_processes
from test_launch import LAUNCH_ENV_KEYS, dirs, write_stage_parquet
from tiny_qwen import save_tiny_checkpoint

from dig_common.models import load_model_spec
from recipes.dig.handoff import DONE_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.verl]

REPO = Path(__file__).resolve().parents[1]
NODES = ("dig1", "dig2")
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
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldPort={free_port()}
SlurmctldLogFile={root}/slurmctld.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
ReturnToService=2
MpiDefault=none
SlurmdSpoolDir={root}/spool/%n
SlurmdPidFile={root}/slurmd.%n.pid
SlurmdLogFile={root}/slurmd.%n.log
NodeName=dig1 NodeHostname={node} NodeAddr=127.0.0.1 Port={free_port()} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
NodeName=dig2 NodeHostname={node} NodeAddr=127.0.0.1 Port={free_port()} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
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
    for name in NODES:
        (root / "spool" / name).mkdir(parents=True)
        subprocess.run(["slurmd", "-f", str(conf), "-N", name], env=env, check=True)
    try:
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            if state.split() == ["idle"] * len(NODES):
                break
            time.sleep(1)
        assert state.split() == ["idle"] * len(NODES), f"SLURM nodes not idle ({state!r}); see {root}/*.log"
        yield env, root
    finally:
        for name in NODES:
            stop_pid_file(root / f"slurmd.{name}.pid")
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


@contextlib.contextmanager
def ray_environment(tmp_path: Path):
    """Free ports for the head and the worker (one host, two Ray nodes) and a short private RAY_TMPDIR."""
    temp_dir = Path(tempfile.mkdtemp(prefix="digray", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port, client, head_agent, worker_agent = free_ports(4)
    head_workers = free_port_range()
    worker_workers = free_port_range(after=head_workers + 64)
    try:
        yield {
            "RAY_PORT": str(port),
            "RAY_TMPDIR": str(temp_dir),
            "RAY_JOIN_TIMEOUT": "180",
            "RAY_HEAD_ARGS": f"--include-dashboard=false --ray-client-server-port={client} "
            f"--dashboard-agent-listen-port={head_agent} --min-worker-port={head_workers} "
            f"--max-worker-port={head_workers + 63}",
            "RAY_WORKER_ARGS": f"--dashboard-agent-listen-port={worker_agent} --min-worker-port={worker_workers} "
            f"--max-worker-port={worker_workers + 63}",
        }
        deadline = time.monotonic() + 30
        while ray_processes(temp_dir) and time.monotonic() < deadline:
            time.sleep(1)
        assert ray_processes(temp_dir) == [], "the job left Ray processes behind"
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(env: dict, log: Path, *overrides: str) -> str:
    result = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=2",
            f"--output={log}",
            f"--chdir={REPO}",
            "launch/slurm/dig_grpo.sbatch",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def requeue_and_restart(job: str, env: dict, log: Path) -> None:
    """The time-limit signal: the job requeues itself; SLURM holds a requeued job back a while, start it now."""
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    wait_for(lambda: job_field(job, "Restarts", env) == "1", 120, "the requeue", log)
    wait_for(lambda: job_field(job, "JobState", env) == "PENDING", 120, "the requeued job to pend", log)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)


def base_env(env: dict, tmp_path: Path, ray_env: dict) -> dict:
    env = {k: v for k, v in env.items() if k not in LAUNCH_ENV_KEYS and not k.startswith("RAY_")}
    env.update(ray_env, STAGE="all")
    return env


def test_sbatch_two_nodes_curriculum_dry_run_with_requeue(local_slurm, tmp_path):
    """Submit on 2 nodes, let Ray come up (head + worker), send USR1: the job requeues itself and restarts, and
    the second run goes through the whole curriculum dry run with trainer.nnodes=2 and stops Ray."""
    env, _ = local_slurm
    with ray_environment(tmp_path) as ray_env:
        env = base_env(env, tmp_path, ray_env)
        env.update(DRY_RUN="1")
        log = tmp_path / "job.out"
        job = submit(env, log, *dirs(tmp_path), "base_model=qwen3_vl_4b_thinking", "trainer.total_epochs=2")
        try:
            wait_for(lambda: log.exists() and "Ray nodes alive: 2/2" in log.read_text(), 240, "two Ray nodes", log)
            requeue_and_restart(job, env, log)
            wait_for(lambda: job_field(job, "JobState", env) in ("COMPLETED", "FAILED", ""), 300, "the job end", log)
        finally:
            subprocess.run(["scancel", job], env=env, capture_output=True)
    text = log.read_text()
    assert job_field(job, "JobState", env) in ("COMPLETED", ""), text[-6000:]
    first, _, second = text.partition("requeueing job")
    assert second, text[-6000:]
    assert "2 node(s) [dig1 dig2]" in first and "Ray nodes alive: 2/2" in first and "curriculum: done" not in first
    assert text.count("slurm job") == 2 and "2 node(s) [dig1 dig2]" in second and "Ray nodes alive: 2/2" in second
    for stage in (1, 2, 3):
        assert f"DRY_RUN: stage {stage} OK" in second
    assert "[dig] GPUs: 2 node(s) x 8" in second
    commands = [line for line in second.splitlines() if line.startswith("[dig] command: ")]
    assert len(commands) == 3
    # nnodes from SLURM's allocation; GPUs per node stays dig_grpo.yaml's 8 in a dry run (no GPU count given)
    assert all("trainer.nnodes=2" in c and "trainer.total_epochs=2" in c for c in commands)
    assert "curriculum: done" in second and "finished with rc=0" in second
    assert text.count("[dig] stopping Ray") == 2  # both runs stop their Ray cluster


def test_sbatch_two_nodes_real_run_requeue_skips_the_finished_stage(local_slurm, tmp_path):
    """DRY_RUN=false (a real run, as for the launcher) on 2 nodes with GPUs declared to Ray: the head's launcher
    plans stage 1 with trainer.nnodes=2 x 8 GPUs and starts the trainer; stage 1 is then marked finished, USR1
    requeues the job, and the restarted job skips stage 1 and starts stage 2 on its merged weights."""
    env, _ = local_slurm
    spec = load_model_spec("qwen2_5_vl_3b")
    tiny = save_tiny_checkpoint("qwen2_5_vl", tmp_path / "tiny")
    for stage in (1, 2):
        for split in ("train", "val"):
            write_stage_parquet(
                tmp_path / "data" / spec.model_name / f"stage{stage}" / f"{split}.parquet",
                spec.min_pixels,
                spec.max_pixels,
            )
    with ray_environment(tmp_path) as ray_env:
        env = base_env(env, tmp_path, ray_env)
        env.update(
            DRY_RUN="false",
            INIT_MODEL=str(tiny),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
        )
        log = tmp_path / "job.out"
        settings = [*dirs(tmp_path), "base_model=qwen2_5_vl_3b", "trainer.logger=[console]"]
        settings.append("trainer.n_gpus_per_node=8")  # also the GPUs the sbatch script declares to Ray
        job = submit(env, log, *settings, "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2")

        def trainer_started(stage: int) -> bool:
            text = log.read_text() if log.exists() else ""
            return any(
                line.startswith("[dig] command: ") and f"stage=stage{stage}" in line
                for line in text.partition("requeueing job")[2 if stage == 2 else 0].splitlines()
            )

        try:
            wait_for(lambda: trainer_started(1), 300, "the stage 1 trainer", log)
            stage1 = tmp_path / "ckpt" / "dig" / "qwen2_5_vl_3b_stage1"
            shutil.copytree(tiny, stage1 / "hf_merged" / "global_step_4")
            (stage1 / DONE_MARKER).write_text(json.dumps({"global_step": 4, "stage": 1, "model": "qwen2_5_vl_3b"}))
            requeue_and_restart(job, env, log)
            wait_for(lambda: trainer_started(2), 300, "the stage 2 trainer after the requeue", log)
            subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)  # stop it the same way
            wait_for(lambda: log.read_text().count("[dig] stopping Ray") == 2, 120, "Ray to stop", log)
        finally:
            subprocess.run(["scancel", job], env=env, capture_output=True)
            wait_for(
                lambda: job_field(job, "JobState", env) in ("CANCELLED", "COMPLETED", "FAILED", ""),
                120,
                "the job to end",
                log,
            )
    text = log.read_text()
    first, _, second = text.partition("requeueing job")
    for part in (first, second):
        assert "2 node(s) [dig1 dig2]" in part and "Ray nodes alive: 2/2" in part
        assert "[dig] GPUs: 2 node(s) x 8" in part and "DRY_RUN" not in part
    assert "[dig] init weights: " + str(tiny) + " [INIT_MODEL (explicit), checked: config.json and " in first
    assert "[dig] curriculum: stage 1 already finished" in second
    assert (
        f"[dig] init weights: {stage1 / 'hf_merged' / 'global_step_4'} [stage 1 global_step_4, already merged]"
        in second
    )
    for part, stage in ((first, 1), (second, 2)):
        command = next(line for line in part.splitlines() if line.startswith("[dig] command: "))
        assert f"stage=stage{stage}" in command and "trainer.nnodes=2" in command
        assert "trainer.n_gpus_per_node=8" in command and "base_model=qwen2_5_vl_3b" in command
