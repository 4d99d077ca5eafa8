"""The dataset registry, decoding and presets."""

from raycv.data import detection_sources, segmentation_sources, sources  # noqa: F401  (register datasets)
from raycv.data.registry import (DatasetSplits, build_dataset, check_source, get_dataset_entry, list_datasets,
                                 register_dataset)

__all__ = ["DatasetSplits", "build_dataset", "check_source", "get_dataset_entry", "list_datasets", "register_dataset"]
