"""Run by tests/test_multinode.py in its own process: training on a four-raylet
`ray.cluster_utils.Cluster` (a 1-CPU head for the driver, three 2-CPU nodes, each holding one
2-CPU training worker, so two of them train and one is spare); once the epoch-2 checkpoint is
registered, a node hosting a training worker is removed. Prints one JSON line: the summary, the
removed node's ID and the checkpoints registered when it went."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from head import hosts, local_cluster  # this folder is first on sys.path when the script runs
from runs import registered_epochs


def main(storage: str, *overrides: str) -> None:
    cluster, temp = local_cluster("rct-")
    try:
        workers = [cluster.add_node(num_cpus=2, temp_dir=temp) for _ in range(3)]
        cluster.wait_for_nodes()
        import ray

        from raycv.config import load_config
        from raycv.training.driver import fit

        cfg = load_config("train", None, [*overrides, f"run.storage_path={storage}", f"run.address={cluster.address}"])
        run_dir = Path(storage) / cfg.run.name
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(s=fit(cfg, echo=lambda s: print(s, file=sys.stderr))),
                                  daemon=True)
        thread.start()

        deadline = time.monotonic() + 300
        while 2 not in registered_epochs(run_dir):
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the epoch-2 checkpoint was never registered")
            time.sleep(0.1)
        at_removal = registered_epochs(run_dir)
        victim = next(n for n in workers if hosts(n, "RayTrainWorker"))
        alive_at_removal = thread.is_alive()
        cluster.remove_node(victim)
        thread.join(timeout=600)
        if "s" not in result:
            raise RuntimeError("training did not finish after the node was removed")
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print(json.dumps({"summary": result["s"].to_json(), "removed": victim.node_id, "alive_nodes": nodes,
                          "registered_at_removal": at_removal, "alive_at_removal": alive_at_removal}))
        ray.shutdown()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
