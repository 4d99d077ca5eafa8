"""The model registry: the seed's small CNN, small-input ResNets, every torchvision classifier and
segmentation and detection model, and a small segmenter and detector for CPUs.

Only the seed's CNN (plain torch) registers on import; the modules that build torchvision's models
register the first time a name is not found or the list is asked for (`registry.load_builtins`):
importing torchvision costs a process over a second on a 2-CPU machine, and the default job's
driver never needs it."""

from raycv.models import simple_cnn  # noqa: F401  (registers the seed's CNN)
from raycv.models.heads import last_linear_name
from raycv.models.registry import ModelEntry, get_model, get_model_entry, list_models, register_model

__all__ = ["ModelEntry", "get_model", "get_model_entry", "last_linear_name", "list_models", "register_model"]
