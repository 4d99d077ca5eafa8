"""Run by tests/test_multinode.py in its own process: batch inference on a four-raylet
`ray.cluster_utils.Cluster` (a head for the driver and decoding, three nodes with an `accel`
resource for two predictor actors), one actor's node removed mid-run. Prints one JSON line:
the inference summary and what was removed."""

from __future__ import annotations

import json
import sys
import threading
import time

from head import hosts, local_cluster  # this folder is first on sys.path when the script runs


def main(checkpoint: str, images: str, output: str) -> None:
    cluster, temp = local_cluster("rcn-")
    try:
        workers = [cluster.add_node(num_cpus=1, resources={"accel": 1}, temp_dir=temp) for _ in range(3)]
        cluster.wait_for_nodes()
        import ray

        from raycv.config import load_config
        from raycv.inference.pipeline import run_inference

        cfg = load_config("infer", None, [
            f"infer.checkpoint={checkpoint}", f"infer.input={images}", f"infer.output={output}",
            "infer.batch_size=16", "infer.min_actors=2", "infer.max_actors=2", "infer.cpus_per_actor=0.5",
            "infer.actor_resources={accel: 1}", f"run.address={cluster.address}"])
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(s=run_inference(cfg)), daemon=True)
        thread.start()

        deadline = time.monotonic() + 120
        while not [n for n in workers if hosts(n, "ModelActor")]:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("no predictor actor appeared on a worker node")
            time.sleep(0.2)
        time.sleep(3)  # mid-run: the actors have loaded the model and predicted some batches
        busy = [n for n in workers if hosts(n, "ModelActor")]
        counter_on_head = hosts(cluster.head_node, "RowCounter")  # the driver's node: never removed here
        victim, spare = busy[0], [n for n in workers if n not in busy]
        alive_at_removal = thread.is_alive()
        cluster.remove_node(victim)
        restarted_on_spare = False  # the lost actor comes back on the accelerator node nobody used
        while thread.is_alive() and not restarted_on_spare:
            restarted_on_spare = any(hosts(n, "ModelActor") for n in spare)
            time.sleep(0.1)
        thread.join(timeout=300)
        if "s" not in result:
            raise RuntimeError("inference did not finish after the node was removed")
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print(json.dumps({"summary": result["s"].to_json(), "alive_at_removal": alive_at_removal,
                          "alive_nodes": len(nodes), "actors_before": len(busy), "spare_nodes": len(spare),
                          "restarted_on_spare": restarted_on_spare, "counter_on_head": counter_on_head}))
        ray.shutdown()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
