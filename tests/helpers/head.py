"""A real `ray start --head --block` on this host for tests: its own ports and temp dir, its own
process group, stopped by signalling that group only (never `ray stop`, which kills every Ray
process on the host)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without Ray addresses or auth settings; `python` resolves to this venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def session_token_env(**extra: str) -> tuple[dict[str, str], str]:
    """(clean_env with this test session's token auth, the token): a head started with it accepts this
    process's own Ray clients (state API, ray.init), which read the token from the same variables."""
    token = os.environ["RAY_AUTH_TOKEN"]  # tests/conftest.py sets it for the session
    return clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, **extra), token


class Head:
    """`token`: what the head expects (its env must say the same); every Ray release from 2.59 turns
    token authentication on for a head that finds a token file in ~/.ray, so tests always set one."""

    def __init__(self, temp: Path, env: dict[str, str], *extra_args: str, token: str | None = None,
                 gcs_port: int | None = None):
        self.temp, self.env, self.token = temp, env, token
        ports = {name: free_port() for name in ("dashboard", "agent", "metrics", "runtime_env", "client")}
        ports["gcs"] = gcs_port or free_port()
        self.address = f"http://127.0.0.1:{ports['dashboard']}"
        self.gcs_address = f"127.0.0.1:{ports['gcs']}"  # what ray.init / $RAY_ADDRESS take
        self._log = open(temp / "head.log", "w")
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={ports['dashboard']}", f"--dashboard-agent-listen-port={ports['agent']}",
             f"--metrics-export-port={ports['metrics']}", f"--runtime-env-agent-port={ports['runtime_env']}",
             f"--ray-client-server-port={ports['client']}", "--num-cpus=2", f"--temp-dir={temp}",
             "--disable-usage-stats", *extra_args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        deadline = time.monotonic() + 240  # a loaded 2-CPU machine has taken over 60 s to start a head
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(f"{self.address}/api/version", headers=headers), timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"ray start --head failed: {self.log_tail()}")
                time.sleep(1)

    def log_tail(self, n: int = 2000) -> str:
        return (self.temp / "head.log").read_text()[-n:]

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"} if self.token else None)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)  # the head and its children only
        try:  # raylet and dashboard go within ~3 s; `ray start --block` and the GCS never did (timed): then SIGKILL
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def local_cluster(prefix: str):
    """A `ray.cluster_utils.Cluster` whose 1-CPU head has its own temp dir and ports; -> (cluster,
    temp dir for the nodes added to it). Run in a helper process: it sets this process's RAY_TMPDIR."""
    import tempfile

    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix=prefix)
    # Cluster writes the head's address for auto-discovery into $RAY_TMPDIR/ray (default /tmp/ray,
    # shared with every Ray instance on the host and absent on a fresh machine): keep it in ours.
    os.environ["RAY_TMPDIR"] = temp
    os.makedirs(os.path.join(temp, "ray"))
    return Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, gcs_server_port=free_port(), temp_dir=temp, include_dashboard=False,
        dashboard_agent_listen_port=free_port())), temp


def hosts(node, marker: str) -> bool:
    """Whether a process under `node`'s raylet has `marker` in its command line (an actor's class)."""
    import psutil

    raylet = node.all_processes["raylet"][0].process.pid
    for p in psutil.Process(raylet).children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                return True
        except psutil.Error:
            continue
    return False
