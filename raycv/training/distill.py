"""Knowledge distillation (Hinton et al., 2015): a student learns from a teacher's softened outputs
as well as from the labels.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

Online: the teacher (a raycv classification checkpoint) runs in every training worker beside the
student, in eval mode and without gradients, on the same augmented batch. The batch reaches the
teacher as its own checkpoint's preprocessing expects it: the student's normalization is undone and
the teacher's applied, and the images are resized when the teacher was trained at another input
size. A teacher of another task or other classes is refused in one line before training starts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raycv.errors import UserError


def check_teacher(teacher: str, task: str, classes: list[str] | None = None) -> None:
    """The teacher is a raycv classification checkpoint (or run) with the run's classes, in order."""
    from raycv.training import checkpoint as ckpt

    try:
        info = ckpt.read_info(ckpt.resolve_checkpoint(teacher))
    except UserError as e:
        raise UserError(f"train.distill.teacher: {e}") from None
    if task != "classification" or info.task != "classification":
        raise UserError(f"train.distill.teacher={teacher}: distillation is for classification; "
                        f"the teacher is {info.task} and this run trains {task}")
    if classes is not None and list(info.classes) != list(classes):
        diff = next((f"class {i} is {a!r} there, {b!r} here" for i, (a, b) in enumerate(zip(info.classes, classes))
                     if a != b), f"{len(info.classes)} classes there, {len(classes)} here")
        raise UserError(f"train.distill.teacher={teacher} was trained on other classes ({diff})")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x KL(teacher || student) on temperature-softened distributions, averaged over the batch
    (the T^2 keeps the soft term's gradients on the scale of the hard one's as T changes)."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=1), F.log_softmax(teacher.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


class Distiller(nn.Module):
    """The training loss with a teacher: `distiller(x, student_logits, y)`, where `x` is the
    batch as the student saw it (normalized with the student's mean and std)."""

    def __init__(self, teacher: nn.Module, teacher_preset, student_mean, student_std, *, loss_fn: nn.Module,
                 temperature: float, alpha: float):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.loss_fn, self.temperature, self.alpha = loss_fn, temperature, alpha
        self.size = int(teacher_preset.input_size)
        # x_teacher = (x * s_std + s_mean - t_mean) / t_std = x * scale + shift, per channel
        s_mean, s_std = torch.tensor(student_mean), torch.tensor(student_std)
        t_mean, t_std = torch.tensor(teacher_preset.mean), torch.tensor(teacher_preset.std)
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)
        self.last_kd = torch.zeros(())

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()  # the teacher's batch-norm statistics and dropout stay as trained
        return self

    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward(self, x: torch.Tensor, student: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(self.teacher_input(x))
        kd = kd_loss(student, teacher, self.temperature)
        self.last_kd = kd.detach()
        if self.alpha >= 1.0:
            return kd
        return self.alpha * kd + (1.0 - self.alpha) * self.loss_fn(student, y)


def build_distiller(cfg, *, loss_fn: nn.Module, student_mean, student_std, device: torch.device) -> Distiller | None:
    """The `train.distill` section's Distiller, its teacher loaded (tensors only) onto `device`; or
    None when no teacher is set."""
    if not cfg.teacher:
        return None
    from raycv.training import checkpoint as ckpt

    teacher, info = ckpt.load_model(ckpt.resolve_checkpoint(cfg.teacher))
    return Distiller(teacher, info.preprocess, student_mean, student_std, loss_fn=loss_fn,
                     temperature=cfg.temperature, alpha=cfg.alpha).to(device)
