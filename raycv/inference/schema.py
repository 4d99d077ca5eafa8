"""The output schemas (docs/outputs.md, docs/architecture.md) and their file metadata. Every task's rows have
`path` and `error` (null when the row succeeded)."""

from __future__ import annotations

import json

import pyarrow as pa

import raycv


def classification_schema(embedding_dim: int | None = None, logits_dim: int | None = None) -> pa.Schema:
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("label_index", pa.int32()),
        pa.field("score", pa.float32()),
        pa.field("topk_labels", pa.list_(pa.string())),
        pa.field("topk_scores", pa.list_(pa.float32())),
        pa.field("error", pa.string()),  # null when the row succeeded
    ]
    if embedding_dim:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), embedding_dim)))
    if logits_dim:  # infer.logits: the raw outputs, one per class (a teacher's, for offline distillation)
        fields.append(pa.field("logits", pa.list_(pa.float32(), logits_dim)))
    return pa.schema(fields)


def segmentation_schema() -> pa.Schema:
    """One row per image: the predicted class mask at the image's original size, PNG-encoded
    (palette PNG, pixel value = class index, VOC colours), and the share of pixels of each class."""
    return pa.schema([
        pa.field("path", pa.string(), nullable=False),
        pa.field("mask_png", pa.binary()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("class_fractions", pa.list_(pa.float32())),  # indexed like the classes in the metadata
        pa.field("error", pa.string()),
    ])


def detection_schema() -> pa.Schema:
    """One row per image: its detections, best first, in original-image pixels."""
    return pa.schema([
        pa.field("path", pa.string(), nullable=False),
        pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # [x1, y1, x2, y2] per detection
        pa.field("labels", pa.list_(pa.string())),
        pa.field("label_indices", pa.list_(pa.int32())),  # into the classes in the metadata (0: background)
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("error", pa.string()),
    ])


def output_schema(task: str, embedding_dim: int | None = None, logits_dim: int | None = None) -> pa.Schema:
    if task == "segmentation":
        return segmentation_schema()
    if task == "detection":
        return detection_schema()
    return classification_schema(embedding_dim, logits_dim)


def file_metadata(*, checkpoint: str | None, model: str, classes: list[str], preprocess: dict,
                  task: str = "classification") -> dict[str, str]:
    """Key-value metadata stored in every output file: where the predictions came from."""
    return {"raycv.version": raycv.__version__, "raycv.task": task,
            "raycv.checkpoint": checkpoint or "", "raycv.model": model,
            "raycv.classes": json.dumps(classes), "raycv.preprocess": json.dumps(preprocess)}
