"""Detection labels as other tools write them: YOLO (data.yaml, labels/*.txt normalised) and Pascal
VOC XML, written here from the generated scenes' COCO annotations; both must read back to exactly
those boxes, and a YOLO tree trains, infers and evaluates end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raycv.data import bundled
from raycv.data.detection_formats import voc_detection_items, yolo_items
from raycv.data.detection_sources import coco_items
from raycv.errors import UserError

NUM_SCENES = 60


def _scenes() -> tuple[Path, list[str], dict[str, list[dict]]]:
    root = bundled.scenes_root(NUM_SCENES, 0)
    classes, train = coco_items(str(root), "train")
    _, val = coco_items(str(root), "val")
    return root, classes, {"train": train, "val": val}


def write_yolo(dest: Path) -> dict[str, dict]:
    """images/{train,val}/*.png, labels/{train,val}/*.txt, data.yaml (names as a mapping);
    -> {file name: the COCO item}."""
    root, classes, splits = _scenes()
    items = {}
    for split, rows in splits.items():
        for d in ("images", "labels"):
            (dest / d / split).mkdir(parents=True, exist_ok=True)
        for it in rows:
            name = Path(it["path"]).name
            shutil.copy(it["path"], dest / "images" / split / name)
            items[name] = it
            if not it["labels"]:
                continue  # no label file: an image without objects, as YOLO tools write it
            lines = []
            for k, label in enumerate(it["labels"]):
                x1, y1, x2, y2 = it["boxes"][4 * k:4 * k + 4]
                lines.append(f"{label - 1} {(x1 + x2) / 128!r} {(y1 + y2) / 128!r} {(x2 - x1) / 64!r} {(y2 - y1) / 64!r}")
            (dest / "labels" / split / f"{Path(name).stem}.txt").write_text("\n".join(lines) + "\n")
    names = "\n".join(f"  {i}: {c}" for i, c in enumerate(classes[1:]))
    (dest / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return items


def write_voc(dest: Path) -> dict[str, dict]:
    """Annotations/*.xml (1-based pixel boxes, plus one `difficult` object that must be skipped),
    JPEGImages/, ImageSets/Main/{train,val}.txt, classes.txt."""
    root, classes, splits = _scenes()
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    items = {}
    for split, rows in splits.items():
        stems = []
        for it in rows:
            name = Path(it["path"]).name
            shutil.copy(it["path"], dest / "JPEGImages" / name)
            items[name] = it
            stems.append(Path(name).stem)
            objects = [f"<object><name>{classes[label]}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1:g}</xmin>"
                       f"<ymin>{y1 + 1:g}</ymin><xmax>{x2:g}</xmax><ymax>{y2:g}</ymax></bndbox></object>"
                       for label, (x1, y1, x2, y2) in zip(it["labels"], zip(*[iter(it["boxes"])] * 4))]
            objects.append("<object><name>circle</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
                           "<xmax>9</xmax><ymax>9</ymax></bndbox></object>")
            (dest / "Annotations" / f"{Path(name).stem}.xml").write_text(
                f"<annotation><filename>{name}</filename><size><width>64</width><height>64</height><depth>3</depth>"
                f"</size>{''.join(objects)}</annotation>")
        (dest / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    (dest / "classes.txt").write_text("\n".join(classes) + "\n")
    return items


def _same(read: dict[str, list[dict]], items: dict[str, dict], classes: list[str], expected_classes: list[str]):
    assert classes == expected_classes
    n = 0
    for split_items in read.values():
        for it in split_items:
            want = items[Path(it["path"]).name]
            assert it["labels"] == want["labels"] and it["boxes"] == pytest.approx(want["boxes"], abs=1e-9)
            n += 1
    assert n == NUM_SCENES


def test_yolo_and_voc_read_back_to_the_coco_boxes_they_were_written_from(tmp_path):
    _, classes, splits = _scenes()
    items = write_yolo(tmp_path / "yolo")
    yolo_classes, read = yolo_items(str(tmp_path / "yolo"))
    _same(read, items, yolo_classes, classes)
    assert [len(read[s]) for s in ("train", "val")] == [len(splits["train"]), len(splits["val"])]
    items = write_voc(tmp_path / "voc")
    voc_classes, read = voc_detection_items(str(tmp_path / "voc"), None)
    _same(read, items, voc_classes, classes)


def test_yolo_and_voc_mistakes_are_one_line(tmp_path):
    write_yolo(tmp_path / "y")
    label = next((tmp_path / "y" / "labels" / "train").glob("*.txt"))
    good = label.read_text()
    for text, message in [("0 0.5 0.5 0.2\n", "line 1: expected `cls cx cy w h`, got '0 0.5 0.5 0.2'"),
                          ("7 0.5 0.5 0.2 0.2\n", "line 1: class 7 is outside data.yaml's 0..2")]:
        label.write_text(text)
        with pytest.raises(UserError, match=r"labels/train/.*\.txt " + __import__("re").escape(message)):
            yolo_items(str(tmp_path / "y"))
    label.write_text(good)
    (tmp_path / "y" / "data.yaml").write_text("train: images/train\nval: images/nope\nnames: [a, b, c]\n")
    with pytest.raises(UserError, match=r"data.yaml: .*images/nope does not exist"):
        yolo_items(str(tmp_path / "y"))
    write_voc(tmp_path / "v")
    (tmp_path / "v" / "classes.txt").write_text("background\ncircle\nsquare\n")
    with pytest.raises(UserError, match="objects named triangle are not among the classes"):
        voc_detection_items(str(tmp_path / "v"), None)
    next((tmp_path / "v" / "Annotations").glob("*.xml")).write_text("<annotation><object>")
    with pytest.raises(UserError, match=r"Annotations/.*\.xml is not a VOC annotation \(ParseError"):
        voc_detection_items(str(tmp_path / "v"), None)


@pytest.mark.slow
def test_a_yolo_tree_trains_infers_and_evaluates_against_yolo_and_voc_labels(ray_session, tmp_path):
    import raycv

    write_yolo(tmp_path / "yolo")
    write_voc(tmp_path / "voc")
    s = raycv.train(overrides={"data.name": "yolo", "data.root": str(tmp_path / "yolo"), "data.input_size": 64,
                               "data.batch_size": 16, "model.name": "fcos_small", "train.epochs": 1,
                               "scaling.num_workers": 1, "run.storage_path": str(tmp_path), "run.name": "yolo"})
    assert s.task == "detection" and s.epochs == 1 and "val_map" in s.metrics
    out = raycv.infer(tmp_path / "yolo", tmp_path / "yolo" / "images" / "val", tmp_path / "preds")
    assert out.rows == 12 and out.errors == 0
    found = raycv.evaluate(tmp_path / "preds")  # true boxes found from the images' paths: data.yaml
    voc = raycv.evaluate(tmp_path / "preds", labels=str(tmp_path / "voc"))  # the same boxes as VOC XML
    assert found["scored"] == voc["scored"] == 12 and found["map"] == pytest.approx(voc["map"], abs=1e-9)
    assert json.dumps(found["classes"]) == json.dumps(["background", "circle", "square", "triangle"])
    assert len(pq.read_table(tmp_path / "preds").column("boxes")) == 12
