"""A private Ray head for tests: its own temp dir, free ports, GPUs declared (Ray accepts --num-gpus on a machine
without any), stopped by the process group it was started in, nothing left behind.

    with ray_head(tmp_path / "ray", num_gpus=8, num_cpus=16) as head:
        env["RAY_ADDRESS"] = head.address
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# `ray start` through this interpreter: Ray workers run the Python that started the raylet
RAY_START = [sys.executable, "-m", "ray.scripts.scripts", "start"]


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port_range(width: int = 64, after: int | None = None) -> int:
    """The first port of `width` consecutive free ports (Ray's worker port range)."""
    for start in range(after or 20000 + os.getpid() % 20000, 60000, width):
        with contextlib.ExitStack() as stack:
            try:
                for port in range(start, start + width):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return start
    raise RuntimeError("no free port range for Ray workers")


@dataclass
class RayHead:
    address: str
    token: str
    temp_dir: Path
    process: subprocess.Popen
    log: Path

    def env(self) -> dict:
        """What a driver needs to join this head and no other cluster."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}


def ray_processes(temp_dir: Path) -> list[str]:
    """Processes whose command line names this head's temp dir (raylet, gcs_server, workers...)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(temp_dir) in cmdline and "pytest" not in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


PORT_FLAGS = (
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "dashboard-agent-grpc-port",
    "dashboard-agent-listen-port",
    "runtime-env-agent-port",
)


@contextlib.contextmanager
def ray_head(temp_dir: Path, num_gpus: int, num_cpus: int, join_timeout: float = 90):
    temp_dir.mkdir(parents=True, exist_ok=True)
    port, *others = free_ports(1 + len(PORT_FLAGS))
    worker_start = free_port_range()
    log = temp_dir.parent / f"{temp_dir.name}.log"
    # every port the head opens on a free one: no clash with another Ray on this machine
    ports = dict(zip(PORT_FLAGS, others, strict=True))
    ports |= {"port": port, "min-worker-port": worker_start, "max-worker-port": worker_start + 63}
    command = [*RAY_START, "--head", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"]
    command += [f"--num-gpus={num_gpus}", f"--num-cpus={num_cpus}", "--include-dashboard=false"]
    command += ["--disable-usage-stats", *(f"--{flag}={value}" for flag, value in ports.items())]
    # `ray start` clusters require token authentication (Ray >= 2.5x): one random token per head
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # no idle worker pool: on a small CI box prestarting one Python per declared CPU takes minutes
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_enable_worker_prestart="0",
        RAY_prestart_worker_first_driver="0",
    )
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = RayHead(f"127.0.0.1:{port}", token, temp_dir, process, log)
    try:
        deadline = time.monotonic() + join_timeout
        while "Ray runtime started" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed (rc={process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield head
    finally:
        stop(head)


def stop(head: RayHead, timeout: float = 10) -> None:
    """SIGTERM to the head's process group (ray start --block and what it spawned), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.process.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while ray_processes(head.temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    for line in ray_processes(head.temp_dir):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.process.pid, signal.SIGKILL)
    head.process.wait(timeout=timeout)
