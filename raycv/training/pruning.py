"""Pruning a trained model before its fine-tuning run (`train.prune.*`, with `model.init_from`).

- `global_magnitude`: torch's `global_unstructured` with L1 magnitude picks the smallest `amount` of
  all convolution and linear weights of the model together; they are set to zero, and kept at zero
  through the fine-tuning (the masks are re-applied after every optimizer step), so every checkpoint
  holds the pruning made permanent: plain weights with zeros, loadable by any code. Sparse, not
  smaller: dense kernels run at the same speed.
- `ln_structured`: Torch-Pruning's dependency graph removes `amount` of the output channels of every
  convolution and hidden linear layer (L2 norm of each channel's weights), with the layers that
  consume them (batch norms, the next layer's input channels, residual adds, the flatten before a
  classifier), so the model is smaller and faster. The classifier keeps its classes.

A structurally pruned checkpoint is still tensors only: its architecture is the registered model's
with the layer widths its tensors have. `raycv.json` records `pruning`, and the loader shapes a fresh
model's layers to the saved tensors (`shaped_like`) before loading them."""

from __future__ import annotations

import torch
from torch import nn

from raycv.errors import UserError

METHODS = ("global_magnitude", "ln_structured")


def check(prune_cfg, *, task: str, init_from: str | None) -> None:
    """Before Ray starts: what pruning needs."""
    if not prune_cfg.amount:
        return
    if not init_from:
        raise UserError("train.prune needs model.init_from=CHECKPOINT: the trained model to prune, then fine-tune")
    if prune_cfg.method == "ln_structured":
        if task != "classification":
            raise UserError(f"train.prune.method=ln_structured is for classification models; this run trains {task} "
                            f"(train.prune.method=global_magnitude prunes any model)")
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            raise UserError("train.prune.method=ln_structured needs torch-pruning, which is not installed: "
                            "pip install 'raycv[prune]'") from None


def _prunable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def prune(model: nn.Module, prune_cfg, input_shape: tuple[int, ...]) -> nn.Module:
    """`model` (loaded from model.init_from) pruned in place as `prune_cfg` says."""
    if prune_cfg.method == "global_magnitude":
        from torch.nn.utils import prune as torch_prune

        params = [(m, "weight") for m in _prunable(model)]
        torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=prune_cfg.amount)
        for m, name in params:
            torch_prune.remove(m, name)  # permanent: the weight itself holds the zeros
        return model
    import torch_pruning as tp

    from raycv.models import last_linear_name

    head = model.get_submodule(last_linear_name(model))
    was_training = model.training
    pruner = tp.pruner.MagnitudePruner(model.eval(), torch.zeros(1, *input_shape),
                                       importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=prune_cfg.amount, ignored_layers=[head])
    pruner.step()
    return model.train(was_training)


def masks(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, mask) of every convolution and linear layer: 1 where the weight is not zero. Re-applied
    after each optimizer step, they keep an unstructured pruning's zeros through the fine-tuning (and,
    derived from the weights, across a resume)."""
    return [(m.weight, (m.weight.detach() != 0).to(m.weight.dtype)) for m in _prunable(model)]


def sparsity(model: nn.Module) -> float:
    """The share of convolution and linear weights that are zero."""
    ws = [m.weight.detach() for m in _prunable(model)]
    total = sum(w.numel() for w in ws)
    return sum(int((w == 0).sum()) for w in ws) / max(total, 1)


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def shaped_like(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """`model` (freshly built from the registry) with each layer resized to the widths of `state`'s
    tensors: a structurally pruned checkpoint's architecture. Layers whose shapes match are left as
    they are; one that cannot be resized is one line naming it."""
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        w = state.get(f"{prefix}weight")
        if w is None or getattr(m, "weight", None) is None or m.weight.shape == w.shape:
            continue
        if isinstance(m, nn.Conv2d):
            depthwise = m.groups > 1 and m.groups == m.in_channels
            m.out_channels = int(w.shape[0])
            m.groups = int(w.shape[0]) if depthwise else m.groups
            m.in_channels = int(w.shape[1]) * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = int(w.shape[0]), int(w.shape[1])
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_features = int(w.shape[0])
        elif isinstance(m, nn.GroupNorm):
            m.num_channels = int(w.shape[0])
        elif isinstance(m, nn.LayerNorm):
            m.normalized_shape = tuple(int(s) for s in w.shape)
        else:
            raise UserError(f"cannot shape {name} ({type(m).__name__}) to the pruned checkpoint's "
                            f"{tuple(w.shape)} weight")
        for pname, p in list(m.named_parameters(recurse=False)):
            if f"{prefix}{pname}" in state:
                setattr(m, pname, nn.Parameter(torch.empty_like(state[f"{prefix}{pname}"]), requires_grad=p.requires_grad))
        for bname, b in list(m.named_buffers(recurse=False)):
            if b is not None and f"{prefix}{bname}" in state:
                m.register_buffer(bname, torch.empty_like(state[f"{prefix}{bname}"]))
    return model
