"""The batch-inference models: classes that Ray Data runs as a pool of actors. The model is built
and loaded once per actor (`__init__`); `__call__` predicts one batch of decoded images and
returns it as rows of the task's output schema."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raycv.data.decode import decode_batch
from raycv.data.presets import eval_preset_from_dict
from raycv.inference.schema import classification_schema, detection_schema, segmentation_schema
from raycv.models import get_model, last_linear_name
from raycv.training.checkpoint import check_runs, load_model


class _Predictor:
    def __init__(self, *, checkpoint: str | None, model_name: str, model_kwargs: dict[str, Any],
                 weights: str | None, torch_home: str | None, classes: list[str], preprocess: dict, threads: int,
                 use_gpu: bool, counter=None, decode: dict[str, Any] | None = None, model: torch.nn.Module | None = None,
                 plugins: list[str] = (), channels_last: bool = False, check: bool = False):
        """`model`: already built and loaded (raycv.load, in the caller's process); else built here.
        `plugins`: modules that register the model (run.plugins), imported in this process first.
        `channels_last`: the model and each batch in NHWC memory (infer.channels_last).
        `check`: run the checkpoint's model once at its input size, as a driver that loaded it
        would have (raycv.inference.pipeline.weights_checked_here)."""
        began = time.time()
        from raycv import plugins as _plugins

        _plugins.load(plugins)
        # Ray starts workers with one intra-op thread; an actor given k CPUs should use k.
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if torch_home:  # where the driver found the pretrained weights (same node, or a shared cache)
            torch.hub.set_dir(torch_home)
        if model is None and checkpoint is not None:  # the checkpoint must be readable here (shared storage on a cluster)
            model, info = load_model(checkpoint)
            if check:
                check_runs(model, info, checkpoint)
        elif model is None:
            model = get_model(model_name, num_classes=len(classes), weights=weights, **model_kwargs)
        self.model = model.eval().to(self.device)
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.classes = np.asarray(classes, dtype=object)
        self.preset = eval_preset_from_dict(preprocess)
        self.counter = counter  # a RowCounter actor, for the driver's progress line
        self.decode = decode  # decode_batch's arguments, when decoding happens here (infer.decode_in_actor)
        if counter is not None:
            import psutil

            counter.actor_ready.remote(psutil.Process().create_time(), began, time.time())

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """The task's output rows, plus the `shard` each input came from (the sink commits by it)."""
        table = self.predict(batch)
        if "shard" in batch:
            table = table.append_column("shard", pa.array(list(batch["shard"]), type=pa.string()))
        return table

    def _inputs(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list, np.ndarray, torch.Tensor | None]:
        """(batch, error per row, mask of the rows that decoded, their normalized images)."""
        if self.decode is not None:
            batch = decode_batch(batch, **self.decode)
        # An all-success batch may reach us as NaNs or Nones: only a non-empty string is an error.
        errors = [e if isinstance(e, str) and e else None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        x = None
        if ok.any():
            x = self.preset.normalize(torch.from_numpy(np.require(batch["image"][ok], requirements=["C", "W"])).to(self.device))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        if self.counter is not None:
            self.counter.add.remote(len(errors))
        return batch, errors, ok, x


class ClassificationPredictor(_Predictor):
    def __init__(self, *, topk: int, embedding: bool, schema_metadata: dict[str, str], logits: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.topk = min(topk, len(self.classes))
        self.features: list[torch.Tensor] = []
        self.embedding_dim = None
        if embedding:
            head = self.model.get_submodule(last_linear_name(self.model))
            head.register_forward_hook(lambda mod, inp, out: self.features.append(
                inp[0].dequantize() if inp[0].is_quantized else inp[0].detach()))  # int8 checkpoints: a quantized input
            self.embedding_dim = head.in_features
        self.logits = logits
        self.schema = classification_schema(self.embedding_dim, len(self.classes) if logits else None).with_metadata(
            schema_metadata)

    @torch.inference_mode()
    def predict(self, batch: dict[str, np.ndarray]) -> pa.Table:
        batch, errors, ok, x = self._inputs(batch)
        n = len(errors)
        label = [None] * n
        label_index = [None] * n
        score = [None] * n
        topk_labels = [None] * n
        topk_scores = [None] * n
        emb, raw = [None] * n, [None] * n
        if x is not None:
            self.features.clear()
            out = self.model(x).float()  # (B_ok, num_classes) logits
            probs = torch.softmax(out, dim=1)
            out = out.cpu().numpy() if self.logits else None
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
                if out is not None:
                    raw[i] = out[j].tolist()
        cols = {"path": list(batch["path"]), "label": label, "label_index": label_index, "score": score,
                "topk_labels": topk_labels, "topk_scores": topk_scores, "error": errors}
        if self.embedding_dim is not None:
            cols["embedding"] = emb
        if self.logits:
            cols["logits"] = raw
        return pa.Table.from_pydict(cols, schema=self.schema)


def encode_mask(mask: np.ndarray) -> bytes:
    """(H, W) uint8 class indices -> a palette PNG (VOC colours; the pixel values stay the indices)."""
    from PIL import Image

    from raycv.data.bundled import voc_palette

    img = Image.fromarray(mask, mode="L")
    img.putpalette(voc_palette())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class SegmentationPredictor(_Predictor):
    """The model runs at the preset's square size; its logits are resized back to each image's
    original size (bilinear) before the per-pixel argmax, as torchvision's reference evaluates."""

    def __init__(self, *, schema_metadata: dict[str, str], **kwargs):
        super().__init__(**kwargs)
        self.schema = segmentation_schema().with_metadata(schema_metadata)

    @torch.inference_mode()
    def predict(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch.nn.functional as F

        batch, errors, ok, x = self._inputs(batch)
        n = len(errors)
        k = len(self.classes)
        masks, heights, widths, fractions = [None] * n, [None] * n, [None] * n, [None] * n
        if x is not None:
            logits = self.model(x)["out"].float()  # (B_ok, K, S, S)
            for j, i in enumerate(np.flatnonzero(ok)):
                h, w = int(batch["height"][i]), int(batch["width"][i])
                up = F.interpolate(logits[j:j + 1], size=(h, w), mode="bilinear", align_corners=False)
                mask = up.argmax(1)[0].to(torch.uint8).cpu().numpy()
                masks[i], heights[i], widths[i] = encode_mask(mask), h, w
                fractions[i] = (np.bincount(mask.ravel(), minlength=k)[:k] / mask.size).astype(np.float32).tolist()
        cols = {"path": list(batch["path"]), "mask_png": masks, "height": heights, "width": widths,
                "class_fractions": fractions, "error": errors}
        return pa.Table.from_pydict(cols, schema=self.schema)


class DetectionPredictor(_Predictor):
    """The model sees each image letterboxed into the preset's square (as in training); its boxes
    are mapped back to the original pixels with the letterbox's scale and clipped to the image.
    Kept: boxes of a class other than the background scoring at least `score_threshold`, at most
    `max_detections` per image, best first."""

    def __init__(self, *, score_threshold: float, max_detections: int, schema_metadata: dict[str, str], **kwargs):
        super().__init__(**kwargs)
        self.score_threshold, self.max_detections = score_threshold, max_detections
        self.schema = detection_schema().with_metadata(schema_metadata)

    @torch.inference_mode()
    def predict(self, batch: dict[str, np.ndarray]) -> pa.Table:
        batch, errors, ok, x = self._inputs(batch)
        n = len(errors)
        boxes, labels, indices, scores, heights, widths = ([None] * n for _ in range(6))
        if x is not None:
            outputs = self.model(list(x))
            for j, i in enumerate(np.flatnonzero(ok)):
                h, w = int(batch["height"][i]), int(batch["width"][i])
                o = outputs[j]
                s = o["scores"].float()
                # one-stage models (RetinaNet, FCOS) score class 0 too; it is the background, never an object
                keep = torch.nonzero((s >= self.score_threshold) & (o["labels"] != 0)).flatten()
                keep = keep[s[keep].argsort(descending=True)][:self.max_detections]
                sx, sy = self.preset.box_scale(h, w)
                b = o["boxes"][keep].float().cpu() / torch.tensor([sx, sy, sx, sy])
                b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
                idx = o["labels"][keep].cpu().numpy()
                boxes[i], indices[i] = b.numpy().tolist(), idx.astype(np.int32).tolist()
                labels[i] = [str(self.classes[k]) for k in idx]
                scores[i] = s[keep].cpu().numpy().tolist()
                heights[i], widths[i] = h, w
        cols = {"path": list(batch["path"]), "boxes": boxes, "labels": labels, "label_indices": indices,
                "scores": scores, "height": heights, "width": widths, "error": errors}
        return pa.Table.from_pydict(cols, schema=self.schema)


PREDICTORS = {"classification": ClassificationPredictor, "segmentation": SegmentationPredictor,
              "detection": DetectionPredictor}
