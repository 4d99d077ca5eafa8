"""Memory layout: the NCHW model a plain PyTorch script runs (the baseline) against the same model
and batches in channels_last (NHWC), as `infer.channels_last` (default on) and
`train.channels_last` run them. Per model: inference images/s (forward under `inference_mode`)
and training images/s (forward, cross-entropy, backward, SGD step), the contenders taking turns,
best of `--rounds`; and whether the two layouts' predictions (argmax) agree on the batch.

    python bench/layout_bench.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from _report import report

MODELS = [("simple_cnn", 32, 256), ("resnet18", 64, 256), ("resnet18", 224, 64), ("resnet50", 224, 32),
          ("mobilenet_v3_small", 224, 64)]


def rate(step, batch: int, n: int) -> float:
    step()  # warm-up: oneDNN picks its kernels
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return batch * n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default="bench/results/layout.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from raycv.models import get_model

    rows = []
    for name, size, batch in MODELS:
        torch.manual_seed(0)
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        nchw = get_model(name, num_classes=10)
        nhwc = get_model(name, num_classes=10)
        nhwc.load_state_dict(nchw.state_dict())
        nhwc = nhwc.to(memory_format=torch.channels_last)
        inputs = {"nchw": x, "nhwc": x.contiguous(memory_format=torch.channels_last)}
        models = {"nchw": nchw, "nhwc": nhwc}
        best = {k: {"infer": 0.0, "train": 0.0} for k in models}
        with torch.inference_mode():
            nchw.eval(), nhwc.eval()
            agree = bool((nchw(inputs["nchw"]).argmax(1) == nhwc(inputs["nhwc"]).argmax(1)).all())
        for _ in range(args.rounds):
            for k, m in models.items():
                m.eval()
                with torch.inference_mode():
                    best[k]["infer"] = max(best[k]["infer"], rate(lambda: m(inputs[k]), batch, args.steps))
                m.train()
                opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)

                def step():
                    opt.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(m(inputs[k]), y).backward()
                    opt.step()

                best[k]["train"] = max(best[k]["train"], rate(step, batch, max(1, args.steps // 2)))
        rows.append({"model": f"{name} @ {size} px, batch {batch}",
                     "infer_nchw": round(best["nchw"]["infer"], 1), "infer_nhwc": round(best["nhwc"]["infer"], 1),
                     "infer_ratio": round(best["nhwc"]["infer"] / best["nchw"]["infer"], 2),
                     "train_nchw": round(best["nchw"]["train"], 1), "train_nhwc": round(best["nhwc"]["train"], 1),
                     "train_ratio": round(best["nhwc"]["train"] / best["nchw"]["train"], 2), "argmax_equal": agree})
        print(rows[-1], flush=True)
    report(f"channels_last against NCHW (images/s; ratio: NHWC over NCHW, higher is faster), {args.threads} "
           f"threads, best of {args.rounds}", rows,
           ["model", "infer_nchw", "infer_nhwc", "infer_ratio", "train_nchw", "train_nhwc", "train_ratio",
            "argmax_equal"], args.json, {"threads": args.threads, "rounds": args.rounds, "steps": args.steps,
                                         "torch": torch.__version__})


if __name__ == "__main__":
    main()
