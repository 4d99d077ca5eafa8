"""Batch-inference throughput: raycv vs a bare one-process loop vs Ray's documented pattern.

Generates its own JPEGs, runs every contender on the same files in the same run, prints a table
of images/s and ratios against the bare loop, and writes it as JSON.

    python bench/infer_bench.py --images 2000 --size 64      # decode-bound: small model input
    python bench/infer_bench.py --images 600 --size 224      # compute-bound: ResNet-18 at 224 px
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _report import report


def make_jpegs(root: Path, n: int, side: int = 256) -> list[str]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (side // 16, side // 16, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        small = np.roll(base, i, axis=0) ^ np.uint8(i % 255)
        img = Image.fromarray(small).resize((side, side), Image.BILINEAR)
        p = root / f"{i:06d}.jpg"
        img.save(p, quality=90)
        paths.append(str(p))
    return paths


def make_checkpoint(directory: Path, size: int) -> Path:
    from raycv.data.presets import ClassificationEvalPreset
    from raycv.models import get_model
    from raycv.train.checkpoint import CheckpointInfo, write_checkpoint

    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=10)
    preset = ClassificationEvalPreset(input_size=size, resize_size=size)
    info = CheckpointInfo(task="classification", model_name="resnet18", model_kwargs={},
                          classes=[str(i) for i in range(10)], preprocess=preset, epoch=0, metrics={}, config={})
    return write_checkpoint(directory, model, info)


def bare_loop(paths: list[str], checkpoint: Path, batch: int) -> float:
    """Decode, eval preset, forward in batches: one process, every core for torch."""
    from raycv.data.decode import open_rgb
    from raycv.train.checkpoint import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    model, info = load_model(checkpoint)
    pre = info.preprocess
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            x = torch.stack([pre.geometry(open_rgb(Path(p).read_bytes())) for p in paths[i:i + batch]])
            model(pre.normalize(x)).softmax(1).max(1)
    return time.perf_counter() - t0


def ray_documented(folder: Path, checkpoint: Path, batch: int, out: Path, size: int) -> float:
    """Ray's batch-inference example: read_images -> map_batches preprocess -> map_batches model
    class (one actor) -> write_parquet."""
    import ray.data
    from torchvision.transforms import v2

    from raycv.train.checkpoint import load_model

    transform = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size),
                            v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def preprocess(b):
        return {"image": np.stack([transform(img).numpy() for img in b["image"]]), "path": b["path"]}

    class Model:
        def __init__(self):
            self.model, _ = load_model(checkpoint)

        def __call__(self, b):
            with torch.inference_mode():
                p = self.model(torch.as_tensor(b["image"])).softmax(1)
            return {"path": b["path"], "label": p.argmax(1).numpy(), "score": p.max(1).values.numpy()}

    t0 = time.perf_counter()
    ds = ray.data.read_images(str(folder), mode="RGB", include_paths=True)
    ds = ds.map_batches(preprocess).map_batches(Model, compute=ray.data.ActorPoolStrategy(size=1), batch_size=batch)
    ds.write_parquet(str(out))
    return time.perf_counter() - t0


def raycv_infer(folder: Path, checkpoint: Path, batch: int, out: Path) -> float:
    from raycv.config import load_config
    from raycv.infer.pipeline import run_inference

    t0 = time.perf_counter()
    run_inference(load_config("infer", None, [f"infer.checkpoint={checkpoint}", f"infer.input={folder}",
                                              f"infer.output={out}", f"infer.batch_size={batch}"]))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64, help="model input side, pixels")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default="bench/results/infer.json")
    args = ap.parse_args()

    import ray
    import ray.data

    work = Path(tempfile.mkdtemp(prefix="raycv-bench-"))
    paths = make_jpegs(work / "images", args.images)
    ckpt = make_checkpoint(work / "ckpt", args.size)
    results = {"bare loop (1 process, all cores)": bare_loop(paths, ckpt, args.batch)}
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    results["Ray documented pattern"] = ray_documented(work / "images", ckpt, args.batch, work / "out-ray", args.size)
    results["raycv infer"] = raycv_infer(work / "images", ckpt, args.batch, work / "out-raycv")
    ray.shutdown()

    base = args.images / results["bare loop (1 process, all cores)"]
    rows = [{"contender": k, "seconds": round(v, 2), "images_per_second": round(args.images / v, 1),
             "ratio_vs_bare": round(args.images / v / base, 3)} for k, v in results.items()]
    report(f"ResNet-18 at {args.size} px over {args.images} JPEGs (256x256), batch {args.batch}, "
           f"{os.cpu_count()} CPUs; end to end, start-up included", rows,
           ["contender", "seconds", "images_per_second", "ratio_vs_bare"], args.json,
           {"images": args.images, "size": args.size, "batch": args.batch, "cpus": os.cpu_count()})

if __name__ == "__main__":
    main()
