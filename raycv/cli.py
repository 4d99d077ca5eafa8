"""`raycv train | infer | evaluate | models | datasets`: parse, call one library function, exit.

Every job verb takes `--config FILE` and dotted `key=value` overrides. A user error prints one
line on stderr and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from raycv.errors import UserError, find_user_error

EXIT_USER_ERROR = 2


def _job_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--config", "-c", help="a YAML recipe (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    _job_parser(sub, "train", "train a model with Ray Train (default: the seed's CNN on digits)")
    p = _job_parser(sub, "infer", "batch inference with Ray Data, predictions to Parquet")
    p.add_argument("--checkpoint", help="a raycv checkpoint, or a run directory (its best checkpoint)")
    p.add_argument("--input", help="image folder, Parquet dataset, or registry:<dataset>[:train|val]")
    p.add_argument("--output", help="Parquet output directory")
    p = sub.add_parser("evaluate", help="score predictions against a labelled source")
    p.add_argument("--predictions", required=True, help="Parquet predictions written by `raycv infer`")
    p.add_argument("--labels", help="labelled source (default: the labels in the predictions' paths' folders)")
    p.add_argument("--output", help="folder for metrics.json and confusion_matrix.png")
    sub.add_parser("models", help="list the model registry")
    sub.add_parser("datasets", help="list the dataset sources")
    return parser


def cmd_train(args) -> int:
    from raycv.config import load_config
    from raycv.train.driver import fit

    cfg = load_config("train", args.config, args.overrides)
    s = fit(cfg)
    acc = f"{s.val_accuracy:.4f}" if s.val_accuracy is not None else "n/a"
    top5 = f"{s.val_top5:.4f}" if s.val_top5 is not None else "n/a"
    ips = f"{s.images_per_second:,.0f}" if s.images_per_second else "n/a"
    print(f"done: val top-1 {acc}, top-5 {top5} (best checkpoint), {ips} train images/s, "
          f"{s.epochs} epochs, {s.wall_seconds:.0f} s")
    if s.resumed_from_epoch:
        print(f"resumed from the epoch-{s.resumed_from_epoch} checkpoint of this run")
    print(f"run directory:   {s.run_dir}")
    print(f"best checkpoint: {s.best_checkpoint}")
    return 0


def cmd_infer(args) -> int:
    from raycv.config import load_config
    from raycv.infer.pipeline import run_inference

    overrides = list(args.overrides)
    for key in ("checkpoint", "input", "output"):
        if getattr(args, key):
            overrides.append(f"infer.{key}={getattr(args, key)}")
    cfg = load_config("infer", args.config, overrides)
    s = run_inference(cfg)
    print(f"done: {s.rows} rows ({s.ok} ok, {s.errors} errors), {s.images_per_second:,.1f} images/s, "
          f"{s.wall_seconds:.0f} s")
    print(f"predictions: {s.output}")
    return 0


def cmd_evaluate(args) -> int:
    from raycv.infer.evaluate import evaluate_predictions

    report = evaluate_predictions(args.predictions, labels=args.labels, output=args.output)
    print(json.dumps({k: report[k] for k in ("rows", "scored", "top1", "top5")}))
    if args.output:
        print(f"report: {args.output}")
    return 0


def cmd_models(args) -> int:
    from raycv.models import list_models

    for e in list_models():
        print(f"{e.name:<28} {e.task:<15} {e.source:<12} input {e.default_input_size}px")
    return 0


def cmd_datasets(args) -> int:
    from raycv.data import list_datasets

    for e in list_datasets():
        print(f"{e.name:<14} {'(needs data.root) ' if e.needs_root else ''}{e.description}")
    return 0


COMMANDS: dict[str, Callable] = {"train": cmd_train, "infer": cmd_infer, "evaluate": cmd_evaluate,
                                 "models": cmd_models, "datasets": cmd_datasets}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args)
    except (UserError, FileNotFoundError) as e:
        print(f"raycv {args.verb}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # an error that crossed Ray: one line if it is the user's
        user = find_user_error(e)
        if user is None:
            raise
        print(f"raycv {args.verb}: error: {user}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("raycv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
