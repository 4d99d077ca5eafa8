"""Run by tests/test_multinode.py in its own process: a three-raylet `ray.cluster_utils.Cluster` on
this host (its own ports and temp dir), a 2-worker STRICT_SPREAD training run on it, the summary and
the workers' node IDs printed as one JSON line. Each raylet is a Ray node with its own node ID, object
store and worker processes, as on separate machines; only what Ray is told, not the hardware, differs."""

from __future__ import annotations

import json
import sys

from head import local_cluster  # this folder is first on sys.path when the script runs


def main(storage: str, *overrides: str) -> None:
    cluster, temp = local_cluster("rcm-")
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, temp_dir=temp)
        cluster.wait_for_nodes()
        import ray

        from raycv.config import load_config
        from raycv.training.driver import fit

        cfg = load_config("train", None, [*overrides, f"run.storage_path={storage}", f"run.address={cluster.address}"])
        summary = fit(cfg, echo=lambda s: print(s, file=sys.stderr))
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print(json.dumps({"summary": summary.to_json(), "cluster_nodes": nodes}))
        ray.shutdown()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
