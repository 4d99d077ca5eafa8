"""One GPU: ResNet-50 training and inference images/s, the figures for the README's GPU table.

Prepared for a machine with a CUDA GPU (not run on the 2-CPU development machine, which has none).
Everything is generated here; nothing is downloaded.

1. Training: ResNet-50 (torchvision, random init) on generated 224-px tensors already on the GPU,
   SGD, batch 128, bf16 autocast and channels_last, for --seconds (first 10 steps are warm-up).
   The same loop in fp32 / NCHW is the baseline in the same run.
2. Inference, pre-decoded: bf16 + channels_last forward over tensors already on the GPU.
3. Inference end to end: `raycv infer` (Ray Data decode tasks on the CPUs -> one GPU predictor
   actor) over --images generated 256-px JPEGs; rows/s including start-up, and the same through a
   single-process loop (decode on one core, forward on the GPU) for the ratio.

    python bench/gpu_bench.py --seconds 60 --images 5000
    python bench/gpu_bench.py --smoke      # CPU, tiny sizes: only checks that the script runs
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from _report import report


def train_rate(device: str, seconds: float, batch: int, size: int, amp: bool, channels_last: bool) -> float:
    model = torchvision.models.resnet50(num_classes=1000).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    steps, t0 = 0, None
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or steps < 12:
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if steps == 10:  # warm-up done (cuDNN autotuning, allocator)
            _sync(device)
            t0 = time.perf_counter()
    _sync(device)
    return (steps - 10) * batch / (time.perf_counter() - t0)


def infer_rate(device: str, seconds: float, batch: int, size: int) -> float:
    model = torchvision.models.resnet50(num_classes=1000).to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    n, t0 = 0, None
    deadline = time.perf_counter() + seconds
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
        while time.perf_counter() < deadline or n < 12:
            model(x).float().softmax(1)
            n += 1
            if n == 10:
                _sync(device)
                t0 = time.perf_counter()
    _sync(device)
    return (n - 10) * batch / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def end_to_end(work: Path, images: int, use_gpu: bool, batch: int) -> tuple[float, float]:
    """(raycv infer rows/s, single-process loop rows/s) over generated JPEGs."""
    from infer_bench import bare_loop, make_jpegs

    from raycv.config import load_config
    from raycv.data.presets import ClassificationEvalPreset
    from raycv.inference.pipeline import run_inference
    from raycv.training.checkpoint import CheckpointInfo, write_checkpoint

    paths = make_jpegs(work / "images", images)
    info = CheckpointInfo(task="classification", model_name="resnet50", model_kwargs={},
                          classes=[str(i) for i in range(1000)],
                          preprocess=ClassificationEvalPreset(input_size=224, resize_size=256), epoch=0, metrics={},
                          config={})
    ckpt = write_checkpoint(work / "ckpt", torchvision.models.resnet50(num_classes=1000), info)
    bare_s = bare_loop(paths, ckpt, batch) if not use_gpu else _bare_gpu(paths, ckpt, batch)
    t0 = time.perf_counter()
    run_inference(load_config("infer", None, [f"infer.checkpoint={ckpt}", f"infer.input={work / 'images'}",
                                              f"infer.output={work / 'out'}", f"infer.batch_size={batch}",
                                              f"infer.use_gpu={str(use_gpu).lower()}"]))
    return images / (time.perf_counter() - t0), images / bare_s


def _bare_gpu(paths: list[str], checkpoint: Path, batch: int) -> float:
    from raycv.data.decode import open_rgb
    from raycv.training.checkpoint import load_model

    model, info = load_model(checkpoint)
    model = model.cuda().to(memory_format=torch.channels_last)
    pre = info.preprocess
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(0, len(paths), batch):
            x = torch.stack([pre.geometry(open_rgb(Path(p).read_bytes())) for p in paths[i:i + batch]]).cuda()
            model(pre.normalize(x).contiguous(memory_format=torch.channels_last)).float().softmax(1).max(1)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="per training and per inference measurement")
    ap.add_argument("--images", type=int, default=5000, help="JPEGs for the end-to-end inference run")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check that the script runs")
    ap.add_argument("--json", default="bench/results/gpu.json")
    args = ap.parse_args()
    if args.smoke:
        device, size, args.seconds, args.images, args.batch = "cpu", 32, 0.5, 8, 4
    elif torch.cuda.is_available():
        device, size = "cuda", 224
        torch.backends.cudnn.benchmark = True
    else:
        raise SystemExit("no CUDA GPU here: run with --smoke to check the script on CPU")

    rows = []
    fp32 = train_rate(device, args.seconds, args.batch, size, amp=False, channels_last=False)
    bf16 = train_rate(device, args.seconds, args.batch, size, amp=True, channels_last=True)
    rows.append({"measurement": "train ResNet-50 fp32 NCHW", "images_per_second": round(fp32, 1), "ratio": 1.0})
    rows.append({"measurement": "train ResNet-50 bf16 channels_last", "images_per_second": round(bf16, 1),
                 "ratio": round(bf16 / fp32, 3)})
    pre = infer_rate(device, args.seconds, args.batch * 2, size)
    rows.append({"measurement": "infer ResNet-50 bf16, pre-decoded tensors", "images_per_second": round(pre, 1),
                 "ratio": None})
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    raycv_rate, bare_rate = end_to_end(Path(tempfile.mkdtemp(prefix="raycv-gpu-bench-")), args.images,
                                       device == "cuda", args.batch)
    ray.shutdown()
    rows.append({"measurement": "infer end to end from JPEG, 1-process loop", "images_per_second": round(bare_rate, 1),
                 "ratio": 1.0})
    rows.append({"measurement": "infer end to end from JPEG, raycv infer (start-up included)",
                 "images_per_second": round(raycv_rate, 1), "ratio": round(raycv_rate / bare_rate, 3)})
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    report(f"{name}, {os.cpu_count()} CPUs, batch {args.batch}, {size} px", rows,
           ["measurement", "images_per_second", "ratio"], args.json, {"device": name, "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
