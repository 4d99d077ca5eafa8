"""`raycv draw`: predictions drawn onto their images, so a person can look. Detections are boxes
with their class and score (torchvision's `draw_bounding_boxes`, one VOC colour per class),
segmentation masks are overlaid in VOC colours (`draw_segmentation_masks`), classification labels
written in a corner. Small images are enlarged first so the drawing is legible."""

from __future__ import annotations

import io

import numpy as np
import torch

from raycv.errors import UserError
from raycv.inference.output import OutputLocation, read_output

MIN_SIDE = 256  # smaller images are enlarged (nearest) to at least this before drawing


def _enlarge(img: torch.Tensor, factor: int) -> torch.Tensor:
    return img.repeat_interleave(factor, 1).repeat_interleave(factor, 2) if factor > 1 else img


def draw_predictions(predictions: str, output: str, *, limit: int = 16, alpha: float = 0.5,
                     score_threshold: float = 0.5) -> list[str]:
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from raycv.data.bundled import voc_palette
    from raycv.data.decode import open_rgb
    from raycv.data import io as fsio
    from raycv.data.io import read_bytes

    table = read_output(predictions)
    meta = OutputLocation(predictions).manifest().metadata
    task, classes = meta.get("task", "classification"), meta.get("classes") or []
    if table is None or table.num_rows == 0:
        raise UserError(f"{predictions} has no rows to draw")
    rows = sorted((r for r in table.to_pylist() if r["error"] is None), key=lambda r: r["path"])[:max(0, limit)]
    palette = np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)
    try:
        fsio.make_dirs(output)
    except OSError as e:
        raise UserError(f"cannot write drawings to {output}: {str(e).splitlines()[0]}") from None
    written = []
    for i, row in enumerate(rows):
        try:
            img = torch.from_numpy(np.array(open_rgb(read_bytes(row["path"])))).permute(2, 0, 1).contiguous()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot draw {row['path']}: {str(e).splitlines()[0]}") from None
        factor = max(1, -(-MIN_SIDE // min(img.shape[1:])))
        img = _enlarge(img, factor)
        if task == "segmentation":
            mask = _enlarge(torch.from_numpy(np.asarray(Image.open(io.BytesIO(row["mask_png"]))))[None], factor)[0]
            present = [k for k in range(1, len(classes)) if (mask == k).any()]  # 0 is the background
            if present:
                img = draw_segmentation_masks(img, torch.stack([mask == k for k in present]), alpha=alpha,
                                              colors=[tuple(int(c) for c in palette[k]) for k in present])
            caption = ", ".join(f"{classes[k]} {row['class_fractions'][k]:.0%}" for k in present) or "background"
        elif task == "detection":
            keep = [j for j, s in enumerate(row["scores"]) if s >= score_threshold]
            if keep:
                boxes = torch.tensor([row["boxes"][j] for j in keep], dtype=torch.float32) * factor
                img = draw_bounding_boxes(img, boxes, labels=[f"{row['labels'][j]} {row['scores'][j]:.2f}" for j in keep],
                                          colors=[tuple(int(c) for c in palette[row["label_indices"][j] % 256])
                                                  for j in keep], width=2, fill_labels=True, label_colors="white")
            caption = f"{len(keep)} detection(s) >= {score_threshold:g}"
        else:
            caption = f"{row['label']} {row['score']:.2f}"
        h, w = img.shape[1:]
        img = draw_bounding_boxes(img, torch.tensor([[0, 0, w - 1, min(h - 1, 14)]]), labels=[caption],
                                  colors="white", fill=False, width=0)
        stem = row["path"].replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        path = fsio.join(output, f"{i:04d}_{stem}.png")
        png = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(png, format="PNG")
        fsio.write_bytes(path, png.getvalue())
        written.append(path)
    return written
