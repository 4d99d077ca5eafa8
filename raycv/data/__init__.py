"""The dataset registry, decoding and presets.

The registry's names are loaded on first use (PEP 562): importing `raycv.data.io` alone, as the
inference listing and write tasks do, must not import torch and torchvision (several seconds of CPU
in every Ray worker that runs them)."""

__all__ = ["DatasetSplits", "build_dataset", "check_source", "get_dataset_entry", "list_datasets", "register_dataset"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'raycv.data' has no attribute {name!r}")
    from raycv.data import detection_formats, detection_sources, hf_arrow, segmentation_sources, sources, tar_shards  # noqa: F401  (register datasets)
    from raycv.data import registry

    return getattr(registry, name)
