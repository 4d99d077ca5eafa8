"""Run by tests/test_multinode.py in its own process: batch inference on a four-raylet
`ray.cluster_utils.Cluster` (a head for the driver and decoding, three nodes with an `accel`
resource for two predictor actors), one actor's node removed mid-run. Prints one JSON line:
the inference summary and what was removed."""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time

from head import free_port  # this folder is first on sys.path when the script runs


def main(checkpoint: str, images: str, output: str) -> None:
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="rcn-")
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, gcs_server_port=free_port(), temp_dir=temp, include_dashboard=False,
        dashboard_agent_listen_port=free_port()))
    try:
        workers = [cluster.add_node(num_cpus=1, resources={"accel": 1}, temp_dir=temp) for _ in range(3)]
        cluster.wait_for_nodes()
        import psutil
        import ray

        from raycv.config import load_config
        from raycv.infer.pipeline import run_inference

        cfg = load_config("infer", None, [
            f"infer.checkpoint={checkpoint}", f"infer.input={images}", f"infer.output={output}",
            "infer.batch_size=16", "infer.min_actors=2", "infer.max_actors=2", "infer.cpus_per_actor=0.5",
            "infer.actor_resources={accel: 1}", f"run.address={cluster.address}"])
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(s=run_inference(cfg)), daemon=True)
        thread.start()

        def hosts_actor(node) -> bool:
            raylet = node.all_processes["raylet"][0].process.pid
            for p in psutil.Process(raylet).children(recursive=True):
                try:
                    if "ClassificationPredictor" in " ".join(p.cmdline()):
                        return True
                except psutil.Error:
                    continue
            return False

        deadline = time.monotonic() + 120
        while not (hosts := [n for n in workers if hosts_actor(n)]):
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("no predictor actor appeared on a worker node")
            time.sleep(0.2)
        time.sleep(3)  # mid-run: the actors have loaded the model and predicted some batches
        hosts = [n for n in workers if hosts_actor(n)]
        victim, spare = hosts[0], [n for n in workers if n not in hosts]
        alive_at_removal = thread.is_alive()
        cluster.remove_node(victim)
        restarted_on_spare = False  # the lost actor comes back on the accelerator node nobody used
        while thread.is_alive() and not restarted_on_spare:
            restarted_on_spare = any(hosts_actor(n) for n in spare)
            time.sleep(0.1)
        thread.join(timeout=300)
        if "s" not in result:
            raise RuntimeError("inference did not finish after the node was removed")
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print(json.dumps({"summary": result["s"].to_json(), "alive_at_removal": alive_at_removal,
                          "alive_nodes": len(nodes), "actors_before": len(hosts), "spare_nodes": len(spare),
                          "restarted_on_spare": restarted_on_spare}))
        ray.shutdown()
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
