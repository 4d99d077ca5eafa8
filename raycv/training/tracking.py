"""What rank 0 records of a run: the per-epoch metrics log, loss and learning rate every N
optimizer steps, TensorBoard event files, and an MLflow run when one is configured. Everything lands in the run directory, local or on
object storage (which cannot append: small logs are rewritten whole, event files are uploaded
after each epoch)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from raycv.data import io as fsio
from raycv.errors import UserError

METRICS_LOG = "metrics.jsonl"  # one line per epoch
STEPS_LOG = "steps.jsonl"  # one line every `train.log_every_steps` optimizer steps
STARTUP = "startup.json"  # when rank 0's process started, its loop began, its first step ended
PROGRESS = "progress.json"  # where the current epoch stands, rewritten every few seconds (the driver shows it)
TENSORBOARD = "tensorboard"
MLFLOW_RUN_ID = "mlflow_run_id"  # the MLflow run this run logs to: a resumed run continues it


class JsonLines:
    """A small JSON-lines file rewritten whole and atomically on `flush`. On resume, lines of
    epochs that will be trained again are dropped (no duplicates)."""

    def __init__(self, path: str, resume_epoch: int):
        self.path = path
        old = fsio.read_text(path) or ""
        self.lines = [ln for ln in old.splitlines() if ln and json.loads(ln).get("epoch", 0) < resume_epoch]
        self.flush()

    def add(self, record: dict[str, Any]) -> None:
        self.lines.append(json.dumps(record))

    def flush(self) -> None:
        fsio.write_text(self.path, "".join(ln + "\n" for ln in self.lines))


class RunLogger:
    def __init__(self, run_dir: str, resume_epoch: int, *, steps_done: int, every_steps: int, tensorboard: bool = True,
                 mlflow: dict[str, Any] | None = None):
        self.run_dir, self.every, self.global_step = run_dir, every_steps, steps_done
        self.metrics = JsonLines(fsio.join(run_dir, METRICS_LOG), resume_epoch)
        self.steps = JsonLines(fsio.join(run_dir, STEPS_LOG), resume_epoch)
        self.writer, self._tb_local, self._tb_remote = None, None, None
        if tensorboard:
            self._open_tensorboard()
        self.mlflow = open_mlflow(run_dir, **mlflow) if mlflow else None
        self.progress_every_s = 5.0 if "://" in run_dir else 2.0  # object storage: fewer PUTs
        self._progress_at, self._progress_epoch = 0.0, None

    def startup(self, times: dict[str, float]) -> None:
        """Rank 0's start-up of this attempt (wall-clock times: its process started, the training
        function entered, the model ready, the first batch, the first step), for the driver."""
        try:
            fsio.write_text(fsio.join(self.run_dir, STARTUP), json.dumps(times))
        except OSError:
            pass

    def progress(self, *, epoch: int, epochs: int, images: int, total: int, seconds: float) -> None:
        """Where the epoch stands (`images` of `total`, all ranks): at an epoch's first batch, then
        at most every few seconds."""
        if epoch == self._progress_epoch and time.monotonic() - self._progress_at < self.progress_every_s:
            return
        self._progress_at, self._progress_epoch = time.monotonic(), epoch
        record = {"epoch": epoch, "epochs": epochs, "images": images, "total": total, "seconds": seconds,
                  "time": time.time()}
        try:
            fsio.write_text(fsio.join(self.run_dir, PROGRESS), json.dumps(record))
        except OSError:  # a progress display is not worth failing a training step for
            pass

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the tensorboard package is a dependency; stay usable without it
            return
        target = fsio.join(self.run_dir, TENSORBOARD)
        if "://" in target:  # event files are written locally and uploaded after each epoch
            self._tb_local, self._tb_remote = tempfile.mkdtemp(prefix="raycv-tb-"), target
        else:
            self._tb_local = target
        # purge_step: a resumed run drops events past its checkpoint (written by the attempt that died)
        self.writer = SummaryWriter(self._tb_local, purge_step=self.global_step + 1 if self.global_step else None)

    def step(self, *, epoch: int, loss: float, lr: float, grad_norm: float | None = None) -> None:
        """One optimizer step; `grad_norm`: the gradient norm before clipping (with clipping on)."""
        self.global_step += 1
        if self.every and self.global_step % self.every == 0:
            norm = {} if grad_norm is None else {"grad_norm": grad_norm}
            self.steps.add({"epoch": epoch, "step": self.global_step, "loss": loss, "lr": lr, **norm, "time": time.time()})
            if self.writer is not None:
                self.writer.add_scalar("train/loss_step", loss, self.global_step)
                self.writer.add_scalar("train/lr", lr, self.global_step)
                if grad_norm is not None:
                    self.writer.add_scalar("train/grad_norm", grad_norm, self.global_step)
            if self.mlflow is not None:
                self.mlflow.log_metrics({"loss_step": loss, "lr_step": lr, **norm}, step=self.global_step)

    def epoch(self, record: dict[str, Any]) -> None:
        self.metrics.add(record)
        self.metrics.flush()
        self.steps.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in record.items() if _is_number(v) and k != "epoch"},
                                    step=int(record["epoch"]))
        if self.writer is not None:
            for key, value in record.items():
                if _is_number(value) and key not in ("epoch", "epochs", "time", "started_at_epoch"):
                    group = "val" if key.startswith("val_") else "gpu" if key.startswith("gpu_") else "train"
                    self.writer.add_scalar(f"{group}/{key.removeprefix('val_')}", value, self.global_step)
            self.writer.flush()
            self._upload()

    def _upload(self) -> None:
        if self._tb_remote is None:
            return
        for f in Path(self._tb_local).rglob("*"):
            if f.is_file():
                fsio.write_bytes(fsio.join(self._tb_remote, f.relative_to(self._tb_local).as_posix()), f.read_bytes())

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.writer is not None:
            self.writer.close()
            self._upload()
            if self._tb_remote is not None:
                shutil.rmtree(self._tb_local, ignore_errors=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}: MLflow params are flat."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def allow_file_store(tracking_uri: str) -> None:
    """MLflow 3 keeps its file store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE; a path or
    file: URI as the tracking URI is the user's explicit choice of it."""
    import os

    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def open_mlflow(run_dir: str, *, tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any]):
    """Start (or, on resume, continue) this run's MLflow run through Ray's `setup_mlflow`; return
    the mlflow module. Params are logged once: a resumed run may change values such as
    train.epochs, which MLflow refuses to overwrite."""
    import os

    from ray.air.integrations.mlflow import setup_mlflow

    allow_file_store(tracking_uri)
    id_file = fsio.join(run_dir, MLFLOW_RUN_ID)
    existing = (fsio.read_text(id_file) or "").strip()
    if existing:
        os.environ["MLFLOW_RUN_ID"] = existing  # mlflow.start_run continues the run named here
    mlflow = setup_mlflow(config=None if existing else params, tracking_uri=tracking_uri, experiment_name=experiment,
                          run_name=run_name, create_experiment_if_not_exists=True, rank_zero_only=False)
    if not existing:
        fsio.write_text(id_file, mlflow.active_run().info.run_id)
    return mlflow


def startup_marks(marks: dict[str, float], run_dir: str) -> dict[str, float]:
    """Seconds from this process's start to each of the driver's `marks` (wall-clock times), then to
    rank 0's from the run's startup.json (its last attempt's, when that attempt trained a step)."""
    import psutil

    zero = psutil.Process().create_time()
    worker = json.loads(fsio.read_text(fsio.join(run_dir, STARTUP)) or "{}")
    if worker.get("first_step", 0) < marks["trainer_fit"]:  # an earlier run's: this one trained nothing
        worker = {}
    return {k: round(t - zero, 2) for k, t in {**marks, **worker}.items()}


def mlflow_tracking_uri(configured: str | None, echo: Callable[[str], None]) -> str | None:
    """The driver's choice: run.mlflow_tracking_uri (`configured`), else $MLFLOW_TRACKING_URI when
    mlflow is installed, else None (off)."""
    import importlib.util

    installed = importlib.util.find_spec("mlflow") is not None
    if configured:
        if not installed:
            raise UserError("run.mlflow_tracking_uri is set but mlflow is not installed: pip install 'raycv[mlflow]'")
        return configured
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and not installed:
        echo("raycv: $MLFLOW_TRACKING_URI is set but mlflow is not installed: not logging to MLflow")
    return uri if uri and installed else None


def mlflow_artifacts(tracking_uri: str, run_dir: str, echo: Callable[[str], None]) -> None:
    """The finished run's curves, summary and metrics log as artifacts of its MLflow run."""
    run_id = (fsio.read_text(fsio.join(run_dir, MLFLOW_RUN_ID)) or "").strip()
    if not run_id:
        return
    try:
        from mlflow.tracking import MlflowClient

        allow_file_store(tracking_uri)
        client = MlflowClient(tracking_uri)
        with tempfile.TemporaryDirectory(prefix="raycv-mlflow-") as tmp:
            for name in ("curves.png", "summary.json", METRICS_LOG):
                try:
                    data = fsio.read_bytes(fsio.join(run_dir, name))
                except FileNotFoundError:
                    continue
                local = os.path.join(tmp, name)
                with open(local, "wb") as f:
                    f.write(data)
                client.log_artifact(run_id, local)
        client.set_terminated(run_id)
    except Exception as e:  # the run itself is done and saved; MLflow is a view of it
        echo(f"raycv: could not log artifacts to MLflow: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
