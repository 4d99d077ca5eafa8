"""raycv: distributed batch training and inference for computer vision on Ray."""

__version__ = "0.1.0"
