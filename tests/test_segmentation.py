"""Semantic segmentation: the generated scenes (exact masks, COCO boxes), a VOC-style tree in the
real format made here, masks that move with their images through augmentation, torchvision's
pretrained-weights path, and (slow) train -> infer -> evaluate -> draw on a real local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raycv.data import bundled
from raycv.data.decode import decode_pairs
from raycv.data.presets import SegmentationEvalPreset, SegmentationTrainPreset
from raycv.data.segmentation_sources import VOC_CLASSES, voc_items
from raycv.errors import UserError


def test_scenes_have_exact_masks_and_coco_boxes():
    root = bundled.scenes_root(40, seed=1)
    assert (root / "classes.txt").read_text().split() == list(bundled.SCENE_CLASSES)
    for split in ("train", "val"):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        stems = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert [im["file_name"] for im in coco["images"]] == [f"{s}.png" for s in stems]
        assert [c["name"] for c in coco["categories"]] == list(bundled.SHAPE_CLASSES)
        for im in coco["images"]:
            m = Image.open(root / "SegmentationClass" / im["file_name"])
            assert m.mode == "P"  # VOC's format: a palette PNG whose values are the class indices
            mask = np.asarray(m)
            anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
            assert 1 <= len(anns) <= 3 and sum(a["area"] for a in anns) == int((mask > 0).sum())
            for a in anns:  # every box holds exactly its object's pixels (shapes never touch)
                x, y, w, h = a["bbox"]
                inside = mask[y:y + h, x:x + w]
                assert int((inside == a["category_id"]).sum()) >= a["area"]  # all of the object is inside
                assert (inside[0] > 0).any() and (inside[-1] > 0).any() and (inside[:, 0] > 0).any() \
                    and (inside[:, -1] > 0).any()  # tight: each edge touches the object


@pytest.mark.parametrize("args, message", [
    (["data.name=shapes_segmentation", "model.name=simple_cnn"],
     "model 'simple_cnn' is a classification model but the dataset is for segmentation"),
    (["data.name=digits", "model.name=lraspp_small"], "is a segmentation model but the dataset is for classification"),
    (["data.name=digits", "train.checkpoint_metric=val_miou"], "train.checkpoint_metric=val_miou is not a classification metric"),
])
def test_task_mismatches_are_refused_before_ray_starts(args, message, tmp_path, capsys):
    from raycv.cli import main

    assert main(["train", *args, f"run.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not any(tmp_path.iterdir())  # refused before the run directory was made


def _voc_tree(root: Path, n: int = 6, size=(40, 30)) -> Path:
    """A VOC 2012-style tree: JPEG images, palette PNG masks with a void (255) border around each
    object, ImageSets lists, no classes.txt (so the 21 VOC names apply)."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    palette = bundled.voc_palette()
    stems = [f"2007_{i:06d}" for i in range(n)]
    for i, stem in enumerate(stems):
        w, h = size
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg")
        mask = np.zeros((h, w), np.uint8)
        mask[5:20, 5:25] = 255  # void border ...
        mask[6:19, 6:24] = 15 if i % 2 else 12  # ... around a person / a dog
        m = Image.fromarray(mask, mode="L")
        m.putpalette(palette)
        m.save(root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(stems[:4]) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(stems[4:]) + "\n")
    return root


def test_voc_tree_reads_and_decodes_with_void_kept(tmp_path):
    root = _voc_tree(tmp_path / "VOC2012")
    classes, train, val = voc_items(str(root), 0.2, 0)
    assert classes == list(VOC_CLASSES) and len(train) == 4 and len(val) == 2
    assert train[0] == (str(root / "JPEGImages/2007_000000.jpg"), str(root / "SegmentationClass/2007_000000.png"))
    preset = SegmentationEvalPreset(input_size=20)
    out = decode_pairs({"path": np.array([p for p, _ in val], dtype=object),
                        "mask_path": np.array([m for _, m in val], dtype=object)}, preset=preset)
    assert out["image"].shape == (2, 3, 20, 20) and out["mask"].shape == (2, 20, 20)
    # 2007_000004 shows a dog (12), 2007_000005 a person (15); nearest resizing blends no labels
    assert set(np.unique(out["mask"][0])) == {0, 255, 12} and set(np.unique(out["mask"][1])) == {0, 255, 15}

    # A class index beyond the classes (VOC's 15 against 4 classes), a mask of the wrong size, and a
    # listed id without files: one line each, naming the file.
    with pytest.raises(UserError, match=r"mask .*2007_000005.png has class index 15 but there are 4 classes"):
        decode_pairs({"path": np.array([val[1][0]], dtype=object), "mask_path": np.array([val[1][1]], dtype=object)},
                     preset=preset, num_classes=4)
    Image.new("P", (10, 10)).save(root / "SegmentationClass" / "2007_000005.png")
    with pytest.raises(UserError, match=r"mask .*2007_000005.png is 10x10 but its image .* is 40x30"):
        decode_pairs({"path": np.array([val[1][0]], dtype=object), "mask_path": np.array([val[1][1]], dtype=object)},
                     preset=preset)
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000004\n2007_999999\n")
    with pytest.raises(UserError, match="lists '2007_999999' but .* has no image"):
        voc_items(str(root), 0.2, 0)


def test_augmentation_moves_each_mask_with_its_image():
    """Image pixels encode the class (value 80 x class), so after random crops, zooms and flips the
    mask must still name the class that the image shows at (almost) every pixel."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(8, 64, 64, dtype=torch.uint8)
    for i in range(8):
        x, y = torch.randint(0, 40, (2,), generator=g).tolist()
        masks[i, y:y + 20, x:x + 14] = 1 + i % 3
    images = (masks * 80)[:, None].repeat(1, 3, 1, 1)
    preset = SegmentationTrainPreset(input_size=48, resize_size=64, augment="light", hflip=True)
    torch.manual_seed(0)
    out_images, out_masks = preset.augment_pairs(images, masks)
    assert out_images.shape == (8, 3, 48, 48) and out_masks.shape == (8, 48, 48)
    agree = (out_images[:, 0].float() / 80).round() == out_masks.float()
    assert agree.float().mean() > 0.97  # only bilinear edges of the image may differ
    assert not torch.equal(out_masks, SegmentationTrainPreset(input_size=48, resize_size=64, augment="none",
                                                              hflip=False).augment_pairs(images, masks)[1])


def test_pretrained_segmentation_weights_load_with_a_new_classifier(tmp_path, stand_in_weights):
    """torchvision's weights file, as a user with internet would have it in the torch cache (made
    here from a freshly initialized model: nothing is downloaded), loads; with 4 classes instead of
    VOC's 21 the classifier convolutions are replaced and everything else is the file's."""
    from torchvision import models as tvm

    from raycv.models import get_model

    w = tvm.get_model_weights("lraspp_mobilenet_v3_large").DEFAULT
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    reference = tvm.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / Path(w.url).name)
    try:
        model = get_model("lraspp_mobilenet_v3_large", num_classes=4, weights="DEFAULT")
    finally:
        torch.hub.set_dir(old_hub)
    state, ref = model.state_dict(), reference.state_dict()
    swapped = {k for k in state if state[k].shape != ref[k].shape}
    assert swapped and all(k.startswith("classifier.") for k in swapped)
    assert all(torch.equal(state[k], ref[k]) for k in state if k not in swapped)
    assert model.eval()(torch.zeros(1, 3, 64, 64))["out"].shape == (1, 4, 64, 64)


# Measured on this machine (2 CPUs, 2026-11-29): TRAIN below reached val mIoU 0.82 (best of 10 epochs; 0.74 after 6
# epochs in two other runs). The bar leaves margin for run-to-run variation (batch order, 2 ranks).
MIOU_BAR = 0.70
TRAIN = ["data.name=shapes_segmentation", "data.num_samples=600", "data.input_size=32", "model.name=lraspp_small",
         "data.batch_size=16",
         "optim.name=adamw", "optim.lr=0.004", "train.epochs=10", "scaling.num_workers=2", "train.seed=0",
         "run.name=seg"]


def _direct_masks(checkpoint: str, paths: list[Path]) -> dict[str, np.ndarray]:
    """The same checkpoint called directly with torchvision, one image at a time: no Ray, no raycv pipeline."""
    import torch.nn.functional as F
    from torchvision.transforms import v2

    from raycv.training.checkpoint import load_model

    model, info = load_model(checkpoint)
    out = {}
    for p in paths:
        img = Image.open(p).convert("RGB")
        x = v2.functional.pil_to_tensor(img.resize((info.preprocess.input_size,) * 2, Image.BILINEAR))
        x = v2.functional.normalize(x.float()[None] / 255, list(info.preprocess.mean), list(info.preprocess.std))
        with torch.inference_mode():
            logits = model(x)["out"]
        out[str(p)] = F.interpolate(logits, size=(img.height, img.width), mode="bilinear").argmax(1)[0].numpy()
    return out


@pytest.mark.slow
def test_segmentation_trains_infers_evaluates_and_draws(ray_session, tmp_path, capsys):
    import shutil

    from raycv.cli import main
    from raycv.inference.output import read_output

    assert main(["train", *TRAIN, f"run.storage_path={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "done: val mIoU" in out
    summary = json.loads((tmp_path / "seg" / "summary.json").read_text())
    log = [json.loads(ln) for ln in (tmp_path / "seg" / "metrics.jsonl").read_text().splitlines()]
    assert summary["task"] == "segmentation" and summary["checkpoint_metric"] == "val_miou"
    assert [m["epoch"] for m in log] == list(range(1, 11)) and all(m["val_count"] == 120 for m in log)
    best = summary["metrics"]["val_miou"]
    assert best >= MIOU_BAR, f"val mIoU {best:.3f} below the bar {MIOU_BAR}"

    # The validation scenes in a VOC tree of their own (evaluate finds each mask by the layout),
    # plus one corrupt image that must come back as an error row.
    scenes = bundled.scenes_root(600, 0, val_fraction=0.2)
    voc = tmp_path / "voc"
    stems = (scenes / "ImageSets/Segmentation/val.txt").read_text().split()
    for sub, ext in (("JPEGImages", "png"), ("SegmentationClass", "png")):
        (voc / sub).mkdir(parents=True)
        for s in stems:
            shutil.copy(scenes / sub / f"{s}.{ext}", voc / sub / f"{s}.{ext}")
    (voc / "JPEGImages" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    preds = tmp_path / "preds"
    assert main(["infer", "--checkpoint", str(tmp_path / "seg"), "--input", str(voc / "JPEGImages"),
                 "--output", str(preds)]) == 0
    table = read_output(str(preds))
    assert table.num_rows == len(stems) + 1 and table.schema.metadata[b"raycv.task"] == b"segmentation"
    rows = {r["path"]: r for r in table.to_pylist()}
    assert rows[str(voc / "JPEGImages" / "broken.png")]["error"]

    direct = _direct_masks(summary["best_checkpoint"], sorted((voc / "JPEGImages").glob("0*.png")))
    agree = []
    for path, mask in direct.items():
        r = rows[path]
        png = Image.open(__import__("io").BytesIO(r["mask_png"]))
        assert png.mode == "P" and (r["height"], r["width"]) == mask.shape == (64, 64)
        got = np.asarray(png)
        agree.append((got == mask).mean())
        assert r["class_fractions"] == pytest.approx(np.bincount(got.ravel(), minlength=4) / got.size, abs=1e-6)
    assert np.mean(agree) > 0.999  # batched vs one at a time: only ties at class boundaries may differ

    capsys.readouterr()
    assert main(["evaluate", "--predictions", str(preds), "--output", str(tmp_path / "eval")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert report["rows"] == len(stems) + 1 and report["scored"] == len(stems)
    # mIoU of the direct call's masks, computed here from a plain confusion matrix at the original size
    cm = np.zeros((4, 4), np.int64)
    for path, mask in direct.items():
        truth = np.asarray(Image.open(path.replace("/JPEGImages/", "/SegmentationClass/")), dtype=np.int64)
        cm += np.bincount(truth.ravel() * 4 + mask.ravel(), minlength=16).reshape(4, 4)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    assert report["miou"] == pytest.approx((np.diag(cm) / union)[union > 0].mean(), abs=0.005)
    assert report["pixel_accuracy"] == pytest.approx(np.diag(cm).sum() / cm.sum(), abs=0.005)
    # Training validated at the 32-px input size against downsized masks; this is at the original 64 px.
    assert report["miou"] == pytest.approx(best, abs=0.05)
    per_class = json.loads((tmp_path / "eval" / "metrics.json").read_text())["per_class"]
    assert set(per_class) == set(bundled.SCENE_CLASSES) and per_class["background"]["iou"] > 0.9

    # --labels MASK_FOLDER: <id>.png masks from elsewhere (here every pixel background): the pixel
    # accuracy is then the share of pixels the output calls background.
    blank = tmp_path / "blank-masks"
    blank.mkdir()
    for s in stems:
        Image.fromarray(np.zeros((64, 64), np.uint8), mode="L").save(blank / f"{s}.png")
    assert main(["evaluate", "--predictions", str(preds), "--labels", str(blank)]) == 0
    other = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    predicted = np.stack([np.asarray(Image.open(__import__("io").BytesIO(r["mask_png"]))) for r in rows.values()
                          if r["error"] is None])
    assert other["scored"] == len(stems) and other["pixel_accuracy"] == pytest.approx((predicted == 0).mean(), abs=1e-6)  # float32 sums

    assert main(["draw", "--predictions", str(preds), "--output", str(tmp_path / "drawn"), "--limit", "3"]) == 0
    drawn = sorted((tmp_path / "drawn").glob("*.png"))
    assert len(drawn) == 3
    first = np.asarray(Image.open(drawn[0]).convert("RGB"))
    plain = np.asarray(Image.open(voc / "JPEGImages" / f"{stems[0]}.png").convert("RGB"))
    assert first.shape == (256, 256, 3)  # enlarged 4x to be legible
    assert np.abs(first[20:].astype(int) - plain.repeat(4, 0).repeat(4, 1)[20:]).mean() > 5  # the overlay is there


def test_parquet_segmentation_source_reads_images_and_masks(ray_session, tmp_path):
    """Parquet with image bytes, PNG mask bytes and a path (train/ and val/), as a user would write
    it with pyarrow: the rows decode to the same masks as the files they came from."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raycv.config import load_config
    from raycv.data import build_dataset

    scenes = bundled.scenes_root(40, seed=2)
    for split in ("train", "val"):
        stems = (scenes / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()
        (tmp_path / "pq" / split).mkdir(parents=True)
        pq.write_table(pa.table({
            "path": [f"scene-{s}" for s in stems],
            "image": [(scenes / "JPEGImages" / f"{s}.png").read_bytes() for s in stems],
            "mask": [(scenes / "SegmentationClass" / f"{s}.png").read_bytes() for s in stems]}),
            tmp_path / "pq" / split / "part-0.parquet", row_group_size=8)
    cfg = load_config("train", None, ["data.name=parquet_segmentation", f"data.root={tmp_path / 'pq'}",
                                      "data.classes=[background,circle,square,triangle]"]).data
    splits = build_dataset(cfg)
    assert (splits.num_train, splits.num_val) == (32, 8) and splits.classes[0] == "background"
    rows = sorted(splits.val.take_all(), key=lambda r: r["path"])
    assert [r["path"] for r in rows] == [f"scene-{i:06d}" for i in range(8)]
    out = decode_pairs({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]},
                       preset=SegmentationEvalPreset(input_size=64))
    for i, mask in enumerate(out["mask"]):
        assert np.array_equal(mask, np.asarray(Image.open(scenes / "SegmentationClass" / f"{i:06d}.png")))

    with pytest.raises(UserError, match="needs class names"):
        build_dataset(cfg.model_copy(update={"classes": None}))
    with pytest.raises(UserError, match="has no column 'masks'"):
        build_dataset(cfg.model_copy(update={"mask_column": "masks"}))
