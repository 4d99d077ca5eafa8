"""Knowledge distillation (Hinton et al., 2015): a student learns from a teacher's softened outputs
as well as from the labels.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

Online: the teacher (a raycv classification checkpoint) runs in every training worker beside the
student, in eval mode and without gradients, on the same augmented batch. The batch reaches the
teacher as its own checkpoint's preprocessing expects it: the student's normalization is undone and
the teacher's applied, and the images are resized when the teacher was trained at another input
size. A teacher of another task or other classes is refused in one line before training starts.

Offline: the teacher ran once over the training images (`raycv infer infer.logits=true`), and its
`logits` column is joined to the training rows by path in the decode tasks (`attach_logits`). The
pairing holds only if the student sees each image as it is: no random augmentation (checked before
Ray starts). A training image without its teacher row is one line naming it."""

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
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None  # None: offline
        self.loss_fn, self.temperature, self.alpha = loss_fn, temperature, alpha
        if teacher is None:
            self.last_kd = torch.zeros(())
            return
        self.size = int(teacher_preset.input_size)
        # x_teacher = (x * s_std + s_mean - t_mean) / t_std = x * scale + shift, per channel
        s_mean, s_std = torch.tensor(student_mean), torch.tensor(student_std)
        t_mean, t_std = torch.tensor(teacher_preset.mean), torch.tensor(teacher_preset.std)
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)
        self.last_kd = torch.zeros(())

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher's batch-norm statistics and dropout stay as trained
        return self

    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward(self, x: torch.Tensor, student: torch.Tensor, y: torch.Tensor,
                teacher: torch.Tensor | None = None) -> torch.Tensor:
        """`teacher`: its logits for this batch, when read from disk (offline); else it runs here."""
        if teacher is None:
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
    if cfg.logits:
        return Distiller(None, None, student_mean, student_std, loss_fn=loss_fn, temperature=cfg.temperature,
                         alpha=cfg.alpha).to(device)
    if not cfg.teacher:
        return None
    from raycv.training import checkpoint as ckpt

    teacher, info = ckpt.load_model(ckpt.resolve_checkpoint(cfg.teacher))
    return Distiller(teacher, info.preprocess, student_mean, student_std, loss_fn=loss_fn,
                     temperature=cfg.temperature, alpha=cfg.alpha).to(device)


# ----------------------------------------------------------------------------------------------
# Offline: the teacher's logits from a raycv infer output, joined to the training rows by path
# ----------------------------------------------------------------------------------------------

AUGMENTING = (("data.augment", lambda c: c.data.augment != "none"), ("train.mixup_alpha", lambda c: c.train.mixup_alpha > 0),
              ("train.cutmix_alpha", lambda c: c.train.cutmix_alpha > 0),
              ("data.random_erasing", lambda c: c.data.random_erasing > 0), ("data.hflip", lambda c: c.data.hflip))


def check_offline(cfg, task: str, classes: list[str] | None = None) -> None:
    """`train.distill.logits` before Ray starts (and, with `classes`, once the dataset is known): a
    complete raycv output with a `logits` column, of the run's classes, and a recipe that shows the
    student each image as it is."""
    from raycv.inference.output import OutputLocation

    d = cfg.train.distill
    if not d.logits:
        return
    if d.teacher:
        raise UserError("train.distill: give a teacher (online) or logits (offline), not both")
    if task != "classification":
        raise UserError(f"train.distill.logits: distillation is for classification; this run trains {task}")
    changed = next((key for key, on in AUGMENTING if on(cfg)), None)
    if changed:
        raise UserError(f"train.distill.logits pairs each image with the teacher's outputs on it as it is, and {changed} "
                        f"changes the image: set data.augment=none with no MixUp, CutMix, random erasing or flips, "
                        f"or distill online (train.distill.teacher)")
    location = OutputLocation(d.logits)
    manifest = location.manifest()
    if manifest is None:
        raise UserError(f"train.distill.logits={d.logits} is not a complete raycv infer output")
    if not manifest.files or "logits" not in _schema_names(location, manifest.files[0]):
        raise UserError(f"train.distill.logits={d.logits} has no logits column: infer with infer.logits=true")
    there = manifest.metadata.get("classes")
    if classes is not None and there != list(classes):
        raise UserError(f"train.distill.logits={d.logits} holds the logits of other classes "
                        f"({len(there or [])} there, {len(classes)} here)")


def _schema_names(location, name: str) -> list[str]:
    import pyarrow.parquet as pq

    with location.fs.open_input_file(f"{location.path}/{name}") as f:
        return pq.read_schema(f).names


_LOOKUPS: dict[tuple[str, str], tuple[dict[str, int], "np.ndarray"]] = {}


def _lookup(predictions: str, version: str):
    """(path -> row, (rows, classes) float32 logits) of a raycv infer output, read once per process
    and `version` (its manifest's digest: a Ray worker process outlives a run, and the output may
    be written again): about 100 bytes per row beside the logits themselves."""
    import numpy as np

    if (predictions, version) not in _LOOKUPS:
        from raycv.inference.output import read_output

        table = read_output(predictions, columns=["path", "logits"])
        column = table.column("logits").combine_chunks()
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        matrix = column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), column.type.list_size)
        index = {p: i for i, p in enumerate(table.column("path").to_pylist()) if valid[i]}
        _LOOKUPS.clear()
        _LOOKUPS[(predictions, version)] = (index, matrix)
    return _LOOKUPS[(predictions, version)]


def attach_logits(batch: dict, *, predictions: str, version: str) -> dict:
    """Ray Data map_batches fn: the teacher's logits of each training row, by its path."""
    index, matrix = _lookup(predictions, version)
    rows = [index.get(str(p), -1) for p in batch["path"]]
    if -1 in rows:
        missing = batch["path"][rows.index(-1)]
        raise UserError(f"train.distill.logits={predictions} has no teacher row for the training image {missing} "
                        f"(infer over the same images: registry:<dataset>:train, or the same folder)")
    return {**batch, "logits": matrix[rows]}


def check(cfg, task: str, classes: list[str] | None = None) -> None:
    """`train.distill` before Ray starts, and again with `classes` once the dataset is known."""
    if cfg.train.distill.teacher:
        check_teacher(cfg.train.distill.teacher, task, classes)
    check_offline(cfg, task, classes)


def with_teacher_logits(ds, cfg):
    """The training rows with the teacher's logits joined by path (train.distill.logits), in Ray Data
    tasks; `ds` as it is otherwise."""
    import hashlib

    from raycv.inference.output import OutputLocation

    if not cfg.train.distill.logits:
        return ds
    version = hashlib.sha256(OutputLocation(cfg.train.distill.logits).manifest().to_json().encode()).hexdigest()
    return ds.map_batches(attach_logits, fn_kwargs={"predictions": cfg.train.distill.logits, "version": version},
                          batch_format="numpy", num_cpus=cfg.data.decode_cpus)
