"""Per-worker memory of data-parallel training, 2 workers (gloo, CPU): DDP as a user writes it
(torch's DistributedDataParallel around the model: the baseline) against raycv's
`scaling.strategy=fsdp` (raycv.training.sharding: FSDP2 on every ViT EncoderBlock, then the root)
and fsdp + `train.activation_checkpointing` (each block recomputed in backward), for torchvision
ViTs at two sizes (their shape through model.kwargs, as a raycv recipe gives it), AdamW.

Per worker (the larger of the two ranks):
- training state: bytes of the parameters, gradients and AdamW state this rank holds after a step
  (FSDP: its shards), counted from the tensors: exact.
- activations: bytes autograd holds for backward at the end of one forward, counted with
  saved_tensors_hooks by storage (views counted once; parameters are not activations) plus, with
  activation checkpointing, each checkpointed block's input (what the checkpoint keeps to recompute).
- step time: median of --steps steps (forward, backward, AdamW) after one warm-up step, each rank on
  one thread; and the process's peak RSS (CPU has no allocator statistics: context only).

    python bench/memory_bench.py [--batch 8] [--steps 3] [--json bench/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from _report import report  # noqa: E402

SIZES = {  # name -> torchvision vit_b_16 kwargs: 32-px images in 4-px patches (64 tokens + class token)
    "ViT-Ti/4 (32 px)": {"image_size": 32, "patch_size": 4, "num_layers": 12, "num_heads": 3, "hidden_dim": 192,
                         "mlp_dim": 768},
    "ViT-S/4 (32 px)": {"image_size": 32, "patch_size": 4, "num_layers": 12, "num_heads": 6, "hidden_dim": 384,
                        "mlp_dim": 1536},
}
STRATEGIES = ["ddp", "fsdp", "fsdp+ac"]


def _bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def worker(rank: int, world: int, port: int, size: str, strategy: str, batch: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from raycv.models import get_model
    from raycv.training import sharding

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = get_model("vit_b_16", num_classes=10, **SIZES[size])
    params = sum(p.numel() for p in model.parameters())
    blocks = sharding.blocks(model)
    if strategy == "fsdp+ac":
        sharding.checkpoint_activations(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    else:
        model = sharding.shard(model, amp="none")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)

    held: dict[tuple[int, int], int] = {}

    def pack(t):
        if not (t.is_leaf and t.requires_grad):  # a parameter saved for backward is not an activation
            s = t.untyped_storage()
            if s.nbytes():
                held[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    def block_input(module, args):
        if strategy == "fsdp+ac":  # the checkpoint keeps the block's input to recompute it
            pack(args[0])

    hooks = [b.register_forward_pre_hook(block_input) for b in blocks]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    activations = sum(held.values())
    for h in hooks:
        h.remove()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # gradients kept: they are part of the state a step holds
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    state = (sum(_bytes(p) for p in model.parameters()) + sum(_bytes(p.grad) for p in model.parameters())
             + sum(_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)))
    optimizer.step()
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    Path(out, f"{rank}.json").write_text(json.dumps({
        "params": params, "state_bytes": state, "activation_bytes": activations,
        "step_s": statistics.median(times), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(size: str, strategy: str, batch: int, steps: int) -> dict:
    """Two fresh worker processes (so the peak RSS is this configuration's own)."""
    with tempfile.TemporaryDirectory(prefix="raycv-memory-") as out:
        port = free_port()
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(port), size, strategy,
                                   str(batch), str(steps), out]) for rank in range(2)]
        if any(p.wait(timeout=1800) for p in procs):
            sys.exit(f"a worker failed: {size} {strategy}")
        ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(2)]
    return {"params": ranks[0]["params"], **{k: max(r[k] for r in ranks) for k in
                                            ("state_bytes", "activation_bytes", "step_s", "peak_rss_mib")}}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, port, size, strategy, batch, steps, out = sys.argv[2:9]
        worker(int(rank), 2, int(port), size, strategy, int(batch), int(steps), out)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="images per worker per step (default 8)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default 3)")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--json", default=str(HERE / "results" / "memory.json"))
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        base = None
        for strategy in STRATEGIES:
            m = measure(size, strategy, args.batch, args.steps)
            base = base or m
            rows.append({"model": size, "strategy": strategy, "params": m["params"],
                         "state_mb": round(m["state_bytes"] / 1e6, 2),
                         "state_ratio": round(m["state_bytes"] / base["state_bytes"], 3),
                         "activations_mb": round(m["activation_bytes"] / 1e6, 2),
                         "activations_ratio": round(m["activation_bytes"] / base["activation_bytes"], 3),
                         "step_s": round(m["step_s"], 3), "step_ratio": round(m["step_s"] / base["step_s"], 2),
                         "peak_rss_mib": round(m["peak_rss_mib"])})
            print(json.dumps(rows[-1]), flush=True)
    report(f"Per-worker training memory, 2 workers (gloo, CPU), batch {args.batch} per worker, AdamW "
           f"(ratios against DDP on the same model)", rows,
           ["model", "strategy", "params", "state_mb", "state_ratio", "activations_mb", "activations_ratio",
            "step_s", "step_ratio", "peak_rss_mib"], args.json,
           {"batch": args.batch, "steps": args.steps, "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
