"""`raycv evaluate`: score published predictions against their true labels.

Classification: true labels come from the image's parent folder name (image folders, digits,
shapes) or from a Parquet file with `path` and `label` columns. Reports top-1, top-5, per-class
precision and recall and the confusion matrix, as JSON and as a PNG.

Segmentation: the true class mask of `.../JPEGImages/<id>.<ext>` is `.../SegmentationClass/<id>.png`
(VOC layout), or `<labels>/<id>.png` with `--labels FOLDER`. Reports mIoU, pixel accuracy and
per-class IoU over every pixel at the images' original sizes (torchmetrics; 255 = void).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raycv.errors import UserError
from raycv.infer.output import OutputLocation, read_output


def _true_labels(paths: list[str], labels: str | None) -> list[str | None]:
    if labels is None:
        return [p.replace("\\", "/").rstrip("/").split("/")[-2] if "/" in p else None for p in paths]
    import pyarrow.parquet as pq

    table = pq.read_table(labels, columns=["path", "label"])
    truth = {p: str(lbl) for p, lbl in zip(table.column("path").to_pylist(), table.column("label").to_pylist())}
    return [truth.get(p) for p in paths]


def evaluate_predictions(predictions: str, *, labels: str | None = None, output: str | None = None) -> dict:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    table = read_output(predictions)
    manifest = OutputLocation(predictions).manifest()
    classes: list[str] = manifest.metadata.get("classes") or []
    if table is None or table.num_rows == 0:
        raise UserError(f"{predictions} has no rows to evaluate")
    if manifest.metadata.get("task") == "segmentation":
        return evaluate_segmentation(predictions, table, classes, labels=labels, output=output)
    paths = table.column("path").to_pylist()
    pred = table.column("label").to_pylist()
    topk = table.column("topk_labels").to_pylist()
    truth = _true_labels(paths, labels)
    keep = [i for i in range(len(paths)) if pred[i] is not None and truth[i] in set(classes)]
    if not keep:
        raise UserError(f"no prediction in {predictions} has a known true label (classes: {', '.join(classes)})")
    y_true = [truth[i] for i in keep]
    y_pred = [pred[i] for i in keep]
    precision, recall, _, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=classes)  # rows: true class, columns: predicted
    report = {
        "predictions": predictions, "rows": len(paths), "scored": len(keep),
        "errors": sum(p is None for p in pred),
        "top1": float(np.mean([a == b for a, b in zip(y_true, y_pred)])),
        "top5": float(np.mean([truth[i] in (topk[i] or [])[:5] for i in keep])),
        "per_class": {c: {"precision": float(p), "recall": float(r), "support": int(s)}
                      for c, p, r, s in zip(classes, precision, recall, support)},
        "classes": classes, "confusion_matrix": cm.tolist(), "task": "classification",
    }
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(report, indent=1))
        plot_confusion(cm, classes, out / "confusion_matrix.png", title=f"top-1 {report['top1']:.4f}")
    return report


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, n * 0.5 + 2), max(4, n * 0.5 + 1.5)), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def true_mask_path(path: str, labels: str | None) -> str:
    stem = path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    if labels is not None:
        return f"{labels.rstrip('/')}/{stem}.png"
    if "/JPEGImages/" not in path:
        raise UserError(f"cannot tell where the true mask of {path} is (not in a VOC JPEGImages/ folder): "
                        f"pass --labels MASK_FOLDER")
    return path.rsplit("/JPEGImages/", 1)[0] + f"/SegmentationClass/{stem}.png"


def evaluate_segmentation(predictions: str, table, classes: list[str], *, labels: str | None = None,
                          output: str | None = None) -> dict:
    import io

    import torch
    from PIL import Image
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    from raycv.data.decode import check_mask_classes, open_mask
    from raycv.data.io import read_bytes
    from raycv.data.presets import IGNORE_INDEX

    k = len(classes)
    miou = MulticlassJaccardIndex(k, average="macro", ignore_index=IGNORE_INDEX)
    per_class = MulticlassJaccardIndex(k, average="none", ignore_index=IGNORE_INDEX)
    pixel = MulticlassAccuracy(k, average="micro", ignore_index=IGNORE_INDEX)
    pixels = np.zeros(k, dtype=np.int64)
    scored = errors = 0
    for path, png in zip(table.column("path").to_pylist(), table.column("mask_png").to_pylist()):
        if png is None:
            errors += 1
            continue
        where = true_mask_path(path, labels)
        try:
            truth = np.asarray(open_mask(read_bytes(where)))
        except FileNotFoundError:
            raise UserError(f"no true mask for {path}: {where} does not exist") from None
        except ValueError as e:
            raise UserError(f"cannot read the true mask {where}: {e}") from None
        check_mask_classes(truth, k, where)
        pred = np.asarray(Image.open(io.BytesIO(png)))
        if pred.shape != truth.shape:
            raise UserError(f"the true mask {where} is {truth.shape[1]}x{truth.shape[0]} but the prediction for "
                            f"{path} is {pred.shape[1]}x{pred.shape[0]}")
        t, p = torch.from_numpy(truth.astype(np.int64))[None], torch.from_numpy(pred.astype(np.int64))[None]
        for metric in (miou, per_class, pixel):
            metric.update(p, t)
        pixels += np.bincount(truth[truth != IGNORE_INDEX].ravel(), minlength=k)[:k]
        scored += 1
    if not scored:
        raise UserError(f"no prediction in {predictions} could be scored ({errors} error rows)")
    report = {"predictions": predictions, "task": "segmentation", "rows": table.num_rows, "scored": scored,
              "errors": errors, "miou": float(miou.compute()), "pixel_accuracy": float(pixel.compute()),
              "per_class": {c: {"iou": float(v), "true_pixels": int(n)} for c, v, n in
                            zip(classes, per_class.compute().tolist(), pixels)},
              "classes": classes}
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(report, indent=1))
    return report
