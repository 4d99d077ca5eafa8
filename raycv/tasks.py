"""What differs between the tasks that the rest of raycv asks about by name: which validation
metrics a task reports, which one picks the best checkpoint by default, and how an epoch line and
a summary show them. The task of a run is its dataset's (`raycv datasets`); the model must match."""

from __future__ import annotations

from raycv.errors import UserError

# task -> (its metrics, the default checkpoint metric, (key, short label) pairs shown per epoch)
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("val_accuracy", "val_top5", "val_loss"),
    "segmentation": ("val_miou", "val_pixel_accuracy", "val_loss"),
    # COCO mAP@[.5:.95] and mAP@.5 (torchmetrics over pycocotools); torchvision detection models
    # compute losses only in training mode, so there is no validation loss
    "detection": ("val_map", "val_map50"),
}
DEFAULT_METRIC = {"classification": "val_accuracy", "segmentation": "val_miou", "detection": "val_map"}
SHOWN = {"classification": (("val_accuracy", "val_acc"), ("val_top5", "top5")),
         "segmentation": (("val_miou", "mIoU"), ("val_pixel_accuracy", "pix_acc")),
         "detection": (("val_map", "mAP"), ("val_map50", "mAP50"))}


def checkpoint_metric(task: str, asked: str | None) -> str:
    """The metric that ranks checkpoints: the one asked for, if the task reports it."""
    if asked is None:
        return DEFAULT_METRIC[task]
    if asked not in METRICS[task]:
        raise UserError(f"train.checkpoint_metric={asked} is not a {task} metric (valid: {', '.join(METRICS[task])})")
    return asked


def check_model_fits(task: str, model: str, model_task: str) -> None:
    if model_task != task:
        from raycv.models import list_models

        names = ", ".join(e.name for e in list_models(task))
        raise UserError(f"model {model!r} is a {model_task} model but the dataset is for {task} "
                        f"({task} models: {names})")


# task -> (module its metrics need beyond the core install, the extra that brings it)
EXTRAS = {"detection": ("pycocotools", "detection")}


def check_extras(task: str) -> None:
    """Refuse a task whose optional dependency is missing, in one line naming the extra."""
    import importlib.util

    if task in EXTRAS and importlib.util.find_spec(EXTRAS[task][0]) is None:
        module, extra = EXTRAS[task]
        raise UserError(f"{task} needs {module} for its COCO mAP: pip install 'raycv[{extra}]'")


def shown(metrics: dict) -> list[tuple[str, float]]:
    """(label, value) of the task-specific metrics present in an epoch record."""
    for pairs in SHOWN.values():
        if pairs[0][0] in metrics:
            return [(label, metrics[key]) for key, label in pairs if key in metrics]
    return []
