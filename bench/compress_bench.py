"""Model compression side by side, in one run, on the generated `shapes` (CPU): for the seed's CNN and
a ResNet-18 (CIFAR stem), the float model, its int8 quantization (`raycv quantize`), its structured
pruning at 50% of the channels (`train.prune`, fine-tuned), and a seed-CNN student distilled from the
ResNet-18 (`train.distill`), online and offline (the teacher's logits written once by `raycv infer`),
beside the same student trained on the labels alone (its float row). For each:
parameters, `model.pt` size, CPU images/s in a bare loop (the model alone under inference_mode on
preprocessed batches of 64: what the model costs, no decoding; measured after every raycv command has
exited, the models taking turns) and through `raycv infer` (whole
pipeline over the 400 validation images, its own summary's rate: start-up dominates at this size), and val top-1 (`raycv evaluate` over `raycv infer`'s predictions
of the validation split). Ratios are against each model's float row.

    python bench/compress_bench.py [--epochs 6] [--json bench/results/compress.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from _report import report  # noqa: E402

DATA = ["data.name=shapes", "data.num_samples=2000"]


def raycv(*args: str, cwd: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "raycv.cli", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: raycv {' '.join(args)}\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return r.stdout


def train(work: Path, name: str, *overrides: str) -> Path:
    """A run, trained here unless `work` already holds it finished (--work: re-measure kept runs)."""
    if not (work / name / "summary.json").exists():
        raycv("train", *DATA, f"run.storage_path={work}", f"run.name={name}", *overrides, cwd=work)
    return work / name


def quantize(work: Path, fp32: Path, name: str) -> Path:
    if not (work / name / "raycv.json").exists():
        raycv("quantize", "--checkpoint", str(fp32), "--output", str(work / name), cwd=work)
    return work / name


def bare_loops(checkpoints: list[Path], images: int = 2000, seconds: float = 2.0, rounds: int = 3) -> list[float]:
    """Images per second of each model alone (batches of 64 of its checkpoint's input shape, under
    inference_mode, torch's default threads), measured after every raycv command has exited, the
    models taking turns `rounds` times; each one's best round (the machine's noise only slows)."""
    import torch

    import raycv as api

    loaded = []
    for c in checkpoints:
        p = api.load(c)
        loaded.append((p.model, p.preprocess.normalize(torch.randint(0, 256, (64, *p.preprocess.shape), dtype=torch.uint8))))
    best = [0.0] * len(loaded)
    with torch.inference_mode():
        for _ in range(rounds):
            for i, (model, x) in enumerate(loaded):
                for _ in range(3):
                    model(x)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds or n < images:
                    model(x)
                    n += len(x)
                best[i] = max(best[i], n / (time.perf_counter() - t0))
    return best


def measure(work: Path, label: str, model: str, checkpoint: Path) -> dict:
    import raycv as api

    out = work / "pred" / f"{model}-{label.split(' ')[0]}"
    if out.exists():
        import shutil

        shutil.rmtree(out)  # the bench's own output of an earlier run (--work)
    summary = json.loads(raycv("infer", "--checkpoint", str(checkpoint), "--input", "registry:shapes:val",
                               "--output", str(out), "--json", cwd=work).strip().splitlines()[-1])
    raycv_out = raycv("evaluate", "--predictions", str(out), cwd=work)
    top1 = json.loads(raycv_out.strip().splitlines()[-1])["top1"]
    ckpt = Path(api.load(checkpoint).checkpoint)
    meta = json.loads((ckpt / "raycv.json").read_text())
    source = (meta.get("quantization") or {}).get("source")  # int8: the float model's parameter count
    return {"model": model, "variant": label,
            "params": sum(t.numel() for t in api.load(source or ckpt).model.parameters()),
            "model_pt_mb": round((ckpt / "model.pt").stat().st_size / 1e6, 3), "checkpoint": str(ckpt),
            "infer_img_s": round(summary["images_per_second"]), "val_top1": round(top1, 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--json", default=str(HERE / "results" / "compress.json"))
    ap.add_argument("--work", default=None, help="keep the runs here (default: a temp folder)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="compress-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    e = str(a.epochs)
    half = str(max(1, a.epochs // 2))
    t0 = time.perf_counter()
    rows = []
    for model in ("simple_cnn", "resnet18_cifar"):
        fp32 = train(work, model, f"model.name={model}", f"train.epochs={e}")
        int8 = quantize(work, fp32, f"{model}-int8")
        pruned = train(work, f"{model}-pruned", f"model.name={model}", f"model.init_from={fp32}",
                       "train.prune.amount=0.5", "train.prune.method=ln_structured", f"train.epochs={half}")
        rows += [measure(work, "fp32", model, fp32), measure(work, "int8", model, int8),
                 measure(work, "pruned 50% (structured)", model, pruned)]
    teacher = work / "resnet18_cifar"
    student = train(work, "student-distilled", "model.name=simple_cnn", f"train.epochs={e}",
                    f"train.distill.teacher={teacher}", "train.distill.alpha=0.5", "train.distill.temperature=4")
    rows.append(measure(work, "distilled from resnet18_cifar (online)", "simple_cnn", student))
    logits = work / "teacher-logits"  # offline: the teacher once over the training split, then the student alone
    if not (logits / "_raycv_manifest.json").exists():
        raycv("infer", "--checkpoint", str(teacher), "--input", "registry:shapes:train", "--output", str(logits),
              "infer.logits=true", cwd=work)
    offline = train(work, "student-offline", "model.name=simple_cnn", f"train.epochs={e}", "data.augment=none",
                    f"train.distill.logits={logits}", "train.distill.alpha=0.5", "train.distill.temperature=4")
    rows.append(measure(work, "distilled offline (teacher's logits)", "simple_cnn", offline))
    time.sleep(5)  # Ray's processes of the last command gone
    for r, speed in zip(rows, bare_loops([Path(r.pop("checkpoint")) for r in rows])):
        r["bare_img_s"] = round(speed)
    base = {r["model"]: r for r in rows if r["variant"] == "fp32"}
    for r in rows:
        b = base[r["model"]]
        r["bare_ratio"] = round(r["bare_img_s"] / b["bare_img_s"], 2)
        r["params_ratio"] = round(r["params"] / base["resnet18_cifar"]["params"], 3)
        r["top1_delta"] = round(r["val_top1"] - b["val_top1"], 4)
    meta = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
            "seconds": round(time.perf_counter() - t0), "epochs": a.epochs, "data": DATA}
    report(f"compression on shapes ({a.epochs} epochs; pruned: fine-tuned {half}), CPU", rows,
           ["model", "variant", "params", "params_ratio", "model_pt_mb", "bare_img_s", "bare_ratio", "infer_img_s",
            "val_top1", "top1_delta"], a.json, meta)


if __name__ == "__main__":
    main()
