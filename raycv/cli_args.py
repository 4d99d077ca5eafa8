"""raycv's command line: one argparse parser per verb (`raycv/cli.py` runs them)."""

from __future__ import annotations

import argparse

DESCRIPTION = ("raycv train | tune | infer | predict | export | quantize | consolidate | evaluate | draw | submit "
               "| jobs | report | models | datasets")
PREDICT_LIMIT = 1000  # images `raycv predict` takes; a bigger job is `raycv infer`'s


def _import_option(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="a Python module that registers models or datasets (repeatable; docs/plugins.md)")
    return p


def _job_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--config", "-c", help="a YAML recipe (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")
    return _import_option(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycv", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="verb", required=True)
    _job_parser(sub, "train", "train a model with Ray Train (default: the seed's CNN on digits)")
    _job_parser(sub, "tune", "search hyperparameters with Ray Tune: each trial a raycv training run (a recipe's tune: section)")
    p = _job_parser(sub, "infer", "batch inference with Ray Data, predictions to Parquet")
    p.add_argument("--checkpoint", help="a raycv checkpoint, or a run directory (its best checkpoint)")
    p.add_argument("--input", help="image folder, Parquet dataset, or registry:<dataset>[:train|val]")
    p.add_argument("--output", help="Parquet output directory")
    p.add_argument("--json", action="store_true", help="end with the run's summary as one JSON line (rows, rates, "
                                                       "where the start-up went)")
    p = sub.add_parser("predict", help="predict a few images in this process (no Ray), one line each",
                       description="Load a checkpoint here and print one line per image: top-k with scores, "
                                   "boxes, or class shares. For more than --limit images, use `raycv infer`.")
    p.add_argument("--checkpoint", required=True, help="a raycv checkpoint, or a run directory (its best checkpoint)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders (recursive) or globs; "
                                                               "infer.* settings among them, e.g. infer.topk=3")
    p.add_argument("--json", action="store_true", help="one JSON object per image (the Parquet row's fields; "
                                                       "segmentation masks left out)")
    p.add_argument("--limit", type=int, default=PREDICT_LIMIT, help=f"refuse more images than this (default {PREDICT_LIMIT})")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    _import_option(p)
    p = sub.add_parser("export", help="write a checkpoint as ONNX, TorchScript or safetensors, checked on the spot",
                       description="Export a checkpoint's model with its classes and preprocessing (ONNX metadata and "
                                   "a sidecar JSON), then run the export beside the PyTorch model on sample inputs "
                                   "and print the largest difference.")
    p.add_argument("--checkpoint", required=True, help="a raycv checkpoint, or a run directory (its best checkpoint)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "safetensors"])
    p.add_argument("--output", help="the file to write (default: <checkpoint name>.onnx / .pt / .safetensors)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest difference accepted (default 1e-3)")
    _import_option(p)
    p = sub.add_parser("quantize", help="int8 post-training quantization for CPU inference, checked on the spot",
                       description="Quantize a checkpoint to int8 (FX graph mode, calibrated on a few hundred images "
                                   "preprocessed as the checkpoint says) into a new checkpoint that raycv infer, "
                                   "predict and raycv.load take; print its size and its agreement with the float model.")
    p.add_argument("--checkpoint", required=True, help="a raycv checkpoint, or a run directory (its best checkpoint)")
    p.add_argument("--output", required=True, help="the new checkpoint folder (must not exist or be empty)")
    p.add_argument("--calibration", nargs="+", metavar="IMAGES", help="image files, folders or globs (default: the "
                                                                       "checkpoint's own training split, read with Ray)")
    p.add_argument("--images", type=int, default=256, help="calibration images (default 256)")
    p.add_argument("--backend", default="x86", choices=["x86", "qnnpack"], help="x86 (default) or qnnpack (ARM)")
    p.add_argument("--method", default="auto", choices=["auto", "static", "dynamic"],
                   help="static (convolutions and linear layers, calibrated), dynamic (linear layers only), or auto: "
                        "static where the model can be traced")
    p.add_argument("--json", action="store_true", help="end with the summary as one JSON line")
    _import_option(p)
    p = sub.add_parser("consolidate", help="a sharded checkpoint (scaling.strategy=fsdp) as one model.pt",
                       description="Gather a sharded checkpoint's shards into a plain raycv checkpoint (model.pt and "
                                   "raycv.json) for tools that read model.pt; raycv's own verbs take either.")
    p.add_argument("--checkpoint", required=True, help="a sharded raycv checkpoint, or a run directory (its best)")
    p.add_argument("--output", required=True, help="the new checkpoint folder (must not exist or be empty)")
    p = sub.add_parser("evaluate", help="score predictions against a labelled source")
    p.add_argument("--predictions", required=True, help="Parquet predictions written by `raycv infer`")
    p.add_argument("--labels", help="labelled source (default: found from the images' paths): classification, a Parquet "
                                    "of path + label; segmentation, a folder of class-mask PNGs; detection, a COCO "
                                    "instances JSON, a YOLO dataset (data.yaml) or a VOC tree (Annotations/)")
    p.add_argument("--output", help="folder for metrics.json and confusion_matrix.png")
    p = sub.add_parser("draw", help="draw predictions onto their images (boxes, mask overlays, labels) as PNGs to look at")
    p.add_argument("--predictions", required=True, help="Parquet predictions written by `raycv infer`")
    p.add_argument("--output", required=True, help="folder for the PNGs")
    p.add_argument("--limit", type=int, default=16, help="draw the first N rows by path (default 16)")
    p.add_argument("--score-threshold", type=float, default=0.5,
                   help="detection: draw boxes scoring at least this (default 0.5)")
    p = sub.add_parser("submit", help="run train/tune/infer/evaluate on a Ray cluster as a Ray job",
                       description="Validate a train/tune/infer/evaluate invocation here, then submit it as a Ray job. "
                                   "Example: raycv submit --address http://127.0.0.1:8265 --wait train train.epochs=3")
    p.add_argument("--address", help="the job server, http://<head>:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="uploaded to the cluster; .gitignore/.rayignore apply (default: .)")
    p.add_argument("--pip", action="append", default=[], metavar="REQ", help="pip requirement for the job (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job (repeatable)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the job's driver")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the job's driver")
    p.add_argument("--entrypoint-resources", metavar="JSON", help='custom resources for the driver, e.g. \'{"accel": 1}\'')
    p.add_argument("--submission-id", help="job id (default: raycv-<verb>-<time>-<random>)")
    p.add_argument("--wait", action="store_true", help="stream the logs and exit with the job's outcome (0: SUCCEEDED)")
    p.add_argument("job_verb", choices=["train", "tune", "infer", "evaluate"], metavar="{train,tune,infer,evaluate}")
    p.add_argument("job_args", nargs=argparse.REMAINDER, help="the verb's own arguments")
    p = sub.add_parser("jobs", help="list, inspect, follow or stop submitted Ray jobs")
    p.add_argument("--address", help="the job server, http://<head>:8265 (default: $RAY_ADDRESS)")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", help="submission id (status, logs, stop)")
    p.add_argument("--follow", "-f", action="store_true", help="logs: stream until the job ends")
    p = sub.add_parser("report", help="a training run's epochs table and best checkpoint; redraws curves.png")
    p.add_argument("run_dir", help="a run directory (<run.storage_path>/<run.name>), local or a URI")
    _import_option(sub.add_parser("models", help="list the model registry (timm's: timm/<name>, with timm installed)"))
    _import_option(sub.add_parser("datasets", help="list the dataset sources"))
    return parser
