"""The batch-inference model: a class that Ray Data runs as a pool of actors. The model is built
and loaded once per actor (`__init__`); `__call__` predicts one batch of decoded images."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raycv.data.decode import decode_batch
from raycv.data.presets import ClassificationEvalPreset
from raycv.infer.schema import classification_schema
from raycv.models import get_model, last_linear_name
from raycv.train.checkpoint import load_model


class ClassificationPredictor:
    def __init__(self, *, checkpoint: str | None, model_name: str, model_kwargs: dict[str, Any],
                 weights: str | None, torch_home: str | None, classes: list[str], preprocess: dict, topk: int, embedding: bool, threads: int, use_gpu: bool,
                 schema_metadata: dict[str, str], counter=None, decode: dict[str, Any] | None = None):
        # Ray starts workers with one intra-op thread; an actor given k CPUs should use k.
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if torch_home:  # where the driver found the pretrained weights (same node, or a shared cache)
            torch.hub.set_dir(torch_home)
        if checkpoint is not None:  # the checkpoint folder must be readable here (shared storage on a cluster)
            model, _ = load_model(checkpoint)
        else:
            model = get_model(model_name, num_classes=len(classes), weights=weights, **model_kwargs)
        self.model = model.eval().to(self.device)
        self.classes = np.asarray(classes, dtype=object)
        self.preset = ClassificationEvalPreset.from_dict(preprocess)
        self.topk = min(topk, len(classes))
        self.features: list[torch.Tensor] = []
        self.embedding_dim = None
        if embedding:
            head = self.model.get_submodule(last_linear_name(self.model))
            head.register_forward_hook(lambda mod, inp, out: self.features.append(inp[0].detach()))
            self.embedding_dim = head.in_features
        self.counter = counter  # a RowCounter actor, for the driver's progress line
        self.decode = decode  # decode_batch's arguments, when decoding happens here (infer.decode_in_actor)
        self.schema = classification_schema(self.embedding_dim).with_metadata(schema_metadata)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.decode is not None:
            batch = decode_batch(batch, **self.decode)
        paths = batch["path"]
        # An all-success batch may reach us as NaNs or Nones: only a non-empty string is an error.
        errors = [e if isinstance(e, str) and e else None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        n = len(paths)
        label = [None] * n
        label_index = [None] * n
        score = [None] * n
        topk_labels = [None] * n
        topk_scores = [None] * n
        emb = [None] * n
        if ok.any():
            x = self.preset.normalize(torch.from_numpy(np.require(batch["image"][ok], requirements=["C", "W"])).to(self.device))
            self.features.clear()
            probs = torch.softmax(self.model(x).float(), dim=1)  # (B_ok, num_classes)
            top = probs.topk(self.topk, dim=1)
            top_p, top_i = top.values.cpu().numpy(), top.indices.cpu().numpy()
            feats = self.features[0].float().flatten(1).cpu().numpy() if self.features else None
            for j, i in enumerate(np.flatnonzero(ok)):
                label_index[i] = int(top_i[j, 0])
                label[i] = self.classes[top_i[j, 0]]
                score[i] = float(top_p[j, 0])
                topk_labels[i] = list(self.classes[top_i[j]])
                topk_scores[i] = [float(p) for p in top_p[j]]
                if feats is not None:
                    emb[i] = feats[j].tolist()
        cols = {"path": list(paths), "label": label, "label_index": label_index, "score": score,
                "topk_labels": topk_labels, "topk_scores": topk_scores, "error": errors}
        if self.embedding_dim is not None:
            cols["embedding"] = emb
        if self.counter is not None:
            self.counter.add.remote(n)
        return pa.Table.from_pydict(cols, schema=self.schema)
