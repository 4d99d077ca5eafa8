"""The model registry: the seed's small CNN, small-input ResNets, every torchvision classifier and
segmentation and detection model, and a small segmenter and detector for CPUs."""

from raycv.models import detection, resnet, segmentation, simple_cnn, torchvision_zoo  # noqa: F401  (register models)
from raycv.models.registry import ModelEntry, get_model, get_model_entry, list_models, register_model
from raycv.models.torchvision_zoo import last_linear_name

__all__ = ["ModelEntry", "get_model", "get_model_entry", "last_linear_name", "list_models", "register_model"]
