"""One registry that maps a model name to its constructor (after torchvision's `_api.py`).

`register_model` adds a constructor; a duplicate name raises. `get_model` builds a model by name
and raises with the list of valid names for an unknown one. `list_models` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from raycv import plugins
from raycv.errors import UserError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]  # builder(*, num_classes, weights, **kwargs) -> nn.Module
    task: str  # "classification" (detection / segmentation later)
    source: str  # "raycv", "torchvision", "timm" or the plugin module that registered it
    default_input_size: int  # the input side the model was designed for, pixels


_MODELS: dict[str, ModelEntry] = {}
# The modules that register torchvision's models (and raycv's built on torchvision), imported on demand.
BUILTINS = ("raycv.models.torchvision_zoo", "raycv.models.detection", "raycv.models.resnet",
            "raycv.models.segmentation")


def load_builtins() -> None:
    """Register every built-in model (a no-op once done; the import system keeps them)."""
    import importlib

    for module in BUILTINS:
        importlib.import_module(module)


def register_model(
    name: str, *, task: str = "classification", source: str = "raycv", default_input_size: int = 224
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        module = getattr(builder, "__module__", "") or ""
        if not module.startswith("raycv.models."):
            load_builtins()  # a plugin's name is checked against every built-in one
        if name in _MODELS:
            raise plugins.NameTaken(f"model {name!r} is already registered (by {_MODELS[name].source})")
        if name.startswith(TIMM_PREFIX):
            raise plugins.NameTaken(f"model names starting with {TIMM_PREFIX!r} are timm's")
        origin = source if source != "raycv" or module.startswith("raycv.") or not module else module
        _MODELS[name] = ModelEntry(name, builder, task, origin, default_input_size)
        return builder

    return wrap


TIMM_PREFIX = "timm/"


def get_model_entry(name: str) -> ModelEntry:
    if name.startswith(TIMM_PREFIX):
        from raycv.models.timm_zoo import timm_entry

        return timm_entry(name)
    if name not in _MODELS:
        load_builtins()
    if name not in _MODELS:
        plugins.load_entry_points()
    try:
        return _MODELS[name]
    except KeyError:
        raise UserError(
            f"unknown model {name!r} (valid: {', '.join(sorted(_MODELS))}, timm/<name> with timm installed; "
            f"a model of your own: load its plugin with --import MODULE or run.plugins)"
        ) from None


def get_model(name: str, *, num_classes: int, weights: str | None = None, **kwargs) -> nn.Module:
    """Build a model by registry name. `weights` names pretrained torchvision weights."""
    entry = get_model_entry(name)
    if weights is not None and entry.source not in ("torchvision", "timm"):
        raise UserError(f"model {name!r} has no pretrained weights (only torchvision and timm models do)")
    try:
        return entry.builder(num_classes=num_classes, weights=weights, **kwargs)
    except TypeError as e:
        raise UserError(f"model {name!r} does not take these arguments {kwargs}: {e}") from None


def list_models(task: str | None = None) -> list[ModelEntry]:
    load_builtins()
    plugins.load_entry_points()
    return [e for _, e in sorted(_MODELS.items()) if task is None or e.task == task]
