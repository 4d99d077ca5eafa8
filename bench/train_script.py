"""The script a PyTorch user writes instead of `raycv train` for the bundled digits: scikit-learn's
8x8 digits as tensors in memory (scaled to 32x32 RGB, normalized), an 80/20 split, a DataLoader,
the seed's CNN, Adam with a cosine schedule, the validation accuracy after every epoch, the weights
saved at the end. One process, no augmentation, no checkpoints to resume from.

    python bench/train_script.py --epochs 10 --out /tmp/cnn.pt

Prints one JSON line: the wall-clock time (time.time()) of the end of the first optimizer step,
the last epoch's validation accuracy, and the seconds the epochs took.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset


class CNN(nn.Module):
    """The seed's small CNN: two conv + pool stages, then two linear layers."""

    def __init__(self, num_classes: int = 10, size: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * (size // 4) ** 2, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x))
    n_val = len(x) // 5
    val, train = order[:n_val], order[n_val:]
    loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=args.batch, shuffle=True)

    model = CNN()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * len(loader))
    first_step, accuracy, t_epochs = None, None, time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
            first_step = first_step or time.time()
        model.eval()
        with torch.inference_mode():
            accuracy = (model(x[val]).argmax(1) == y[val]).float().mean().item()
    epochs_s = time.perf_counter() - t_epochs
    torch.save(model.state_dict(), args.out)
    print(json.dumps({"first_step_time": first_step, "val_accuracy": accuracy, "epochs_s": round(epochs_s, 2)}))


if __name__ == "__main__":
    main()
