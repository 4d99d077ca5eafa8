"""A classifier's head, found in any model: torch only, so that finding it imports no torchvision."""

from __future__ import annotations

from torch import nn

from raycv.errors import UserError


def _is_linear(m: nn.Module) -> bool:
    """nn.Linear, or its int8 form in a quantized checkpoint (torch.ao.nn.quantized[.dynamic].Linear)."""
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Linear" and type(m).__module__.startswith("torch.ao.nn.quantized"))


def last_linear_name(model: nn.Module) -> str:
    """The classifier head: the last linear layer in module order (fc, heads.head, classifier.1, ...)."""
    names = [n for n, m in model.named_modules() if _is_linear(m)]
    if not names:
        raise UserError(f"{type(model).__name__} has no linear classifier head to replace")
    return names[-1]
