"""What Ray Train's controller unpickles, in a module that is cheap to import.

The controller actor unpickles the training function and the dataset config. Module-level objects
are pickled by reference, so unpickling imports their modules: `raycv.training.worker` or
`raycv.training.driver` pull in torchvision and raycv's model registry (~2 s of CPU, measured), on the
critical path of every run's start. This module imports only Ray Train's DataConfig; the workers
import the real loop when they call it."""

from __future__ import annotations

from typing import Any

from ray.train import DataConfig


def train_loop(config: dict[str, Any]) -> None:
    import ray.train

    for name in ("train", "val"):  # the first call splits the dataset: its actors start while the imports below run
        ray.train.get_dataset_shard(name)
    from raycv.training.worker import train_loop_per_worker

    train_loop_per_worker(config)


class ExactValSplit(DataConfig):
    """Ray's default splits every dataset with `streaming_split(equal=True)`, which drops rows to
    even the shards. Training wants that (DDP ranks must step together); validation must count
    every sample exactly once, so it is split with equal=False: a validation set already
    materialized in the object store (small sets, `data.cache`) by handing each rank a share of its
    blocks (`Dataset.split`, no tasks), which spares starting a SplitCoordinator actor (a fresh
    process) for it; a streaming one with `streaming_split(equal=False)`.

    `fixed_train` (train.deterministic): the training set already split into one equal part per
    rank (in the driver: an equal split runs Ray tasks, which would wait for the CPUs the workers
    hold), so each rank reads the same rows in the same block order every run; a streaming split
    hands blocks to whichever rank asks first."""

    def __init__(self, *args, fixed_train: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed_train = fixed_train

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        from ray.data.dataset import MaterializedDataset

        out = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if name == "train" and self.fixed_train is not None and len(self.fixed_train) == world_size:
                for i, part in enumerate(self.fixed_train):
                    part.context.execution_options = self._resolve_execution_options(name)  # preserve_order
                    out[i][name] = part.iterator()
            elif name != "val":
                for i, it in enumerate(super().configure({name: ds}, world_size, worker_handles, worker_node_ids, **kwargs)):
                    out[i].update(it)
            elif isinstance(ds, MaterializedDataset):
                for i, part in enumerate(ds.split(world_size, equal=False)):
                    out[i][name] = part.iterator()
            else:
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                    out[i][name] = split
        return out
