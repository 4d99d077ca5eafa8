"""Optimizers, the learning-rate schedule, the loss and top-k accuracy."""

from __future__ import annotations

import math

import torch
from torch import nn

from raycv.config import OptimSection, TrainSection


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, cfg: OptimSection) -> list[dict]:
    """Weight decay for weights of convolutions and linear layers only, unless
    `decay_norm_and_bias` (torchvision's reference recipe: --norm-weight-decay 0 and no decay on
    biases in its newer recipes; timm does the same)."""
    if cfg.decay_norm_and_bias or cfg.weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if isinstance(module, _NORM_TYPES) or name == "bias" or p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(params, cfg: OptimSection) -> torch.optim.Optimizer:
    """`params`: a module (weight-decay groups are made here) or an iterable of parameters / groups."""
    if isinstance(params, nn.Module):
        params = param_groups(params, cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, steps_per_epoch: int, cfg: TrainSection) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then decay."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.warmup_factor + (1.0 - cfg.warmup_factor) * step / warmup
    if cfg.lr_schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if cfg.lr_schedule == "step":
        return cfg.step_gamma ** (step // (cfg.step_epochs * steps_per_epoch))
    return 1.0


def build_scheduler(optimizer, *, steps_per_epoch: int, cfg: TrainSection) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch=steps_per_epoch, cfg=cfg))


def follow_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                  values: list[dict]) -> None:
    """After a resume: the optimizer's values (lr, weight decay, momentum, ...) are this run's config's,
    not the checkpoint's (the same unless the config changed them: raycv tune's PBT does), at the
    step the checkpoint's schedule had reached. `values`: the param groups as built from the config."""
    for group, fresh in zip(optimizer.param_groups, values, strict=True):
        group.update(fresh)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    factors = [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, factors):
        group["lr"] = base * factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def build_loss(cfg: TrainSection, task: str = "classification") -> nn.Module:
    """Cross-entropy; it takes class indices or, after MixUp/CutMix, class probabilities.
    Segmentation: per-pixel cross-entropy on torchvision's output dict (void pixels ignored)."""
    if task == "segmentation":
        return SegmentationLoss(label_smoothing=cfg.label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


class SegmentationLoss(nn.Module):
    """torchvision's segmentation reference: cross-entropy on `out` plus 0.5 x on `aux` when the
    model has an auxiliary head; pixels labelled 255 (void) count for nothing."""

    def __init__(self, label_smoothing: float = 0.0, aux_weight: float = 0.5):
        super().__init__()
        from raycv.data.presets import IGNORE_INDEX

        self.ce = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
        self.aux_weight = aux_weight

    def forward(self, outputs, target):
        loss = self.ce(outputs["out"], target)
        if outputs.get("aux") is not None:
            loss = loss + self.aux_weight * self.ce(outputs["aux"], target)
        return loss


def build_batch_mix(cfg: TrainSection, num_classes: int):
    """torchvision's MixUp / CutMix (one of them per batch when both are on), or None."""
    from torchvision.transforms import v2

    mixes = []
    if cfg.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def correct_topk(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many of the batch have the target among the top-k logits, for each k.

    output: (B, num_classes) logits; target: (B,) class indices. k larger than the class count
    counts every sample.
    """
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices  # (B, maxk)
    hits = pred.eq(target.view(-1, 1))  # (B, maxk)
    return [int(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in topk]


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[float]:
    n = max(1, target.shape[0])
    return [c / n for c in correct_topk(output, target, topk)]
