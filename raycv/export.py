"""`raycv export`: a checkpoint out of raycv, as ONNX, TorchScript or safetensors, checked on the spot.

Every export carries what a consumer needs beside the weights: the task, the class names and the
preprocessing (mean, std, input size, resize). ONNX holds them in the model's metadata
(`metadata_props`); every format also gets a sidecar `<output>.json` with the same fields.

The exported graph is the model alone: it takes a float batch (N, 3, S, S) already preprocessed
(resized, cropped, scaled to [0, 1] and normalized with the recorded mean and std; detection:
letterboxed into S x S and scaled to [0, 1], the model normalizes itself) and returns

- classification: `logits` (N, classes);
- segmentation: `out` (N, classes, S, S), the logits at the input's size;
- detection (TorchScript and safetensors): torchvision's list of {boxes, labels, scores} per image,
  in the input's pixels. ONNX is refused: torch.export (the ONNX exporter's first step) fails on
  torchvision's post-processing, whose shapes depend on the data, and the legacy TorchScript-based
  exporter wrote a FCOS graph whose boxes differed from PyTorch's by up to 56 px on a sample
  (measured with torch 2.14, onnxruntime 1.32).

Each export is loaded back and run on sample inputs beside the PyTorch model (ONNX through
onnxruntime, TorchScript through `torch.jit.load`, safetensors by loading the tensors into a
freshly built model), and the largest difference is reported; above `tolerance` it is an error and
the export is removed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from raycv.errors import UserError

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
ONNX_SINGLE_FILE_BYTES = 1 << 30  # below this the weights go inside the .onnx (protobuf's limit is 2 GiB)


@dataclass
class ExportSummary:
    format: str
    output: str
    sidecar: str
    task: str
    model: str
    max_abs_diff: float  # the export against the PyTorch model on the sample inputs
    checked_with: str
    size_mb: float

    def to_json(self) -> dict:
        return asdict(self)


class _SegmentationOut(nn.Module):
    """torchvision segmentation models return {"out", "aux"}: export the logits alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _missing(module: str, extra: str = "export") -> UserError:
    return UserError(f"this export needs {module}, which is not installed: pip install 'raycv[{extra}]'")


def export_checkpoint(checkpoint: str, fmt: str, output: str | os.PathLike | None = None, *,
                      tolerance: float = 1e-3, samples: int = 2) -> ExportSummary:
    from raycv.training import checkpoint as ckpt

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    directory = ckpt.resolve_checkpoint(str(checkpoint))
    model, info = ckpt.load_model(directory)
    if info.quantization:
        raise UserError(f"{directory} is an int8 checkpoint (raycv quantize): export the float checkpoint it was "
                        f"made from ({info.quantization.get('source')}) and quantize with the target runtime's tools")
    out = Path(output) if output else Path(f"{Path(directory).name}{SUFFIX[fmt]}")
    if out.is_dir():
        raise UserError(f"--output {out} is a folder; give a file name (e.g. {out / ('model' + SUFFIX[fmt])})")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": f"raycv-export-{fmt}", "task": info.task, "model": info.model_name,
            "model_kwargs": info.model_kwargs, "classes": info.classes, "preprocess": info.preprocess.to_dict(),
            "input": "float32 (N, 3, S, S), preprocessed as `preprocess` says",
            "output": {"classification": "logits (N, classes)", "segmentation": "logits (N, classes, S, S)",
                       "detection": "per image: boxes (x1, y1, x2, y2 in input pixels), labels, scores"}[info.task]}
    generator = torch.Generator().manual_seed(0)
    size = info.preprocess.shape
    x = torch.rand((samples, *size), generator=generator)
    if info.task != "detection":
        x = info.preprocess.normalize((x * 255).round().to(torch.uint8))
    export = {"onnx": _onnx, "torchscript": _torchscript, "safetensors": _safetensors}[fmt]
    try:
        diff, how = export(model, info, x, out, meta)
    except BaseException:
        out.unlink(missing_ok=True)
        Path(f"{out}.data").unlink(missing_ok=True)
        raise
    sidecar = Path(f"{out}.json")
    if diff > tolerance:
        out.unlink(missing_ok=True)
        raise UserError(f"the {fmt} export differs from the PyTorch model by {diff:.2e} on sample inputs "
                        f"(tolerance {tolerance:g}); nothing written")
    sidecar.write_text(json.dumps({**meta, "max_abs_diff": diff, "checked_with": how}, indent=1) + "\n")
    size_mb = sum(p.stat().st_size for p in (out, Path(f"{out}.data")) if p.exists()) / 1e6
    return ExportSummary(fmt, str(out), str(sidecar), info.task, info.model_name, diff, how, round(size_mb, 2))


def _reference(model: nn.Module, task: str, x: torch.Tensor):
    with torch.inference_mode():
        if task == "segmentation":
            return model(x)["out"]
        if task == "detection":
            return model(list(x))
        return model(x)


def _detection_diff(ref: list[dict], got: list[dict]) -> float:
    """The largest difference between two detection outputs; the box sets must agree in number."""
    diff = 0.0
    for r, g in zip(ref, got):
        if r["boxes"].shape != g["boxes"].shape or not torch.equal(r["labels"], g["labels"]):
            return float("inf")
        for k in ("boxes", "scores"):
            if r[k].numel():
                diff = max(diff, float((r[k] - g[k]).abs().max()))
    return diff


def _onnx(model: nn.Module, info, x: torch.Tensor, out: Path, meta: dict) -> tuple[float, str]:
    if info.task == "detection":
        raise UserError(f"{info.model_name}: detection models are not exported to ONNX (torch.export cannot capture "
                        f"torchvision's post-processing, whose shapes depend on the data); use --format torchscript")
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise _missing(e.name or "onnx") from None
    net = _SegmentationOut(model).eval() if info.task == "segmentation" else model
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    batch = torch.export.Dim("batch", min=1, max=4096)
    out_name = "logits"
    try:
        program = torch.onnx.export(net, (x,), dynamo=True, input_names=["image"], output_names=[out_name],
                                    dynamic_shapes=({0: batch},), external_data=params >= ONNX_SINGLE_FILE_BYTES,
                                    verbose=False)
    except Exception as e:
        raise UserError(f"{info.model_name}: torch's ONNX exporter failed: {str(e).splitlines()[0]}") from None
    for key, value in meta.items():
        program.model.metadata_props[f"raycv.{key}"] = value if isinstance(value, str) else json.dumps(value)
    program.save(str(out), external_data=params >= ONNX_SINGLE_FILE_BYTES)
    onnx.checker.check_model(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probe = torch.cat([x, x[:1]])  # one more than traced: the batch axis is dynamic
    got = torch.from_numpy(session.run(None, {"image": probe.numpy()})[0])
    return float((got - _reference(model, info.task, probe)).abs().max()), f"onnxruntime {ort.__version__}"


def _torchscript(model: nn.Module, info, x: torch.Tensor, out: Path, meta: dict) -> tuple[float, str]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices: TorchScript is still what C++ and mobile load
        try:
            if info.task == "detection":
                scripted = torch.jit.script(model)  # torchvision's detection models are scriptable, not traceable
            else:
                net = _SegmentationOut(model).eval() if info.task == "segmentation" else model
                with torch.inference_mode(False), torch.no_grad():
                    scripted = torch.jit.trace(net, x)
        except Exception as e:
            raise UserError(f"{info.model_name}: TorchScript export failed: {str(e).splitlines()[0]}") from None
        torch.jit.save(scripted, str(out), _extra_files={"raycv.json": json.dumps(meta)})
        loaded = torch.jit.load(str(out))
        probe = torch.cat([x, x[:1]])
        with torch.no_grad():
            if info.task == "detection":
                _, got = loaded(list(probe))  # scripted detection models return (losses, detections)
                return _detection_diff(_reference(model, info.task, probe), got), f"torch.jit.load (torch {torch.__version__})"
            got = loaded(probe)
    return float((got - _reference(model, info.task, probe)).abs().max()), f"torch.jit.load (torch {torch.__version__})"


def _safetensors(model: nn.Module, info, x: torch.Tensor, out: Path, meta: dict) -> tuple[float, str]:
    try:
        from safetensors.torch import load_file, save_file
    except ImportError:
        raise _missing("safetensors") from None
    from raycv.models import get_model

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={f"raycv.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    fresh = get_model(info.model_name, num_classes=len(info.classes), **info.model_kwargs).eval()
    fresh.load_state_dict(load_file(str(out)))
    ref, got = _reference(model, info.task, x), _reference(fresh, info.task, x)
    if info.task == "detection":
        return _detection_diff(ref, got), "a fresh model loaded from the file"
    return float((got - ref).abs().max()), "a fresh model loaded from the file"
