import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycv.config import DataSection
from raycv.data import build_dataset
from raycv.data.decode import decode_batch, open_rgb
from raycv.data.presets import ClassificationEvalPreset
from raycv.data.sources import load_cifar_batch, stratified_split
from raycv.errors import UserError
from raycv.training.driver import decoded

PRESET = ClassificationEvalPreset(input_size=16, resize_size=16)


def _decode_all(ds):
    rows = decoded(ds, PRESET, num_cpus=0.5, cache=False).take_all()
    return np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows])


def test_digits_real_files_seeded_split(ray_session, raycv_cache):
    a = build_dataset(DataSection(name="digits"))
    b = build_dataset(DataSection(name="digits"))
    assert a.num_train + a.num_val == 1797 and a.classes == [str(i) for i in range(10)]
    assert sorted(r["path"] for r in a.val.take_all()) == sorted(r["path"] for r in b.val.take_all())
    pngs = list((raycv_cache / "digits-v1").rglob("*.png"))
    assert len(pngs) == 1797 and Image.open(pngs[0]).size == (8, 8)
    images, labels = _decode_all(a.val)
    assert images.shape == (a.num_val, 3, 16, 16) and images.dtype == np.uint8
    assert set(labels) == set(range(10))


def test_shapes_are_reproducible_from_a_seed(ray_session, tmp_path, monkeypatch):
    """The same seed generates the same files into a fresh cache (not the same cache read twice), and
    the same seed splits them the same way; another seed gives other images."""
    from raycv.data import bundled
    from raycv.data.io import sha256_file

    def generated(cache: Path, seed: int) -> dict[str, str]:
        monkeypatch.setenv("RAYCV_CACHE", str(cache))
        root = bundled.shapes_root(60, seed)
        return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*.png"))}

    first, fresh, other = generated(tmp_path / "a", 3), generated(tmp_path / "b", 3), generated(tmp_path / "c", 4)
    assert len(first) == 60 and first == fresh and set(first.values()) != set(other.values())
    monkeypatch.setenv("RAYCV_CACHE", str(tmp_path / "b"))
    cfg = DataSection(name="shapes", num_samples=60, seed=3)
    a = build_dataset(cfg)
    assert a.classes == ["circle", "square", "triangle"] and a.num_train + a.num_val == 60
    val = sorted(str(Path(r["path"]).relative_to(tmp_path / "b")) for r in a.val.take_all())
    monkeypatch.setenv("RAYCV_CACHE", str(tmp_path / "a"))
    assert val == sorted(str(Path(r["path"]).relative_to(tmp_path / "a")) for r in build_dataset(cfg).val.take_all())


def test_image_folder_with_train_and_val(ray_session, image_tree):
    s = build_dataset(DataSection(name="image_folder", root=str(image_tree)))
    assert s.classes == ["cat", "dog"] and (s.num_train, s.num_val) == (24, 8)
    images, labels = _decode_all(s.val)
    # cats are red, dogs blue: the label follows the folder
    red = images[:, 0].mean(axis=(1, 2)) > images[:, 2].mean(axis=(1, 2))
    assert np.array_equal(red, labels == 0)


def test_image_folder_split_by_fraction(ray_session, image_tree):
    s = build_dataset(DataSection(name="image_folder", root=str(image_tree / "train"), val_fraction=0.25))
    assert (s.num_train, s.num_val) == (18, 6)
    train_paths = {r["path"] for r in s.train.take_all()}
    val_paths = {r["path"] for r in s.val.take_all()}
    assert not train_paths & val_paths and len(train_paths | val_paths) == 24


def test_image_folder_missing_root():
    with pytest.raises(UserError, match="data.root does not exist: /nonexistent/images"):
        build_dataset(DataSection(name="image_folder", root="/nonexistent/images"))
    with pytest.raises(UserError, match="needs data.root"):
        build_dataset(DataSection(name="image_folder"))


def _cifar_fixture(root, per_batch=20):
    """The real cifar-10-batches-py layout and pickle format (dicts of bytes keys, uint8 rows)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f, protocol=2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        data = np.zeros((per_batch, 3072), dtype=np.uint8)
        data[:, :1024] = np.array(labels, dtype=np.uint8)[:, None] * 20  # red plane encodes the label
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}, f, protocol=2)
    return root


def test_cifar10_python_batches(ray_session, tmp_path):
    root = _cifar_fixture(tmp_path / "cifar-10-batches-py")
    s = build_dataset(DataSection(name="cifar10", root=str(root)))
    assert s.classes[0] == "airplane" and (s.num_train, s.num_val) == (100, 20)
    rows = decoded(s.val, ClassificationEvalPreset(input_size=32, resize_size=32), num_cpus=0.5, cache=False).take_all()
    assert len(rows) == 20
    for r in rows:  # pixel layout: CHW rows -> HWC image -> CHW tensor, red plane = 20 * label
        assert r["image"].shape == (3, 32, 32) and int(r["image"][0, 5, 5]) == 20 * r["label"]


def test_cifar_loader_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with pytest.raises(UserError, match="refusing to load builtins.print"):
        load_cifar_batch(pickle.dumps({b"data": Evil()}))


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("string_labels", [False, True])
def test_parquet_source(ray_session, tmp_path, string_labels):
    for split, n in (("train", 10), ("val", 4)):
        labels = [i % 2 for i in range(n)]
        table = pa.table({"image": [_png((250, 0, 0) if y == 0 else (0, 0, 250)) for y in labels],
                          "label": [["red", "blue"][y] for y in labels] if string_labels else labels,
                          "path": [f"{split}/{i}" for i in range(n)]})
        (tmp_path / "pq" / split).mkdir(parents=True)
        pq.write_table(table, tmp_path / "pq" / split / "part-0.parquet")
    s = build_dataset(DataSection(name="parquet", root=str(tmp_path / "pq")))
    assert (s.num_train, s.num_val) == (10, 4)
    images, labels = _decode_all(s.val)
    red_index = s.classes.index("red") if string_labels else 0
    red = images[:, 0].mean(axis=(1, 2)) > 128
    assert np.array_equal(red, labels == red_index)


def test_parquet_missing_column(ray_session, tmp_path):
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"img": [_png((1, 2, 3))], "label": [0]}), tmp_path / "p" / "a.parquet")
    with pytest.raises(UserError, match="has no column 'image'"):
        build_dataset(DataSection(name="parquet", root=str(tmp_path / "p")))


def test_stratified_split_is_seeded_and_disjoint():
    items = [(f"{c}/{i}", c) for c in range(3) for i in range(10)]
    a = stratified_split(items, 0.2, 1)
    assert a == stratified_split(items, 0.2, 1) and a != stratified_split(items, 0.2, 2)
    assert sorted(a[0] + a[1]) == sorted(items) and len(a[1]) == 6


# ---- decoding every kind of image --------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"),
                                       ("I;16", "PNG"), ("RGB", "WEBP"), ("RGB", "BMP"), ("RGB", "TIFF"),
                                       ("P", "GIF"), ("LA", "PNG"), ("1", "PNG")])
def test_every_mode_becomes_rgb(mode, fmt):
    if mode == "I;16":
        img = Image.fromarray(np.full((10, 12), 65535 // 2, dtype=np.uint16))
    else:
        img = Image.new("RGB", (12, 10), (120, 60, 30)).convert(mode)
    out = open_rgb(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (12, 10)
    if mode == "I;16":
        assert abs(np.asarray(out)[0, 0, 0] - 127) <= 1


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = open_rgb(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 30)


@pytest.mark.parametrize("data, why", [(b"", "empty file"), (b"hello, not an image", "not a decodable image"),
                                       (None, "not a decodable image")])
def test_bad_bytes_give_error_rows(data, why):
    good = _encode(Image.new("RGB", (8, 8)), "PNG")
    bad = data if data is not None else good[: len(good) // 2]  # truncated PNG
    batch = {"path": np.array(["a.png", "b.png"], dtype=object), "bytes": np.array([good, bad], dtype=object)}
    out = decode_batch(batch, geometry=PRESET.geometry, shape=PRESET.shape, errors="row", keep=())
    assert out["error"][0] is None and why in out["error"][1]
    assert out["image"].shape == (2, 3, 16, 16)
    with pytest.raises(UserError, match="cannot decode b.png"):
        decode_batch(batch, geometry=PRESET.geometry, shape=PRESET.shape, errors="raise")


def test_decompression_bomb_is_an_error_not_an_oom(tmp_path):
    """A small file that claims 72 megapixels: refused from its header, before any pixel is decoded."""
    from raycv.data.decode import MAX_IMAGE_PIXELS

    Image.new("1", (9000, 8000)).save(tmp_path / "bomb.png")  # 1-bit: a few MB to make, ~10 KB on disk
    data = (tmp_path / "bomb.png").read_bytes()
    assert len(data) < 200_000 and 9000 * 8000 > MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="image too large"):
        open_rgb(data)
    batch = {"path": np.array(["bomb.png"], dtype=object), "bytes": np.array([data], dtype=object)}
    out = decode_batch(batch, geometry=PRESET.geometry, shape=PRESET.shape, errors="row", keep=())
    assert "image too large" in out["error"][0]


def test_tiny_images_decode():
    out = open_rgb(_encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    assert out.size == (1, 1) and PRESET.geometry(out).shape == (3, 16, 16)


def test_listing_does_not_follow_symlinked_folders(tmp_path):
    """As `find` does by default: a link to a folder outside the root and a loop back into it add
    nothing (a loop used to multiply the entries exponentially); a symlinked file is listed once."""
    from raycv.data.io import list_files

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "x.png").write_bytes(b"x")
    (outside / "secret.png").write_bytes(b"s")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    (root / "a" / "loop2").symlink_to(root / "a", target_is_directory=True)
    (root / "linked.png").symlink_to(outside / "secret.png")
    assert list_files(str(root)) == [str(root / "a" / "x.png"), str(root / "linked.png")]


def _hugging_face_parquet(root, names: list[str]) -> dict[str, int]:
    """The digits as `datasets` exports an image classification set: data/{train,test}-0000K-of-0000N.parquet,
    an `image` struct<bytes, path> (the Image feature), a `label` int64 (a ClassLabel, its names in
    the schema's `huggingface` metadata). -> rows per split."""
    import json as _json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raycv.data.bundled import digits_root

    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={"huggingface": _json.dumps({"info": {"features": features}})})
    (root / "data").mkdir(parents=True)
    files = sorted(digits_root().glob("*/*.png"))[::6]  # every sixth: all ten digits, 300 images
    counts = {}
    for split, part in (("train", [f for i, f in enumerate(files) if i % 5]), ("test", files[::5])):
        halves = [part[: len(part) // 2], part[len(part) // 2:]] if split == "train" else [part]
        for k, chunk in enumerate(halves):
            rows = {"image": [{"bytes": f.read_bytes(), "path": f.name} for f in chunk],
                    "label": [int(f.parent.name) for f in chunk]}
            pq.write_table(pa.table(rows, schema=schema), root / "data" / f"{split}-{k:05d}-of-{len(halves):05d}.parquet")
        counts[split] = len(part)
    return counts


@pytest.mark.slow
def test_a_hugging_face_parquet_export_trains_with_its_class_names(ray_session, tmp_path):
    import raycv
    from raycv.config import load_config
    from raycv.data import build_dataset

    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    counts = _hugging_face_parquet(tmp_path / "hf", names)
    cfg = load_config("train", None, ["data.name=parquet", f"data.root={tmp_path / 'hf'}"])
    splits = build_dataset(cfg.data)
    assert splits.classes == names and (splits.num_train, splits.num_val) == (counts["train"], counts["test"])
    row = splits.val.take(1)[0]
    assert row["path"].endswith(".png") and row["bytes"][:4] == b"\x89PNG" and 0 <= row["label"] < 10
    s = raycv.train(overrides={"data.name": "parquet", "data.root": str(tmp_path / "hf"), "train.epochs": 1,
                               "scaling.num_workers": 1, "run.storage_path": str(tmp_path), "run.name": "hf"})
    assert s.epochs == 1 and s.val_accuracy > 0.2  # 10 classes: chance is 0.1
    assert raycv.load(tmp_path / "hf").classes == names


def test_webdataset_shards_read_as_samples_with_their_labels(ray_session, tmp_path):
    import tarfile

    from helpers.shards import write_digit_shards

    counts = write_digit_shards(tmp_path / "wds")
    assert len(list((tmp_path / "wds").glob("train-*.tar"))) == 2
    cfg = DataSection(name="webdataset", root=str(tmp_path / "wds"))
    splits = build_dataset(cfg)
    assert splits.classes == [str(i) for i in range(10)] and (splits.num_train, splits.num_val) == (counts["train"], counts["val"])
    rows = splits.val.take_all()
    assert len(rows) == counts["val"] and len({r["path"] for r in rows}) == counts["val"]
    for r in rows:  # <shard>#<key>, the key naming the digit the label says
        shard, key = r["path"].split("#")
        assert shard.endswith("val-000000.tar") and key.split("_")[0] == str(r["label"]) and r["bytes"][:4] == b"\x89PNG"
    # a sample without its label, and a label that is not a number: one line naming the shard
    with tarfile.open(tmp_path / "wds" / "val-000000.tar", "a") as tar:
        info = tarfile.TarInfo("orphan.png")
        info.size = 3
        tar.addfile(info, __import__("io").BytesIO(b"abc"))
    with pytest.raises(UserError, match=r"val-000000.tar: sample 'orphan' has an image but no .cls label"):
        build_dataset(cfg)
    (tmp_path / "wds" / "val-000000.tar").unlink()
    with pytest.raises(UserError, match="WebDataset needs train and val shards .* found 2 and 0"):
        build_dataset(cfg)


def _digits_datasetdict(names: list[str]):
    """300 bundled digits as a Hugging Face DatasetDict: train (240) and test (60), an Image column
    and a ClassLabel with `names`."""
    datasets = pytest.importorskip("datasets")
    from raycv.data.bundled import digits_root

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    files = sorted(digits_root().glob("*/*.png"))[::6]

    def split(chosen):
        return datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": f.name} for f in chosen],
                                           "label": [int(f.parent.name) for f in chosen]}, features=features)

    return datasets.DatasetDict({"train": split([f for i, f in enumerate(files) if i % 5]), "test": split(files[::5])})


def test_a_saved_hugging_face_datasetdict_reads_from_its_arrow_files(ray_session, tmp_path):
    names = [f"digit {i}" for i in range(10)]
    dd = _digits_datasetdict(names)
    dd.save_to_disk(str(tmp_path / "saved"), num_shards={"train": 3, "test": 2})  # several Arrow files per split
    assert len(list((tmp_path / "saved" / "train").glob("*.arrow"))) > 1
    splits = build_dataset(DataSection(name="huggingface", root=str(tmp_path / "saved")))
    assert splits.classes == names and (splits.num_train, splits.num_val) == (len(dd["train"]), len(dd["test"]))
    rows = splits.val.take_all()
    assert [r["label"] for r in rows] == dd["test"]["label"]
    undecoded = dd["test"].cast_column("image", __import__("datasets").Image(decode=False))["image"]
    assert [r["path"] for r in rows] == [v["path"] for v in undecoded]
    assert all(r["bytes"][:4] == b"\x89PNG" for r in rows)
    # a Parquet export under the same name reads through the parquet source
    _hugging_face_parquet(tmp_path / "export", names)
    assert build_dataset(DataSection(name="huggingface", root=str(tmp_path / "export"))).classes == names
    # mistakes: one line each
    (tmp_path / "saved" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(UserError, match="needs a 'train' split and one of validation, valid, val, test; it has train$"):
        build_dataset(DataSection(name="huggingface", root=str(tmp_path / "saved")))
    (tmp_path / "saved" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(UserError, match="has no column 'img'"):
        build_dataset(DataSection(name="huggingface", root=str(tmp_path / "saved"), image_column="img"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="neither a saved DatasetDict .* nor a Parquet export"):
        build_dataset(DataSection(name="huggingface", root=str(tmp_path / "plain")))


@pytest.mark.slow
def test_a_saved_hugging_face_datasetdict_trains(ray_session, tmp_path):
    import raycv

    names = [f"digit {i}" for i in range(10)]
    _digits_datasetdict(names).save_to_disk(str(tmp_path / "saved"))
    s = raycv.train(overrides={"data.name": "huggingface", "data.root": str(tmp_path / "saved"), "train.epochs": 1,
                               "scaling.num_workers": 1, "run.storage_path": str(tmp_path), "run.name": "saved"})
    assert s.epochs == 1 and s.val_accuracy > 0.2  # 10 classes: chance is 0.1
    assert raycv.load(tmp_path / "saved").classes == names


@pytest.mark.slow
def test_a_hugging_face_datasetdict_trains_through_the_python_api(ray_session, tmp_path):
    import raycv

    names = [f"digit {i}" for i in range(10)]
    dd = _digits_datasetdict(names)
    s = raycv.train(overrides={"train.epochs": 1, "scaling.num_workers": 1, "run.storage_path": str(tmp_path),
                               "run.name": "hf-objects"}, data=dd)
    assert s.epochs == 1 and s.val_accuracy > 0.2  # 10 classes: chance is 0.1
    assert raycv.load(tmp_path / "hf-objects").classes == names
    log = [__import__("json").loads(ln) for ln in (tmp_path / "hf-objects" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["val_count"] == len(dd["test"]) and log[0]["train_images"] == len(dd["train"])
    with pytest.raises(UserError, match="data= needs a 'train' split and one of validation, valid, val, test; it has train"):
        raycv.train(overrides={"run.storage_path": str(tmp_path)}, data={"train": dd["train"]})


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decode_geometry_equals_torchvision_pixel_for_pixel(mode):
    """The decode tasks' PIL-only geometry (raycv/data/geometry.py) against the torchvision v2
    transforms it stands for, over odd, tall, wide, small-than-the-crop and already-sized images."""
    import torch
    from torchvision.transforms import v2

    from raycv.data.geometry import Letterbox, ResizeCenterCrop, Square

    rng = np.random.default_rng(0)
    sizes = [(37, 53), (53, 37), (64, 64), (10, 7), (7, 10), (200, 31), (73, 73), (40, 56), (56, 40), (1, 5)]
    for w, h in sizes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        for resize, crop in [(36, 32), (32, 32), (64, 56), (20, 24), (73, 73)]:
            want = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop), v2.PILToTensor()])(img)
            got = ResizeCenterCrop(resize, crop)(img)
            assert got.dtype == np.uint8 and np.array_equal(got, want.numpy()), (mode, w, h, resize, crop)
        for side in (32, 45):
            square = v2.Resize((side, side), antialias=True)
            nearest = v2.Resize((side, side), interpolation=v2.InterpolationMode.NEAREST)
            if mode == "RGB":
                assert np.array_equal(Square(side)(img), v2.functional.pil_to_tensor(square(img)).numpy())
                h2, w2 = (side, max(1, min(side, round(w * side / h)))) if h >= w else (max(1, min(side, round(h * side / w))), side)
                box = torch.nn.functional.pad(v2.functional.pil_to_tensor(img.resize((w2, h2), resample=2)),
                                              (0, side - w2, 0, side - h2))
                assert np.array_equal(Letterbox(side)(img), box.numpy()), (w, h, side)
            else:  # a class mask
                assert np.array_equal(Square(side, nearest=True)(img), v2.functional.pil_to_tensor(nearest(img))[0].numpy())


def test_decode_tasks_import_neither_torch_nor_torchvision():
    """What a decode task unpickles (decode_batch and a preset's `pixels`) pulls in no torch: every
    decode worker would otherwise spend seconds of CPU importing it at start-up."""
    import subprocess
    import sys

    from raycv.data.presets import ClassificationEvalPreset, DetectionEvalPreset, SegmentationEvalPreset

    blobs = [pickle.dumps((decode_batch, p.pixels)) for p in
             (PRESET, SegmentationEvalPreset(input_size=32), DetectionEvalPreset(input_size=32))]
    code = ("import pickle, sys\n"
            f"for b in {blobs!r}:\n"
            "    fn, geometry = pickle.loads(b)\n"
            "    from PIL import Image\n"
            "    assert geometry(Image.new('RGB', (40, 30))).shape[0] == 3\n"
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
