"""`raycv <verb>`: parse (`raycv/cli_args.py`), call the Python API (`raycv/api.py`), exit.

Every job verb takes `--config FILE` and dotted `key=value` overrides. A user error prints one
line on stderr and exits with status 2, never a traceback.
"""

from __future__ import annotations

import gc
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Callable

from raycv import api
from raycv.cli_args import build_parser
from raycv.errors import UserError, find_user_error

EXIT_USER_ERROR = 2
OVERRIDE = re.compile(r"^[a-z_]+(\.[a-z_]+)+=")  # a dotted key=value among `raycv predict`'s images


def say(text: str = "", **kwargs) -> None:
    """print, with credentials in URIs redacted (raycv never prints a secret it was given)."""
    from raycv.redact import redact

    print(redact(str(text)), **kwargs)


def cmd_train(args) -> int:
    from raycv.config import load_config

    cfg = load_config("train", args.config, args.overrides)
    cfg.run.plugins = [*cfg.run.plugins, *args.imports]  # the workers import them too
    s = api.train(cfg)
    ips = f"{s.images_per_second:,.0f}" if s.images_per_second else "n/a"
    if s.task == "classification":
        acc = f"{s.val_accuracy:.4f}" if s.val_accuracy is not None else "n/a"
        top5 = f"{s.val_top5:.4f}" if s.val_top5 is not None else "n/a"
        quality = f"val top-1 {acc}, top-5 {top5}"
    else:
        from raycv.tasks import shown

        quality = ", ".join(f"val {label} {value:.4f}" for label, value in shown(s.metrics or {})) or "n/a"
    say(f"done: {quality} (best checkpoint), {ips} train images/s, {s.epochs} epochs, {s.wall_seconds:.0f} s")
    if s.resumed_from_epoch:
        say(f"resumed from the epoch-{s.resumed_from_epoch} checkpoint of this run")
    if s.early_stopped:
        say(f"stopped early after epoch {s.epochs}: no better {s.checkpoint_metric} for "
              f"{cfg.train.early_stop_patience} epoch(s)")
    if s.curves:
        say(f"curves:          {s.curves}")
    say(f"run directory:   {s.run_dir}")
    say(f"best checkpoint: {s.best_checkpoint}")
    return 0


def cmd_tune(args) -> int:
    from raycv.config import load_config
    from raycv.tuning import tune_search

    cfg = load_config("tune", args.config, args.overrides)
    cfg.run.plugins = [*cfg.run.plugins, *args.imports]
    s = tune_search(cfg, echo=say)
    say(s.table())
    say(f"best: trial {s.best['trial_id']}, {s.metric} {s.best['best']:.4f} ({', '.join(f'{k}={v}' for k, v in s.best['params'].items())}); "
        f"{len(s.trials)} trials, {sum(t['stopped_early'] for t in s.trials)} stopped early, {s.wall_seconds:.0f} s")
    for e in s.errors:
        say(e)
    say(f"results:         {s.results} (+ .csv)")
    if s.plot:
        say(f"picture:         {s.plot}")
    say(f"best config:     {s.best_config}  (raycv train --config {s.best_config})")
    say(f"best run:        {s.best['run_dir']}")
    return 0


def infer_overrides(args) -> list[str]:
    """--checkpoint/--input/--output are shorthands for infer.* overrides."""
    overrides = list(args.overrides)
    for key in ("checkpoint", "input", "output"):
        if getattr(args, key):
            overrides.append(f"infer.{key}={getattr(args, key)}")
    return overrides


def cmd_infer(args) -> int:
    from raycv.config import load_config

    cfg = load_config("infer", args.config, infer_overrides(args))
    cfg.run.plugins = [*cfg.run.plugins, *args.imports]  # the actors import them too
    s = api.infer(config=cfg)
    say(f"done: {s.rows} rows ({s.ok} ok, {s.errors} errors), {s.images_per_second:,.1f} images/s, "
          f"{s.wall_seconds:.0f} s")
    say(f"predictions: {s.output}")
    if getattr(args, "json", False):
        say(json.dumps(s.to_json()))
    return 0


def _predict_line(row: dict, task: str) -> str:
    if row.get("error"):
        return f"{row['path']}  error: {row['error']}"
    if task == "classification":
        top = ", ".join(f"{label} {score:.3f}" for label, score in zip(row["topk_labels"], row["topk_scores"]))
        return f"{row['path']}  {row['label']} {row['score']:.3f}  (top-{len(row['topk_labels'])}: {top})"
    if task == "detection":
        boxes = "; ".join(f"{label} {score:.2f} [{', '.join(f'{v:.0f}' for v in box)}]"
                          for label, score, box in zip(row["labels"], row["scores"], row["boxes"]))
        return f"{row['path']}  {len(row['boxes'])} box(es){': ' + boxes if boxes else ''}"
    return row["path"] + "  " + row["shares"]


def cmd_predict(args) -> int:
    import time

    t0 = time.perf_counter()
    overrides = [a for a in args.images if OVERRIDE.match(a)]
    paths = api.expand_images([a for a in args.images if not OVERRIDE.match(a)])
    if len(paths) > args.limit:
        raise UserError(f"{len(paths)} images: raycv predict is for a few (--limit {args.limit}); run "
                        f"`raycv infer --checkpoint {args.checkpoint} --input FOLDER --output OUT` for a big set")
    predictor = api.load(args.checkpoint, device=args.device, overrides=overrides)
    for row in predictor(paths):
        if predictor.task == "segmentation":
            row.pop("mask_png", None)
            fractions = row.get("class_fractions") or []
            share = sorted(zip(predictor.classes, fractions), key=lambda cf: -cf[1])
            row["shares"] = f"{row.get('height')}x{row.get('width')}: " + ", ".join(
                f"{c} {f:.0%}" for c, f in share if f >= 0.005)
        if args.json:
            row.pop("shares", None)
            say(json.dumps(row))
        else:
            say(_predict_line(row, predictor.task))
    say(f"{len(paths)} image(s) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from raycv.export import export_checkpoint

    s = export_checkpoint(args.checkpoint, args.format, args.output, tolerance=args.tolerance)
    say(f"exported {s.model} ({s.task}) as {s.format}: {s.output} ({s.size_mb:.1f} MB), metadata in {s.sidecar}")
    say(f"checked with {s.checked_with}: max |difference| from the PyTorch model {s.max_abs_diff:.2e}")
    return 0


def cmd_quantize(args) -> int:
    from raycv.quantize import quantize_checkpoint

    s = quantize_checkpoint(args.checkpoint, args.output, calibration=args.calibration, images=args.images,
                            backend=args.backend, method=args.method)
    say(f"quantized ({s.method} int8, {s.backend}, {s.calibration_images} calibration images): {s.output}")
    say(f"model.pt {s.size_mb_fp32:.2f} MB -> {s.size_mb_int8:.2f} MB; against the float model on the calibration "
        f"images: top-1 agreement {s.top1_agreement:.4f}, max |difference| {s.max_abs_diff} ({s.seconds:.1f} s)")
    if args.json:
        say(json.dumps(s.to_json()))
    return 0


def cmd_consolidate(args) -> int:
    from raycv.training.checkpoint import consolidate

    out, info = consolidate(args.checkpoint, args.output)
    say(f"consolidated {info.model_name} (epoch {info.epoch}, {info.sharded['world_size']} shards): {out}")
    return 0


def cmd_evaluate(args) -> int:
    report = api.evaluate(args.predictions, labels=args.labels, output=args.output)
    keys = {"segmentation": ("rows", "scored", "miou", "pixel_accuracy"),
            "detection": ("rows", "scored", "map", "map_50", "map_75", "mar_100")}.get(report["task"],
                                                                                     ("rows", "scored", "top1", "top5"))
    say(json.dumps({k: report[k] for k in keys}))
    if args.output:
        say(f"report: {args.output}")
    return 0


def cmd_draw(args) -> int:
    from raycv.inference.draw import draw_predictions

    written = draw_predictions(args.predictions, args.output, limit=args.limit, score_threshold=args.score_threshold)
    say(f"drew {len(written)} image(s) into {args.output}")
    return 0


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} wants KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def cmd_submit(args) -> int:
    from raycv import submit

    resources = {}
    if args.entrypoint_resources:
        try:
            resources = {str(k): float(v) for k, v in json.loads(args.entrypoint_resources).items()}
        except (ValueError, AttributeError, TypeError):
            raise UserError(f"--entrypoint-resources wants a JSON object of numbers, got {args.entrypoint_resources!r}") from None
    from raycv.redact import has_secret

    if any(has_secret(a) for a in args.job_args):
        raise UserError("a credential in a URI among the job's arguments would be readable by anyone who can list "
                        "the cluster's jobs; give credentials through the cluster's environment or instance roles")
    working_dir = Path(args.working_dir).expanduser()
    if not working_dir.is_dir():
        raise UserError(f"--working-dir {args.working_dir} is not a folder")
    try:  # the verb's own arguments, parsed as `raycv <verb>` would on the cluster
        job = build_parser().parse_args([args.job_verb, *args.job_args])
    except SystemExit:
        raise UserError(f"bad arguments for `raycv {args.job_verb}`: {shlex.join(args.job_args)}") from None
    overrides = infer_overrides(job) if args.job_verb == "infer" else list(getattr(job, "overrides", []))
    submit.validate_locally(args.job_verb, getattr(job, "config", None), overrides, working_dir)
    req = submit.JobRequest(verb=args.job_verb, args=list(args.job_args), address=args.address,
                            working_dir=args.working_dir, pip=args.pip, env=_pairs(args.env, "--env"),
                            num_cpus=args.entrypoint_num_cpus, num_gpus=args.entrypoint_num_gpus,
                            resources=resources, submission_id=args.submission_id)
    job_id, client = submit.submit(req)
    say(f"submitted {job_id} to {submit.job_address(args.address)}", flush=True)
    if not args.wait:
        say(f"follow it: raycv jobs logs {job_id} --follow")
        return 0
    try:
        status = submit.follow(client, job_id)
    except KeyboardInterrupt:
        say(f"\nstopped following; the job goes on. Stop it with: raycv jobs stop {job_id}", file=sys.stderr)
        return 130
    say(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args) -> int:
    from raycv import submit

    if args.action != "list" and not args.job_id:
        raise UserError(f"`raycv jobs {args.action}` needs a job id")
    if args.action == "list":
        jobs = submit.call(args.address, "cannot list jobs", lambda c: c.list_jobs())
        for job in sorted(jobs, key=lambda j: j.start_time or 0):
            say(submit.describe(job))
    elif args.action == "status":
        info = submit.call(args.address, f"no job {args.job_id}", lambda c: c.get_job_info(args.job_id))
        say(submit.describe(info))
        if info.message:
            say(info.message)
    elif args.action == "logs":
        if args.follow:  # one client; an unknown id fails in one line on the status request
            status = submit.call(args.address, f"no job {args.job_id}", lambda c: submit.follow(c, args.job_id))
            return 0 if status == "SUCCEEDED" else 1
        say(submit.call(args.address, f"no job {args.job_id}", lambda c: c.get_job_logs(args.job_id)), end="")
    else:
        stopped = submit.call(args.address, f"cannot stop {args.job_id}", lambda c: c.stop_job(args.job_id))
        say(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def cmd_report(args) -> int:
    from raycv.training.report import write_report

    say(write_report(args.run_dir.rstrip("/")).table())
    return 0


def cmd_models(args) -> int:
    from raycv.models import list_models

    for e in list_models():
        say(f"{e.name:<28} {e.task:<15} {e.source:<12} input {e.default_input_size}px")
    return 0


def cmd_datasets(args) -> int:
    from raycv.data import list_datasets

    for e in list_datasets():
        say(f"{e.name:<20} {e.task:<15} {'(needs data.root) ' if e.needs_root else ''}{e.description}")
    return 0


COMMANDS: dict[str, Callable] = {"train": cmd_train, "tune": cmd_tune, "infer": cmd_infer, "predict": cmd_predict,
                                 "export": cmd_export, "quantize": cmd_quantize, "consolidate": cmd_consolidate,
                                 "evaluate": cmd_evaluate, "draw": cmd_draw, "submit": cmd_submit, "jobs": cmd_jobs,
                                 "report": cmd_report, "models": cmd_models, "datasets": cmd_datasets}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.verb == "predict" and not any(e.startswith("-") for e in extra):  # images and overrides after an option: `predict --json a.png`
        args.images += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "imports", None):  # before anything else, in this process: a bad plugin is one line
            from raycv import plugins

            plugins.load(args.imports)
        return COMMANDS[args.verb](args)
    except (UserError, FileNotFoundError) as e:
        say(f"raycv {args.verb}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # an error that crossed Ray: one line if it is the user's
        user = find_user_error(e)
        if user is None:
            raise
        say(f"raycv {args.verb}: error: {user}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        say("raycv: interrupted", file=sys.stderr)
        return 130


def console(argv: list[str] | None = None) -> int:
    """The `raycv` command (and jobs/*.py): `main`, then a quick exit. It leaves Ray itself (Ray's
    exit hook, left to do it, took ~0.5 s longer), then moves every object into the collector's
    permanent generation: the interpreter's last collections would walk torch's, torchvision's and
    Ray's module graphs only to free memory the process is about to give back (1.3-1.5 s on a
    2-CPU machine). Exit handlers still run; bench/README.md has the figures."""
    try:
        return main(argv)
    finally:
        ray = sys.modules.get("ray")  # never imported by a command that had no use for it
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        gc.freeze()


if __name__ == "__main__":
    sys.exit(console())
