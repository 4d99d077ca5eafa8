"""A run you can see: the epochs table and the training-curves PNG (loss, accuracy, learning rate,
throughput) drawn from the run's metrics log. `fit` draws it after training; `raycv report RUN_DIR`
prints the table and redraws it."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from raycv.data import io as fsio
from raycv.errors import UserError
from raycv.tasks import shown
from raycv.training.tracking import METRICS_LOG

CURVES = "curves.png"


@dataclass
class RunReport:
    run_dir: str
    epochs: list[dict]
    summary: dict | None
    plot: str | None

    def table(self) -> str:
        labels = [label for label, _ in shown(self.epochs[0])] if self.epochs else []
        head = (f"{'epoch':>5}  {'train_loss':>10}  {'val_loss':>8}  " + "".join(f"{lb:>8}  " for lb in labels)
                + f"{'lr':>9}  {'img/s':>7}")
        lines = [head]
        for m in self.epochs:
            lines.append(f"{m['epoch']:>5}  {m['train_loss']:>10.4f}  {m.get('val_loss', float('nan')):>8.4f}  "
                         + "".join(f"{v:>8.4f}  " for _, v in shown(m))
                         + f"{m['lr']:>9.2e}  {m['images_per_second']:>7,.0f}")
        if self.summary:
            metric = self.summary.get("checkpoint_metric", "val_accuracy")
            value = (self.summary.get("metrics") or {}).get(metric, self.summary.get(metric))
            lines.append(f"best checkpoint: {self.summary.get('best_checkpoint')} "
                         f"({metric} {value if value is not None else float('nan'):.4f})")
        if self.plot:
            lines.append(f"curves: {self.plot}")
        return "\n".join(lines)


def read_epochs(run_dir: str) -> list[dict]:
    text = fsio.read_text(fsio.join(run_dir, METRICS_LOG))
    if text is None:
        raise UserError(f"no {METRICS_LOG} in {run_dir}: not a raycv run directory (or no epoch finished yet)")
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def draw_curves(epochs: list[dict]) -> bytes:
    """PNG bytes: a 2x2 figure of loss, validation quality (accuracy, mIoU or mAP), learning rate and throughput per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [m["epoch"] for m in epochs]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    (loss, acc), (lr, ips) = axes
    loss.plot(x, [m["train_loss"] for m in epochs], "o-", label="train")
    if all("val_loss" in m for m in epochs):  # detection models have no validation loss
        loss.plot(x, [m["val_loss"] for m in epochs], "s-", label="val")
    loss.set_title("loss")
    loss.legend()
    for i, (label, _) in enumerate(shown(epochs[0])):
        acc.plot(x, [shown(m)[i][1] for m in epochs], "os"[i % 2] + "-", label=f"val {label}")
    acc.set_title("validation")
    acc.set_ylim(0, 1.02)
    acc.legend()
    lr.plot(x, [m["lr"] for m in epochs], "o-")
    lr.set_title("learning rate (end of epoch)")
    ips.plot(x, [m["images_per_second"] for m in epochs], "o-")
    ips.set_title("train images/s")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def write_report(run_dir: str) -> RunReport:
    epochs = read_epochs(run_dir)
    summary_text = fsio.read_text(fsio.join(run_dir, "summary.json"))
    plot = None
    if epochs:
        plot = fsio.join(run_dir, CURVES)
        fsio.write_bytes(plot, draw_curves(epochs))
    return RunReport(run_dir, epochs, json.loads(summary_text) if summary_text else None, plot)
