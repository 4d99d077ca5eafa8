"""`raycv evaluate`: score published predictions against their true labels.

Classification: true labels come from the image's parent folder name (image folders, digits,
shapes) or from a Parquet file with `path` and `label` columns. Reports top-1, top-5, per-class
precision and recall and the confusion matrix, as JSON and as a PNG.

Segmentation: the true class mask of `.../JPEGImages/<id>.<ext>` is `.../SegmentationClass/<id>.png`
(VOC layout), or `<labels>/<id>.png` with `--labels FOLDER`. Reports mIoU, pixel accuracy and
per-class IoU over every pixel at the images' original sizes (torchmetrics; 255 = void).

Detection: true boxes come from a COCO instances JSON, a YOLO dataset or a VOC tree: `--labels`
(the JSON file, the folder of data.yaml, the folder of Annotations/), or found beside the images
(`<root>/<images>/<file>` -> `<root>/annotations/instances_*.json`; `<root>/images/<split>/<file>`
-> `<root>/data.yaml`; `<root>/JPEGImages/<file>` -> `<root>/Annotations/`). Reports COCO mAP@[.5:.95], mAP@.5, mAP@.75, by object
size, mAR@100 and per-class AP (torchmetrics over pycocotools), in original-image pixels. Crowd
regions are not scored; classes are matched by name.
"""

from __future__ import annotations

import io
import json

import numpy as np

from raycv.data import io as fsio
from raycv.errors import UserError
from raycv.inference.output import OutputLocation, read_output


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
    if manifest.metadata.get("task") == "detection":
        return evaluate_detection(predictions, table, labels=labels, output=output)
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
        save_report(output, report, {"confusion_matrix.png": plot_confusion(cm, classes, title=f"top-1 {report['top1']:.4f}")})
    return report


def save_report(output: str, report: dict, pictures: dict[str, bytes] | None = None) -> None:
    """metrics.json and the pictures into `output`: a local folder or an object-storage URI."""
    try:
        fsio.make_dirs(output)
        fsio.write_text(fsio.join(output, "metrics.json"), json.dumps(report, indent=1))
        for name, png in (pictures or {}).items():
            fsio.write_bytes(fsio.join(output, name), png)
    except OSError as e:
        raise UserError(f"cannot write the report to {output}: {str(e).splitlines()[0]}") from None


def plot_confusion(cm: np.ndarray, classes: list[str], title: str = "") -> bytes:
    """The confusion matrix as a PNG."""
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


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
        save_report(output, report)
    return report


def _annotation_sets(labels: str) -> list[tuple[str, list[str], list[dict]]]:
    """--labels for detection -> [(what, classes, items)]: a COCO instances JSON, a YOLO tree (its
    data.yaml's splits) or a VOC tree (its Annotations/)."""
    from raycv.data.detection_formats import voc_detection_items, yolo_items
    from raycv.data.detection_sources import read_coco
    from raycv.data.io import exists, is_dir

    root = labels.rstrip("/")
    if root.endswith(".json"):
        return [(root, *read_coco(root, root.replace("\\", "/").rsplit("/", 1)[0]))]
    if root.endswith("data.yaml"):
        root = root.rsplit("/", 1)[0]
    if exists(f"{root}/data.yaml"):
        classes, splits = yolo_items(root)
        return [(f"{root}/data.yaml", classes, splits["train"] + splits["val"])]
    if is_dir(f"{root}/Annotations"):
        classes, splits = voc_detection_items(root, None)
        return [(f"{root}/Annotations", classes, splits["train"] + splits["val"])]
    raise UserError(f"--labels for detection is a COCO instances JSON file, a YOLO dataset (data.yaml) or a VOC "
                    f"tree (Annotations/), not {labels}")


def _found_annotations(paths: list[str]) -> list[tuple[str, list[str], list[dict]]]:
    """The annotations beside the images: COCO's <root>/annotations/instances_*.json for
    <root>/<images>/<file>; YOLO's <root>/data.yaml for <root>/images/<split>/<file>; VOC's
    <root>/Annotations/ for <root>/JPEGImages/<file>."""
    from raycv.data.detection_sources import coco_image_dir, read_coco
    from raycv.data.io import exists, is_dir, list_files

    parents = sorted({p.replace("\\", "/").rsplit("/", 2)[0] for p in paths if p.count("/") >= 2})
    found = []
    for root in parents:
        try:
            coco = [f for f in list_files(f"{root}/annotations", (".json",))
                    if f.rsplit("/", 1)[-1].startswith("instances_")]
        except (OSError, UserError):
            coco = []
        found += [(f, *read_coco(f, coco_image_dir(root, f))) for f in coco]
    yolo_roots = sorted({p.replace("\\", "/").rpartition("/images/")[0] for p in paths if "/images/" in p})
    for root in yolo_roots:
        if root and exists(f"{root}/data.yaml"):
            found += _annotation_sets(root)
    for root in parents:  # <root>/JPEGImages/<file>: parents holds <root>
        if is_dir(f"{root}/Annotations"):
            found += _annotation_sets(root)
    return found


def _detection_truth(paths: list[str], labels: str | None) -> tuple[list[str], dict[str, dict]]:
    """(class names of the annotations, {image path or file name: {"boxes", "labels"}})."""
    sets = _annotation_sets(labels) if labels is not None else _found_annotations(paths)
    if not sets:
        raise UserError("cannot find the true boxes: no COCO annotations/instances_*.json, YOLO data.yaml or VOC "
                        "Annotations/ beside the images' folder; pass --labels")
    classes: list[str] | None = None
    truth: dict[str, dict] = {}
    for what, names, items in sets:
        if classes is not None and names != classes:
            raise UserError(f"{what} has other classes than {sets[0][0]}")
        classes = names
        for item in items:
            entry = {"boxes": item["boxes"], "labels": item["labels"]}
            truth[item["path"]] = entry
            truth.setdefault(item["path"].rsplit("/", 1)[-1], entry)  # also by file name
    return classes or [], truth


def evaluate_detection(predictions: str, table, *, labels: str | None = None, output: str | None = None) -> dict:
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    from raycv.tasks import check_extras

    check_extras("detection")

    paths = table.column("path").to_pylist()
    classes, truth = _detection_truth(paths, labels)
    index = {c: i for i, c in enumerate(classes)}
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools")
    scored = errors = unknown = 0
    for path, boxes, names, scores in zip(paths, table.column("boxes").to_pylist(), table.column("labels").to_pylist(),
                                          table.column("scores").to_pylist()):
        if boxes is None:
            errors += 1
            continue
        t = truth.get(path) or truth.get(path.replace("\\", "/").rsplit("/", 1)[-1])
        if t is None:
            unknown += 1
            continue
        known = [i for i, n in enumerate(names) if n in index]  # a class the annotations lack cannot be right
        metric.update(
            [{"boxes": torch.tensor([boxes[i] for i in known], dtype=torch.float32).reshape(-1, 4),
              "scores": torch.tensor([scores[i] for i in known], dtype=torch.float32),
              "labels": torch.tensor([index[names[i]] for i in known], dtype=torch.int64)}],
            [{"boxes": torch.tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4),
              "labels": torch.tensor(t["labels"], dtype=torch.int64)}])
        scored += 1
    if not scored:
        raise UserError(f"no prediction in {predictions} has true boxes in the annotations "
                        f"({errors} error rows, {unknown} images not in the annotations)")
    r = metric.compute()
    per_class = {}
    ids = r["classes"].reshape(-1).tolist()
    aps = r["map_per_class"].reshape(-1).tolist()
    for k, ap in zip(ids, aps):
        per_class[classes[int(k)]] = {"ap": float(ap)}
    report = {"predictions": predictions, "task": "detection", "rows": table.num_rows, "scored": scored,
              "errors": errors, "not_in_annotations": unknown,
              **{key: float(r[key]) for key in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
                                                "mar_100")},
              "per_class": per_class, "classes": classes}
    if output:
        save_report(output, report)
    return report
