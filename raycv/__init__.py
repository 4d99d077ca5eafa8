"""raycv: distributed batch training and inference for computer vision on Ray.

The Python API (`raycv/api.py`): `raycv.training`, `raycv.inference`, `raycv.evaluate`, and
`raycv.load(checkpoint) -> Predictor` for predictions in this process without Ray. Importing raycv
imports none of torch, torchvision or Ray; each function does when called.
"""

__version__ = "0.1.0"

from raycv.api import Predictor, evaluate, infer, load, train  # noqa: E402

__all__ = ["Predictor", "evaluate", "infer", "load", "train", "__version__"]
