"""The script a PyTorch user writes instead of raycv for batch inference on one machine: a
`Dataset` that opens each file with PIL and applies torchvision transforms, a `DataLoader` with
worker processes for decoding, the model in the main process under `inference_mode`, and one
Parquet file written with pyarrow at the end. `bench/infer_bench.py` runs it as the baseline.

    python bench/dataloader_script.py --images DIR --weights model.pt --arch resnet18 \
        --size 64 --out preds.parquet

It prints one JSON line: the seconds from its start to its first prediction, and to its end
(the interpreter's own start-up is measured by the caller).
"""

import argparse
import json
import time

T0 = time.perf_counter()

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402


class Images(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.paths[i]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import os

    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.images) for f in fs
                   if f.lower().endswith((".jpg", ".jpeg", ".png")))
    transform = transforms.Compose([
        transforms.Resize(args.size), transforms.CenterCrop(args.size), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    loader = DataLoader(Images(paths, transform), batch_size=args.batch, num_workers=args.workers)
    model = torchvision.models.get_model(args.arch, num_classes=args.classes)
    model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    model.eval()

    first = None
    out_paths, labels, scores = [], [], []
    with torch.inference_mode():
        for x, p in loader:
            prob = model(x).softmax(1)
            top = prob.max(1)
            out_paths += p
            labels += top.indices.tolist()
            scores += top.values.tolist()
            if first is None:
                first = time.perf_counter() - T0
    pq.write_table(pa.table({"path": out_paths, "label_index": pa.array(labels, pa.int32()),
                             "score": pa.array(scores, pa.float32())}), args.out)
    print(json.dumps({"first_prediction_s": round(first or 0.0, 2), "end_s": round(time.perf_counter() - T0, 2),
                      "rows": len(out_paths)}))


if __name__ == "__main__":
    main()
