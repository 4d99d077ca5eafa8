"""The classification output schema (shared/ARCHITECTURE.md) and its file metadata."""

from __future__ import annotations

import json

import pyarrow as pa

import raycv


def classification_schema(embedding_dim: int | None = None) -> pa.Schema:
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
    return pa.schema(fields)


def file_metadata(*, checkpoint: str | None, model: str, classes: list[str], preprocess: dict) -> dict[str, str]:
    """Key-value metadata stored in every output file: where the predictions came from."""
    return {"raycv.version": raycv.__version__, "raycv.task": "classification",
            "raycv.checkpoint": checkpoint or "", "raycv.model": model,
            "raycv.classes": json.dumps(classes), "raycv.preprocess": json.dumps(preprocess)}
