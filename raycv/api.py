"""raycv's Python API: what the CLI calls, for notebooks and scripts.

    import raycv

    summary = raycv.train(overrides={"train.epochs": 3})          # Ray Train; -> TrainSummary
    raycv.infer(summary.best_checkpoint, "images/", "preds/")     # Ray Data -> Parquet; InferSummary
    raycv.evaluate("preds/")                                      # -> metrics dict
    p = raycv.load(summary.best_checkpoint)                       # in this process, no Ray
    p(["a.png", "b.jpg"])                                         # rows as `raycv infer` writes them
    p.model, p.transform, p.classes, p.task                       # a plain nn.Module and its preprocessing

Configuration is the same as the CLI's: a recipe path and dotted overrides, given as a list of
`key=value` strings or a dict (`{"train.epochs": 3}`); every key is checked before anything starts.
This module imports nothing heavy until a function is called.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Union

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image
    from torch import nn

    from raycv.config import InferConfig, TrainConfig
    from raycv.inference.pipeline import InferSummary
    from raycv.training.driver import TrainSummary

    ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]

Overrides = Union[Sequence[str], Mapping[str, Any], None]


def _unwrapped(call):
    """`call()`, with the UserError behind an error that crossed Ray (a worker's or a Ray Data
    task's bad-input error, wrapped by Ray) raised as itself: the one line the CLI prints."""
    from raycv.errors import UserError, find_user_error

    try:
        return call()
    except UserError:
        raise
    except Exception as e:
        user = find_user_error(e)
        if user is None:
            raise
        raise user from None


def _overrides(overrides: Overrides) -> list[str]:
    """A dict {"train.epochs": 3} or a list ["train.epochs=3"] -> the CLI's `key=value` strings
    (values as JSON, which the config reads as YAML)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    return [str(o) for o in overrides]


def train(config: "str | os.PathLike | TrainConfig | None" = None, overrides: Overrides = None, *,
          data: Any = None) -> "TrainSummary":
    """Train with Ray Train (a local Ray instance, or the cluster at `run.address` / $RAY_ADDRESS).
    `config`: a recipe path, or a config already loaded (`raycv.config.load_config("train", ...)`).
    `data`: image classification data as Python objects instead of `data.name`: a Hugging Face
    `datasets.DatasetDict` (train and validation / test splits; an image column of the Image
    feature, a ClassLabel label column, named by data.image_column / data.label_column) or a
    mapping {"train": ..., "val": ...} of `datasets.Dataset`s or Ray Datasets of encoded images."""
    from raycv.config import TrainConfig, load_config
    from raycv.training.driver import fit

    cfg = config if isinstance(config, TrainConfig) else load_config("train", config, _overrides(overrides))
    if data is not None:
        from raycv.data.objects import NAME, register_objects

        register_objects(data)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"name": NAME})})
    return _unwrapped(lambda: fit(cfg))


def infer(checkpoint: str | os.PathLike | None = None, input: str | os.PathLike | None = None,
          output: str | os.PathLike | None = None, *, config: "str | os.PathLike | InferConfig | None" = None,
          overrides: Overrides = None) -> "InferSummary":
    """Batch inference with Ray Data into a Parquet folder (`raycv infer`). `config`: a recipe path,
    or a config already loaded (`raycv.config.load_config("infer", ...)`), which the other
    arguments then update."""
    from raycv.config import InferConfig, load_config
    from raycv.inference.pipeline import run_inference

    extra = [f"infer.{k}={v}" for k, v in (("checkpoint", checkpoint), ("input", input), ("output", output))
             if v is not None]
    if isinstance(config, InferConfig):
        if overrides:
            raise TypeError("give overrides with a recipe path, or set them on the loaded config")
        update = {k: str(v) for k, v in (("checkpoint", checkpoint), ("input", input), ("output", output)) if v is not None}
        config = config.model_copy(update={"infer": config.infer.model_copy(update=update)})
        return _unwrapped(lambda: run_inference(config))
    cfg = load_config("infer", config, _overrides(overrides) + extra)
    return _unwrapped(lambda: run_inference(cfg))


def evaluate(predictions: str | os.PathLike, *, labels: str | None = None, output: str | None = None) -> dict:
    """Score a prediction folder against its labels (`raycv evaluate`): the metrics as a dict."""
    from raycv.inference.evaluate import evaluate_predictions

    return evaluate_predictions(str(predictions), labels=labels, output=output)


def load(checkpoint: str | os.PathLike, *, device: str = "cpu", overrides: Overrides = None) -> "Predictor":
    """A checkpoint (or a run directory: its best checkpoint) loaded in this process, ready to
    predict without Ray. `overrides`: infer.* settings of the predictions (infer.topk,
    infer.score_threshold, ...)."""
    return Predictor(checkpoint, device=device, overrides=overrides)


class Predictor:
    """A loaded model and its preprocessing. Call it on images (paths, PIL images, HWC uint8
    arrays, or a list of them) for the rows `raycv infer` would write for them, as dicts (`path`:
    the file, or `<image i>` for the i-th in-memory image); an image that cannot be read or decoded
    is a row with its `error`, as in the Parquet output."""

    def __init__(self, checkpoint: str | os.PathLike, *, device: str = "cpu", overrides: Overrides = None):
        import torch

        from raycv.config import load_config
        from raycv.inference.pipeline import load_spec
        from raycv.inference.predictor import PREDICTORS
        from raycv.inference.schema import file_metadata
        from raycv.errors import UserError
        from raycv.training.checkpoint import read_info

        cfg = load_config("infer", None, [*_overrides(overrides), f"infer.checkpoint={checkpoint}"])
        spec = load_spec(cfg)
        if device.startswith("cuda") and spec.checkpoint and read_info(spec.checkpoint).quantization:
            raise UserError(f"{checkpoint} is an int8 checkpoint (raycv quantize), which runs on CPUs: use device='cpu'")
        self.task: str = spec.task
        self.classes: list[str] = list(spec.classes)
        self.preprocess = spec.preprocess
        self.checkpoint = spec.checkpoint
        kwargs: dict[str, Any] = dict(
            checkpoint=spec.checkpoint, model_name=spec.name, model_kwargs=spec.kwargs, weights=spec.weights,
            torch_home=None, classes=spec.classes, preprocess=spec.preprocess.to_dict(),
            threads=torch.get_num_threads(), use_gpu=device.startswith("cuda"), model=spec.model,
            channels_last=cfg.infer.channels_last,
            schema_metadata=file_metadata(checkpoint=None, model=spec.name, classes=spec.classes,
                                          preprocess=spec.preprocess.to_dict(), task=spec.task))
        if spec.task == "classification":
            kwargs.update(topk=cfg.infer.topk, embedding=cfg.infer.embedding, logits=cfg.infer.logits)
        elif spec.task == "detection":
            kwargs.update(score_threshold=cfg.infer.score_threshold, max_detections=cfg.infer.max_detections)
        self._predictor = PREDICTORS[spec.task](**kwargs)
        self._decode = {"geometry": spec.preprocess.pixels, "shape": spec.preprocess.shape, "errors": "row",
                        "keep": (), "with_size": spec.task != "classification"}

    @property
    def model(self) -> "nn.Module":
        """The model, a plain `torch.nn.Module` in eval mode."""
        return self._predictor.model

    def transform(self, image: "Image.Image"):
        """A PIL image -> the (C, H, W) float tensor the model takes (the checkpoint's eval preprocessing)."""
        from raycv.data.decode import to_rgb

        return self.preprocess.normalize(self.preprocess.geometry(to_rgb(image))[None])[0]

    def __call__(self, images: "ImageLike | Iterable[ImageLike]", *, batch_size: int = 32) -> list[dict]:
        import numpy as np
        from PIL import Image

        from raycv.data.decode import decode_batch, to_rgb

        single = isinstance(images, (str, os.PathLike, Image.Image, np.ndarray))
        items = [images] if single else list(images)
        rows: list[dict] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            paths, arrays = [], []
            for item in chunk:
                if isinstance(item, (str, os.PathLike)):
                    paths.append(str(item))
                    arrays.append(None)  # read and decoded by decode_batch, an error there is the row's
                else:  # an in-memory image's row is named by its place in `images`
                    paths.append(f"<image {start + len(paths)}>")
                    arrays.append(np.asarray(to_rgb(item)) if isinstance(item, Image.Image) else np.asarray(item))
            column = np.empty(len(arrays), dtype=object)  # one object per row, never stacked into one array
            column[:] = arrays
            batch = {"path": np.asarray(paths, dtype=object), "image": column}
            rows += self._predictor(decode_batch(batch, **self._decode)).to_pylist()
        return rows

    def __repr__(self) -> str:
        return f"Predictor({self.task}, {type(self.model).__name__}, {len(self.classes)} classes, {self.checkpoint})"


def expand_images(specs: Sequence[str]) -> list[str]:
    """Files, folders (recursive) and globs -> image paths, sorted within each spec; a spec that
    matches nothing is an error naming it."""
    import glob

    from raycv.data.io import IMAGE_EXTENSIONS, list_files
    from raycv.errors import UserError

    out: list[str] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():  # listed as `raycv infer` lists a folder input
            found = list_files(str(p), IMAGE_EXTENSIONS)
        elif p.is_file():
            found = [str(p)]
        else:
            found = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        if not found:
            raise UserError(f"no images at {spec}" + ("" if p.exists() or any(c in spec for c in "*?[") else
                                                      " (no such file or folder)"))
        out += found
    return out
