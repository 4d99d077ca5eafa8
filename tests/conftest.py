"""Shared fixtures: one real local Ray instance for the whole session (each start costs seconds),
with its own temp dir; image fixtures written as real files."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# Every Ray instance the tests start runs with token authentication and the test run's token, held
# in the environment only (Ray >= 2.59 would otherwise write one to ~/.ray/auth_token). Set before
# anything imports ray, which reads it once.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = uuid.uuid4().hex


SECRET_IN_URI = "raycvUriSecret0123456789"  # a credential inside a URI of a test run's config


@pytest.fixture(scope="session", autouse=True)
def raycv_cache(tmp_path_factory):
    """Bundled datasets are generated into a per-session cache: the generation code is tested too."""
    cache = tmp_path_factory.mktemp("raycv-cache")
    os.environ["RAYCV_CACHE"] = str(cache)
    yield cache


def ray_processes(marker: str, root_pid: int | None = None) -> list:
    """Processes whose command line holds `marker` (Ray sets it: RayTrainWorker, ClassificationPredictor...)
    under `root_pid`, by default the test run's raylet: other Ray instances on the host are not ours."""
    import psutil

    if root_pid is None:
        from raycv.ray_internals import raylet_pid

        root_pid = raylet_pid()
    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # exited (or a zombie) while we looked
            continue
    return found


@pytest.fixture(scope="session")
def ray_session():
    import ray
    import ray.data

    temp_dir = tempfile.mkdtemp(prefix="rcv-")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_run(ray_session, tmp_path_factory):
    """One 2-worker, 2-epoch digits run on the session cluster, made once (each fit costs ~40 s on
    2 CPUs): test_train checks it and resumes it, test_multinode compares a two-node run with it,
    test_infer predicts with its best checkpoint. `log` and `printed` are snapshots taken when the
    run ended; `checkpoint` is a copy of the best checkpoint, beside a copy of the other epoch's
    (a later resume changes the run)."""
    import json
    from types import SimpleNamespace

    from raycv.config import load_config
    from raycv.training.driver import fit

    storage = tmp_path_factory.mktemp("digits-run")
    overrides = [f"run.storage_path={storage}", "run.name=digits-e2e", "train.epochs=2", "scaling.num_workers=2",
                 "train.keep_checkpoints=2", "train.seed=3",
                 # digits reads no data.root: a credential here must still never be written or printed
                 f"data.root=s3://RAYCVKEYID:{SECRET_IN_URI}@bucket/unused?X-Amz-Signature={SECRET_IN_URI}"]
    printed: list[str] = []
    summary = fit(load_config("train", None, overrides), echo=printed.append)
    run_dir = storage / "digits-e2e"
    log = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    progress = json.loads((run_dir / "progress.json").read_text())  # rank 0's last within-epoch report
    copies = storage / "checkpoints"  # both epochs' checkpoints, as the run left them
    for d in run_dir.glob("checkpoint_epoch_*"):
        shutil.copytree(d, copies / d.name)
    return SimpleNamespace(summary=summary, printed=printed, log=log, progress=progress, run_dir=run_dir,
                           overrides=overrides,
                           checkpoint=copies / Path(summary.best_checkpoint).name)


# A deterministic 2-worker digits recipe: test_recipe runs it again on the session cluster and
# test_multinode on two nodes; both must end with the fixture's weights bit for bit.
DETERMINISTIC = ["train.epochs=2", "train.deterministic=true", "scaling.num_workers=2", "data.augment=light",
                 "train.mixup_alpha=0.2"]


def assert_same_run(a: Path, b: Path) -> None:
    """The two run folders' last checkpoints hold equal tensors and their logs equal losses."""
    import json

    import torch

    from raycv.training import checkpoint as ckpt

    one, two = (ckpt.load_state_dict(d / "checkpoint_epoch_0002") for d in (a, b))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    losses = [[json.loads(ln)["train_loss"] for ln in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 2


@pytest.fixture(scope="session")
def deterministic_run(ray_session, tmp_path_factory):
    """-> the run folder of one `DETERMINISTIC` run on the session cluster (made once)."""
    from raycv.cli import main

    storage = tmp_path_factory.mktemp("deterministic")
    assert main(["train", *DETERMINISTIC, f"run.storage_path={storage}", "run.name=det"]) == 0
    return storage / "det"


@pytest.fixture
def stand_in_weights(monkeypatch):
    """Tests plant freshly initialized weights under torchvision's file names (no download here):
    their content cannot match the hash in the name. Still loaded tensors-only."""
    monkeypatch.setenv("RAYCV_WEIGHTS_HASH", "skip")


def write_image(path: Path, rng: np.random.Generator, size=(24, 24), color=None, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    if color is not None:
        arr[:] = color
    Image.fromarray(arr).convert(mode).save(path)
    return path


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """<root>/{train,val}/{cat,dog}/*.png|jpg: 2 classes, 12 train and 4 val images each."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    for split, n in (("train", 12), ("val", 4)):
        for cls, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            for i in range(n):
                ext = "png" if i % 2 else "jpg"
                write_image(root / split / cls / f"{i}.{ext}", rng, color=color)
    return root


N_MANY = 1500


def untrained_checkpoint(path: Path, model: str = "resnet18_cifar", classes: int = 3) -> Path:
    """A freshly initialized model in the raycv checkpoint format: for tests that count rows."""
    from raycv.data.presets import ClassificationEvalPreset
    from raycv.models import get_model
    from raycv.training import checkpoint as ckpt

    info = ckpt.CheckpointInfo(task="classification", model_name=model, model_kwargs={},
                               classes=[chr(97 + i) for i in range(classes)],
                               preprocess=ClassificationEvalPreset(input_size=32, resize_size=32),
                               epoch=1, metrics={}, config={})
    return ckpt.write_checkpoint(path, get_model(model, num_classes=classes), info)


@pytest.fixture(scope="session")
def many_images(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, a folder of N_MANY 32-px PNGs): long enough on 2 CPUs to break something mid-run."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for i in range(N_MANY):
        d = root / "images" / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return untrained_checkpoint(root / "ckpt"), root / "images"
