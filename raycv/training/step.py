"""One training step on a worker: MixUp/CutMix, the forward under autocast, the backward scaled
for gradient accumulation, and every `grad_accum_steps` micro-batches (and at an epoch's last)
the optimizer step: unscale, clip, step, the schedule, the EMA.

The worker loop feeds it batches; tests drive it directly with a real model and optimizer to
observe each recipe feature (the forward's dtype and memory layout, soft targets, how often the
optimizer steps, the gradient norm it steps with)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from raycv.config import TrainSection
from raycv.training.optim import build_batch_mix, build_loss
from raycv.training.precision import Precision


def no_sync(model: nn.Module, skip: bool):
    """DDP all-reduces (FSDP reduce-scatters) gradients on every backward; between accumulation
    steps they need not."""
    if skip and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        from raycv.training.sharding import gradient_sync

        return gradient_sync(model, False)
    return model.no_sync() if skip and hasattr(model, "no_sync") else contextlib.nullcontext()


@dataclass
class StepResult:
    loss: torch.Tensor  # this micro-batch's loss (unscaled)
    stepped: bool  # the optimizer stepped after this micro-batch
    grad_norm: float | None = None  # the total gradient norm before clipping (with clipping on)


class Stepper:
    """`model` is what the loop trains (DDP-wrapped or not), `forward` what it calls (the model, or
    its torch.compile); `ema`, when given, averages `ema_source` (the unwrapped model)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, loss_fn, precision: Precision,
                 batches_per_epoch: int, grad_accum_steps: int = 1, grad_clip_norm: float | None = None, mix=None,
                 ema=None, ema_source: nn.Module | None = None, forward: nn.Module | None = None,
                 detection: bool = False, distill=None, masks=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loss_fn, self.precision, self.mix = loss_fn, precision, mix
        self.forward = forward if forward is not None else model
        self.batches_per_epoch, self.accum, self.clip = batches_per_epoch, grad_accum_steps, grad_clip_norm
        self.ema, self.ema_source, self.detection = ema, ema_source, detection
        self.distill = distill  # a Distiller: the loss with a teacher's outputs (raycv.training.distill)
        self.masks = masks or []  # (weight, mask): an unstructured pruning's zeros, kept (raycv.training.pruning)
        self.micro = 0

    def begin_epoch(self) -> None:
        self.micro = 0
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, x, y, teacher_logits=None) -> StepResult:
        """x: (B, C, H, W) normalized float images; y: class indices, masks, or detection targets;
        `teacher_logits`: a teacher's outputs on x read from disk (offline distillation)."""
        if self.mix is not None:
            x, y = self.mix(x, y)  # y: (B, num_classes) probabilities
        self.micro += 1
        last = self.micro % self.accum == 0 or self.micro == self.batches_per_epoch
        with no_sync(self.model, not last), self.precision.autocast():
            if self.detection:  # torchvision detection models: a list of images and targets in, their loss dict out
                loss = sum(self.forward(list(self.precision.input(x)), y).values())
            elif self.distill is not None:
                loss = self.distill(x, self.forward(self.precision.input(x)), y, teacher_logits)
            else:
                loss = self.loss_fn(self.forward(self.precision.input(x)), y)
        self.precision.scaler.scale(loss / self.accum).backward()
        if not last:
            return StepResult(loss, False)
        norm = None
        if self.clip:
            self.precision.scaler.unscale_(self.optimizer)
            total = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)  # FSDP: over every shard
        self.precision.scaler.step(self.optimizer)
        self.precision.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.masks:
            with torch.no_grad():
                for weight, mask in self.masks:
                    weight.mul_(mask)
        if self.ema is not None:
            self.ema.update_parameters(self.ema_source)
        return StepResult(loss, True, norm if norm is None or math.isfinite(norm) else None)


def build_stepper(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, cfg: TrainSection, task: str,
                  num_classes: int, precision: Precision, batches_per_epoch: int, ema=None,
                  ema_source: nn.Module | None = None, student_norm=None, device=None, masks=None) -> Stepper:
    """The step `train.*` asks for: the loss (label smoothing), MixUp/CutMix (classification),
    accumulation, clipping, the EMA, torch.compile, a teacher (`train.distill`; `student_norm`: the
    (mean, std) the batches are normalized with). Detection models compute their own losses."""
    loss_fn = None if task == "detection" else build_loss(cfg, task)
    distill = None
    if (cfg.distill.teacher or cfg.distill.logits) and task == "classification":
        from raycv.training.distill import build_distiller

        distill = build_distiller(cfg.distill, loss_fn=loss_fn, student_mean=student_norm[0],
                                  student_std=student_norm[1], device=device or torch.device("cpu"))
    return Stepper(model, optimizer, scheduler, loss_fn=loss_fn,
                   precision=precision, batches_per_epoch=batches_per_epoch, grad_accum_steps=cfg.grad_accum_steps,
                   grad_clip_norm=cfg.grad_clip_norm,
                   mix=build_batch_mix(cfg, num_classes) if task == "classification" else None,
                   ema=ema, ema_source=ema_source, forward=torch.compile(model) if cfg.compile else None,
                   detection=task == "detection", distill=distill, masks=masks)
