"""timm's image classifiers as `model.name=timm/<name>` (any `timm.list_models()` name), with the
optional extra: pip install 'raycv[timm]'.

Nothing here imports timm until a `timm/` name is asked for: its 1,000+ architectures are not
registered one by one. Pretrained weights (`model.weights=DEFAULT`, or a tag such as `c3_in1k`)
come from the Hugging Face cache ($HF_HOME; `HF_HUB_OFFLINE=1` keeps it to the cache) or are
downloaded there once; timm loads them tensors-only (safetensors, or `torch.load(weights_only=True)`).
A class count other than the weights' gets a new classifier (timm's own head reset).
"""

from __future__ import annotations

import difflib
from functools import lru_cache, partial

from torch import nn

from raycv.errors import UserError
from raycv.models.registry import TIMM_PREFIX, ModelEntry


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("timm models need the timm extra: pip install 'raycv[timm]'") from None
    return timm


def _build(arch: str, *, num_classes: int, weights: str | None = None, **kwargs) -> nn.Module:
    timm = _timm()
    if weights is None:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    name = arch if weights.upper() == "DEFAULT" else f"{arch}.{weights}"
    try:
        timm.get_pretrained_cfg(name, allow_unregistered=False)
    except Exception:
        tags = sorted({m.partition(".")[2] for m in timm.list_pretrained(f"{arch}.*")})
        raise UserError(f"timm model {arch!r} has no pretrained weights {weights!r} "
                        f"(valid: DEFAULT{', ' if tags else ''}{', '.join(tags)})") from None
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    except TypeError:
        raise
    except Exception as e:  # offline without the cached file, a hub error, a damaged file: one line
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"could not load timm weights {name!r}: not in the Hugging Face cache and the download "
                        f"failed ({type(e).__name__}{': ' + first if first else ''}); run once with internet "
                        f"access, or copy the cache ($HF_HOME) here") from None


@lru_cache(maxsize=None)
def timm_entry(name: str) -> ModelEntry:
    """The registry entry of `timm/<arch>`: built on demand, checked against timm's list."""
    timm = _timm()
    arch = name[len(TIMM_PREFIX):]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f" (close: {', '.join(close)})" if close else " (timm.list_models() lists them)"
        raise UserError(f"unknown timm model {arch!r}{hint}")
    try:
        size = int(timm.get_pretrained_cfg(arch).input_size[-1])
    except Exception:
        size = 224
    return ModelEntry(name, partial(_build, arch), "classification", "timm", size)
