"""`raycv quantize`: post-training int8 quantization of a checkpoint for CPU inference.

The path is PyTorch's FX graph mode quantization (`torch.ao.quantization.quantize_fx`), which ships
with torch: the model is traced, observers are calibrated on a few hundred images preprocessed as the
checkpoint's eval preset says, and convolutions and linear layers become int8 kernels (x86: oneDNN /
FBGEMM; ARM: QNNPACK) that run in eager mode, in every Ray actor, with no compile step. It is
deprecated in favour of torchao's PT2E flow, which we tried and did not take (docs/compression.md):
with torch 2.14.1 and torchao 0.18.0, PT2E's x86 quantizer fails on an exported torchvision
ResNet-18 ("Input partition has more than one output node"), and a PT2E model runs int8 only once
torch.compile has lowered it, a compile per process.

Where tracing fails (torchvision detection models: data-dependent control flow), the linear layers
alone are quantized dynamically (weights int8, activations quantized per batch), said in one line.

The output is a raycv checkpoint like any other: `model.pt` holds the quantized state_dict (tensors
only: int8 tensors with their scales and zero points), `raycv.json` records `quantization` (method,
backend, calibration), and `raycv infer`, `raycv predict` and `raycv.load` rebuild the int8 model from
the float architecture and load it (`rebuild`)."""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raycv.errors import UserError

BACKENDS = ("x86", "qnnpack")


@dataclass
class QuantizeSummary:
    output: str
    method: str  # static (FX, calibrated) or dynamic (linear layers only)
    backend: str
    calibration_images: int
    size_mb_fp32: float
    size_mb_int8: float
    top1_agreement: float  # int8 vs fp32 top-1 on the calibration images (classification)
    max_abs_diff: float | None  # int8 vs fp32 outputs on those images (detection: None)
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _quiet():
    """torch.ao's deprecation and observer warnings are noise to a user of this command."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*(reduce_range|must run observer|quantize_per_tensor|TypedStorage).*")
        yield


def _engine(backend: str) -> None:
    if backend not in torch.backends.quantized.supported_engines:
        raise UserError(f"this checkpoint is quantized for the {backend} backend, which this torch build lacks "
                        f"(it has {', '.join(e for e in torch.backends.quantized.supported_engines if e != 'none')})")
    torch.backends.quantized.engine = backend


def _prepare_static(model: nn.Module, backend: str, shape: tuple[int, ...]) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    return prepare_fx(model.eval(), get_default_qconfig_mapping(backend), (torch.zeros(1, *shape),))


def _convert_static(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    return convert_fx(prepared)


def _dynamic(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)


def rebuild(model: nn.Module, quantization: dict[str, Any], shape: tuple[int, ...]) -> nn.Module:
    """The int8 module of `model`'s architecture, as `quantize_checkpoint` made it, ready for its
    state_dict (observers uncalibrated: the scales and zero points come with the weights)."""
    method, backend = quantization.get("method"), quantization.get("backend", "x86")
    _engine(backend)
    with _quiet():
        if method == "static":
            return _convert_static(_prepare_static(model, backend, shape)).eval()
        if method == "dynamic":
            return _dynamic(model)
    raise UserError(f"unknown quantization method {method!r} in the checkpoint (this raycv knows static, dynamic)")


def calibration_batches(info, specs: list[str] | None, images: int, *, seed: int = 0) -> tuple[torch.Tensor, int]:
    """(N, C, S, S) normalized images the checkpoint's eval preset makes of `specs` (files, folders,
    globs: `images` of them, evenly spaced over the sorted listing), or of the checkpoint's own
    training split when `specs` is empty (read through Ray Data on a local or given instance)."""
    import numpy as np

    from raycv.data.decode import decode_batch

    preset = info.preprocess
    if specs:
        from raycv.api import expand_images

        paths = expand_images(specs)
        pick = sorted(set(np.linspace(0, len(paths) - 1, num=min(images, len(paths))).round().astype(int).tolist()))
        batch = {"path": np.asarray([paths[i] for i in pick], dtype=object)}  # read from their paths
    else:
        batch = _training_rows(info, images)
    decoded = decode_batch(batch, geometry=preset.pixels, shape=preset.shape, errors="row", keep=())
    ok = np.array([not e for e in decoded["error"]], dtype=bool)
    if not ok.any():
        raise UserError("no calibration image could be decoded")
    return preset.normalize(torch.from_numpy(np.ascontiguousarray(decoded["image"][ok]))), int(ok.sum())


def _training_rows(info, images: int) -> dict:
    """`images` rows of the split the checkpoint trained on (its recorded data section)."""
    import numpy as np

    from raycv import runtime
    from raycv.config import DataSection
    from raycv.data import build_dataset

    recorded = (info.config or {}).get("data")
    if not recorded:
        raise UserError("the checkpoint records no training data: give --calibration IMAGES (files, folders, globs)")
    try:
        data = DataSection.model_validate(recorded)
    except Exception:
        raise UserError("the checkpoint's recorded data section is not readable here: give --calibration IMAGES") from None
    runtime.connect(os.environ.get("RAY_ADDRESS"), verbose=False)
    rows = build_dataset(data).train.limit(images).take_all()
    column = np.empty(len(rows), dtype=object)  # encoded bytes where the source carries them, else None: read the path
    column[:] = [r.get("bytes") for r in rows]
    return {"path": np.asarray([r.get("path") or f"<row {i}>" for i, r in enumerate(rows)], dtype=object),
            "bytes": column}


def quantize_checkpoint(checkpoint: str, output: str | os.PathLike, *, calibration: list[str] | None = None,
                        images: int = 256, backend: str = "x86", method: str = "auto") -> QuantizeSummary:
    from raycv.training import checkpoint as ckpt

    t0 = time.perf_counter()
    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if method not in ("auto", "static", "dynamic"):
        raise UserError(f"--method must be auto, static or dynamic, got {method!r}")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out} exists and is not empty; give a new folder")
    directory = ckpt.resolve_checkpoint(str(checkpoint))
    model, info = ckpt.load_model(directory)
    fp32_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor)) / 1e6  # model.pt's tensors
    if info.quantization:
        raise UserError(f"{directory} is already quantized ({info.quantization.get('method')} int8)")
    _engine(backend)
    shape = info.preprocess.shape
    x, n = (calibration_batches(info, calibration, images) if method != "dynamic" or info.task == "classification"
            else (torch.zeros(1, *shape), 0))
    with _quiet(), torch.inference_mode():
        reference = _outputs(model, info.task, x)
    chosen, why = method, ""
    with _quiet():
        if method in ("auto", "static"):
            try:
                prepared = _prepare_static(copy.deepcopy(model), backend, shape)
            except Exception as e:  # FX cannot trace it (detection's data-dependent control flow)
                if method == "static":
                    raise UserError(f"{info.model_name} cannot be traced for static quantization "
                                    f"({str(e).splitlines()[0][:200]}); use --method dynamic") from None
                chosen, why = "dynamic", f"{info.model_name} cannot be traced for static quantization; its linear layers are quantized dynamically"
            else:
                chosen = "static"
                with torch.inference_mode():
                    for start in range(0, len(x), 32):
                        prepared(x[start:start + 32])
                quantized = _convert_static(prepared).eval()
        if chosen == "dynamic":
            if not any(isinstance(m, nn.Linear) for m in model.modules()):
                raise UserError(f"{info.model_name} has no linear layers for dynamic quantization"
                                f"{' and cannot be traced for static quantization' if why else ''}: nothing to quantize")
            quantized = _dynamic(copy.deepcopy(model))
    with _quiet(), torch.inference_mode():
        got = _outputs(quantized, info.task, x)
    agreement, diff = _compare(reference, got, info.task)
    qmeta = {"method": chosen, "backend": backend, "dtype": "int8", "calibration_images": n if chosen == "static" else 0,
             "source": str(directory), **({"note": why} if why else {})}
    out.mkdir(parents=True, exist_ok=True)
    q_info = ckpt.CheckpointInfo(task=info.task, model_name=info.model_name, model_kwargs=info.model_kwargs,
                                 classes=info.classes, preprocess=info.preprocess, epoch=info.epoch,
                                 metrics={**info.metrics, "int8_top1_agreement": agreement, "int8_max_abs_diff": diff},
                                 config=info.config, quantization=qmeta, pruning=info.pruning)
    with _quiet():
        ckpt.write_checkpoint(out, quantized, q_info)
    int8_mb = (out / ckpt.MODEL_FILE).stat().st_size / 1e6
    return QuantizeSummary(str(out), chosen, backend, qmeta["calibration_images"], round(fp32_mb, 3), round(int8_mb, 3),
                           agreement, diff, round(time.perf_counter() - t0, 1))


def _outputs(model: nn.Module, task: str, x: torch.Tensor):
    if task == "detection":
        return [model([img])[0] for img in x[:8]]
    outs = [model(x[i:i + 32]) for i in range(0, len(x), 32)]
    if task == "segmentation":
        return torch.cat([o["out"] for o in outs])
    return torch.cat(outs)


def _compare(reference, got, task: str) -> tuple[float, float | None]:
    """(top-1 agreement: classification per image, segmentation per pixel; detection: the share of
    images with as many boxes; the largest absolute difference of the float outputs)."""
    if task == "detection":
        same = [len(r["boxes"]) == len(g["boxes"]) for r, g in zip(reference, got)]
        return round(sum(same) / max(len(same), 1), 4), None
    agree = (reference.argmax(1) == got.argmax(1)).float().mean().item()
    return round(agree, 4), round(float((reference - got).abs().max()), 5)
