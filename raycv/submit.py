"""`raycv submit` and `raycv jobs`: send a raycv verb to a Ray cluster as a Ray job, and follow it.

The job runs `python jobs/<verb>.py ...` (or `python -m raycv.cli <verb> ...` when the working
directory has no jobs/) on the cluster through Ray's `JobSubmissionClient`. The config is
validated here first, so a wrong key fails in a second instead of after an upload. Token
authentication is Ray's own: with `RAY_AUTH_MODE=token` and the token in `RAY_AUTH_TOKEN` or the
file named by `RAY_AUTH_TOKEN_PATH` (default ~/.ray/auth_token), every request carries it.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from raycv.errors import UserError

JOB_VERBS = ("train", "tune", "infer", "evaluate")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobRequest:
    verb: str
    args: list[str]  # the verb's own arguments: --config FILE, --checkpoint ..., key=value ...
    address: str | None = None
    working_dir: str = "."
    pip: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    num_cpus: float | None = None
    num_gpus: float | None = None
    resources: dict[str, float] = field(default_factory=dict)
    submission_id: str | None = None


def job_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no cluster address: pass --address http://<head>:8265 or set RAY_ADDRESS")
    if "://" not in address:  # `ray job submit` accepts host:port; the job server speaks HTTP
        address = f"http://{address}"
    return address


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = job_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as e:
        raise UserError(f"cannot reach the Ray job server at {url}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def validate_locally(verb: str, config: str | None, overrides: list[str], working_dir: Path) -> None:
    """Load the verb's config as the cluster will, so a wrong key fails before anything is uploaded.
    `overrides` are the verb's dotted overrides (the CLI turns its flags into them)."""
    from raycv.config import load_config

    if verb not in JOB_VERBS:
        raise UserError(f"cannot submit {verb!r}: choose one of {', '.join(JOB_VERBS)}")
    if config:
        p = Path(config)
        resolved = (working_dir / p).resolve() if not p.is_absolute() else p
        try:
            resolved.relative_to(working_dir.resolve())
        except ValueError:
            raise UserError(f"--config {config} lies outside the working directory {working_dir}, "
                            "so the job could not read it; put it inside or pass --working-dir") from None
        config = str(resolved)
    if verb in ("train", "tune", "infer"):
        load_config(verb, config, overrides)


def entrypoint(verb: str, args: list[str], working_dir: Path) -> str:
    script = Path("jobs") / f"{verb}.py"
    cmd = ["python", str(script)] if (working_dir / script).is_file() else ["python", "-m", "raycv.cli", verb]
    return shlex.join([*cmd, *args])


def submit(req: JobRequest) -> tuple[str, object]:
    """Submit a request whose config was validated (`validate_locally`); -> (submission id, the
    client that submitted it)."""
    wd = Path(req.working_dir).expanduser()
    if not wd.is_dir():
        raise UserError(f"--working-dir {req.working_dir} is not a folder")
    runtime_env: dict = {"working_dir": str(wd.resolve())}
    if req.pip:
        runtime_env["pip"] = list(req.pip)
    if req.env:
        runtime_env["env_vars"] = dict(req.env)
    sid = req.submission_id or f"raycv-{req.verb}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    c = client(req.address)
    try:
        job_id = c.submit_job(
            entrypoint=entrypoint(req.verb, req.args, wd), submission_id=sid, runtime_env=runtime_env,
            entrypoint_num_cpus=req.num_cpus, entrypoint_num_gpus=req.num_gpus,
            entrypoint_resources=req.resources or None, metadata={"raycv_verb": req.verb},
        )
    except Exception as e:
        raise UserError(f"the Ray job server at {job_address(req.address)} refused the job: {_first_line(e)}") from None
    return job_id, c


def follow(c, job_id: str, echo: Callable[[str], None] = lambda s: print(s, end="", flush=True)) -> str:
    """Stream the job's logs until it ends; -> its final status."""

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            echo(lines)

    try:
        asyncio.run(tail())
    except Exception:  # the log stream can drop (head restart); the status below is what counts
        pass
    while (status := str(c.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(1)
    return status


def call(address: str | None, what: str, fn: Callable):
    """One job-server request with a one-line error."""
    c = client(address)
    try:
        return fn(c)
    except Exception as e:
        raise UserError(f"{what}: {_first_line(e)}") from None


def describe(job) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
    return f"{job.submission_id or job.job_id:<40} {str(job.status.value):<10} {started}  {job.entrypoint}"
