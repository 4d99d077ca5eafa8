import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from raycv.errors import UserError
from raycv.models import get_model, list_models, register_model

# The whole raycv registry plus a CPU-sized cross-section of torchvision's families.
TORCHVISION_SUBSET = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "squeezenet1_1",
                      "regnet_x_400mf", "densenet121", "convnext_tiny", "lraspp_mobilenet_v3_large",
                      "deeplabv3_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn",
                      "ssdlite320_mobilenet_v3_large"]
OWN = [e.name for e in list_models() if e.source == "raycv"]


@pytest.mark.parametrize("name", OWN + TORCHVISION_SUBSET)
def test_forward_shape_and_finite(name):
    torch.manual_seed(0)
    entry = next(e for e in list_models() if e.name == name)
    size = min(entry.default_input_size, 64) if entry.source == "torchvision" else entry.default_input_size
    model = get_model(name, num_classes=7).eval()
    if entry.task == "detection":  # torchvision's list of images in, one dict of boxes / labels / scores each out
        with torch.no_grad():
            out = model(list(torch.rand(2, 3, size, size)))
        assert len(out) == 2 and all(set(o) == {"boxes", "labels", "scores"} for o in out)
        assert all(o["boxes"].shape[1:] == (4,) and ((o["labels"] >= 0) & (o["labels"] < 7)).all() for o in out)
        model.train()  # and in training mode, its own losses
        losses = model(list(torch.rand(2, 3, size, size)), [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]),
                                                             "labels": torch.tensor([3])}] * 2)
        assert losses and all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
        return
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    if entry.task == "segmentation":  # torchvision's output dict, logits at the input size
        out = out["out"]
        assert out.shape == (2, 7, size, size)
    else:
        assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_seed_cnn_flatten_follows_input_size():
    m = get_model("simple_cnn", num_classes=3, input_size=64)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_cifar_resnet_is_residual_with_small_stem():
    m = get_model("resnet18_cifar", num_classes=10)
    assert m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # Residual: with the block's own branch silenced (its last batch norm scaled to zero), what
    # remains is the skip path, relu(x); a plain stack of convolutions would give relu(0) = 0.
    block = m.layer1[0].eval()
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
        x = torch.randn(2, 64, 8, 8)
        assert torch.equal(block(x), torch.relu(x))


def test_unknown_and_duplicate_names():
    with pytest.raises(UserError, match="unknown model 'resnet19'.*simple_cnn"):
        get_model("resnet19", num_classes=2)
    with pytest.raises(ValueError, match="already registered"):
        register_model("simple_cnn")(lambda **kw: nn.Identity())


def test_torchvision_is_imported_only_when_a_model_needs_it():
    """The default job's driver builds the seed's CNN without importing torchvision (over a second
    of its start-up); every built-in name still counts the moment a name is looked up, listed, or
    taken by a plugin. In a fresh process: this one has imported torchvision long ago."""
    code = textwrap.dedent("""
        import sys
        from torch import nn
        import raycv.training.driver
        from raycv.errors import UserError
        from raycv.models import get_model, list_models, register_model
        get_model("simple_cnn", num_classes=10)
        assert "torchvision" not in sys.modules, "torchvision imported for the seed's CNN"
        try:
            register_model("resnet18")(lambda **kw: nn.Identity())  # a plugin's model, torchvision's name
        except ValueError as e:
            assert "already registered (by torchvision)" in str(e), e
        else:
            raise AssertionError("a plugin took torchvision's name")
        assert "torchvision" in sys.modules
        assert {"resnet18_cifar", "fasterrcnn_mobilenet_v3_large_fpn", "lraspp_small"} <= {e.name for e in list_models()}
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_pretrained_weights_from_the_local_torch_cache(tmp_path, monkeypatch, stand_in_weights):
    """A user with the weights file in $TORCH_HOME gets them, and a new head for their classes."""
    from torchvision.models import ResNet18_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    reference = get_model("resnet18", num_classes=1000)
    target = tmp_path / "hub" / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), target)
    model = get_model("resnet18", num_classes=5, weights="IMAGENET1K_V1")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 5


def test_missing_weights_fail_fast_with_a_clear_error(tmp_path, monkeypatch):
    """No cached file and no network (a proxy on a closed port): one clear error, not a hang."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    t0 = time.monotonic()
    with pytest.raises(UserError, match="could not load torchvision weights .*ResNet18_Weights.IMAGENET1K_V1"):
        get_model("resnet18", num_classes=5, weights="DEFAULT")
    assert time.monotonic() - t0 < 30
    with pytest.raises(UserError, match="has no weights 'IMAGENET9K'"):
        get_model("resnet18", num_classes=5, weights="IMAGENET9K")


class _Planted:
    """Unpickling this creates a file: proof that code from a weights file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _plant(tmp_path, monkeypatch, url: str, payload) -> tuple[Path, Path]:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    target = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, target)
    return target, tmp_path / "pwned"


@pytest.mark.parametrize("hash_check", ["verify", "skip"])
def test_a_weights_file_with_code_is_refused_and_nothing_runs(tmp_path, monkeypatch, hash_check):
    """A pickle with a reducer at $TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth: refused by its
    hash, and with the hash check off still refused by the tensors-only load. The marker proves no code ran."""
    from torchvision.models import ResNet18_Weights

    monkeypatch.setenv("RAYCV_WEIGHTS_HASH", hash_check)
    target, marker = _plant(tmp_path, monkeypatch, ResNet18_Weights.IMAGENET1K_V1.url,
                            {"conv1.weight": _Planted(str(tmp_path / "pwned"))})
    why = "does not start with f37072fd" if hash_check == "verify" else "not a tensors-only file"
    with pytest.raises(UserError, match=f"refusing weights file {re.escape(str(target))}: .*{why}"):
        get_model("resnet18", num_classes=5, weights="IMAGENET1K_V1")
    assert not marker.exists()


def test_backbone_weights_with_code_are_refused_before_torchvision_reads_them(tmp_path, monkeypatch, stand_in_weights):
    """model.kwargs.weights_backbone: torchvision unpickles that file in full inside its builder;
    raycv reads it tensors-only first."""
    from torchvision.models import ResNet50_Weights

    target, marker = _plant(tmp_path, monkeypatch, ResNet50_Weights.IMAGENET1K_V1.url,
                            {"conv1.weight": _Planted(str(tmp_path / "pwned"))})
    with pytest.raises(UserError, match=f"refusing weights file {re.escape(str(target))}: not a tensors-only"):
        get_model("fcos_resnet50_fpn", num_classes=3, weights_backbone="IMAGENET1K_V1")
    assert not marker.exists()
    with pytest.raises(UserError, match="weights_backbone='NOPE' is not one of ResNet50_Weights"):
        get_model("fcos_resnet50_fpn", num_classes=3, weights_backbone="NOPE")


def test_the_cli_refuses_planted_weights_before_ray_starts(tmp_path, monkeypatch, capsys):
    from torchvision.models import ResNet18_Weights

    from raycv import runtime
    from raycv.cli import main

    monkeypatch.setattr(runtime, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    target, marker = _plant(tmp_path, monkeypatch, ResNet18_Weights.IMAGENET1K_V1.url,
                            {"conv1.weight": _Planted(str(tmp_path / "pwned"))})
    (tmp_path / "in").mkdir()
    assert main(["infer", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "model.name=resnet18", "model.weights=IMAGENET1K_V1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"refusing weights file {target}" in err[0] and not marker.exists()
