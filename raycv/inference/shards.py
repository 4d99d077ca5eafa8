"""Deterministic input shards, listed and read in Ray tasks, and output parts committed per shard.

The driver lists only the top level of an input (or the Parquet footers) and cuts it into *units*:
a group of top-level folders, a run of top-level files, one Parquet row group. A Ray task expands
each unit into its inputs (listing the folders, reading the row group), cuts them, in sorted order,
into *shards* of `infer.rows_per_file` inputs, and records each shard's row count and the digest
of its ids in `_shards/plan-<unit>.json` before the first row leaves the task. A shard's id is the
unit's key (a hash of what the unit names) and its index, so the same input gives the same shards.

Predictions reach `ShardSink`, whose write tasks write each shard's rows of a bundle as one part
file in `_shards/`, then its sidecar (rows, error rows, digest of the ids): the sidecar is the
commit. A part without one is debris. A shard is complete when its committed parts' rows and
digests add up to its plan's. A killed run leaves its committed parts; the next run with
`infer.mode=resume` reuses them (a complete shard is skipped without reading it; a partial one
has its committed ids read back, bounded by the shard's size, and only the rest is predicted).

Digest: the sum, modulo 2^64, of a 64-bit BLAKE2b hash of each id: order-independent, so a part
written in any order, or a shard split over several parts, adds up to its input's digest.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raycv.data.io import IMAGE_EXTENSIONS, list_files, resolve

SHARDS = "_shards"
MASK = (1 << 64) - 1
DIRS_PER_UNIT = 16  # top-level folders listed by one task
EMIT_ROWS = 1024  # rows per batch a unit task yields, and at most per block downstream (source._in_blocks_of)


def key(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def digest(ids) -> int:
    total = 0
    for i in ids:
        total += int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little")
    return total & MASK


def shard_id(unit_key: str, index: int) -> str:
    return f"{unit_key}-{index:06d}"


def part_name(sid: str, run_id: str) -> str:
    return f"part-{sid}-{run_id}-{uuid.uuid4().hex[:8]}.parquet"


def _write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(obj).encode())


# ------------------------------------------------------------------------------------------------
# The driver's side: units from the top level of the input
# ------------------------------------------------------------------------------------------------


def folder_units(root: str, rows_per_shard: int) -> list[dict]:
    """Units of a folder input from one listing of its top level: top-level image files in runs of
    `rows_per_shard`, top-level folders in groups of DIRS_PER_UNIT (listed recursively by the task).
    Hidden and `_` names are skipped, and locally symlinked folders are not followed (as `list_files`)."""
    fs, base = resolve(root)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        return [{"kind": "files", "key": key("files:" + root), "items": [root]}]
    files, dirs = [], []
    scheme = root.split("://", 1)[0] + "://" if "://" in root and "://" not in base else ""
    for f in sorted(fs.get_file_info(pafs.FileSelector(base)), key=lambda f: f.path):
        name = f.path.rsplit("/", 1)[-1]
        if name.startswith((".", "_")):
            continue
        full = scheme + f.path
        if f.type == pafs.FileType.Directory:
            if isinstance(fs, pafs.LocalFileSystem):
                import os

                if os.path.islink(f.path):
                    continue
            dirs.append(full)
        elif f.type == pafs.FileType.File and name.lower().endswith(IMAGE_EXTENSIONS):
            files.append(full)
    units = [{"kind": "files", "key": key("files:" + files[i]), "items": files[i:i + rows_per_shard]}
             for i in range(0, len(files), rows_per_shard)]
    units += [{"kind": "dirs", "key": key("dirs:" + dirs[i]), "items": dirs[i:i + DIRS_PER_UNIT]}
              for i in range(0, len(dirs), DIRS_PER_UNIT)]
    return units


def parquet_units(files: list[str]) -> list[dict]:
    """One unit (and one shard) per non-empty row group, from the footers."""
    units = []
    for f in files:
        fs, p = resolve(f)
        with fs.open_input_file(p) as fh:
            meta = pq.ParquetFile(fh).metadata
        units += [{"kind": "parquet", "key": key(f"parquet:{f}:{g}"), "items": [f], "row_group": g}
                  for g in range(meta.num_row_groups) if meta.row_group(g).num_rows]
    return units


# ------------------------------------------------------------------------------------------------
# Committed parts: what a resumed run may reuse
# ------------------------------------------------------------------------------------------------


def committed_parts(fs: pafs.FileSystem, out_path: str, published: dict | None) -> dict[str, list[dict]]:
    """{shard id: [part, ...]}: the parts a published manifest lists per shard, and those of an
    unpublished run that have their sidecar in `_shards/`. A part is {"name", "where", "rows",
    "errors", "digest"}, `where` being "" (published) or "_shards"."""
    parts: dict[str, list[dict]] = {}
    for sid, entry in (published or {}).items():
        parts[sid] = [{**p, "where": ""} for p in entry["files"]]
    shards_dir = f"{out_path}/{SHARDS}"
    if fs.get_file_info(shards_dir).type != pafs.FileType.Directory:
        return parts
    for f in fs.get_file_info(pafs.FileSelector(shards_dir)):
        name = f.path.rsplit("/", 1)[-1]
        if not (name.startswith("part-") and name.endswith(".json")):
            continue
        try:
            with fs.open_input_stream(f.path) as fh:
                side = json.loads(fh.read().decode())
            p = {k: side[k] for k in ("name", "rows", "errors", "digest")}
            sid = side["shard"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            continue  # a torn sidecar commits nothing
        if p["name"] == name[:-5] + ".parquet":
            parts.setdefault(sid, []).append({**p, "where": SHARDS})
    return parts


# ------------------------------------------------------------------------------------------------
# The task's side: a unit into shards and rows
# ------------------------------------------------------------------------------------------------


def _read_ids(fs: pafs.FileSystem, out_path: str, parts: list[dict]) -> list[str]:
    ids: list[str] = []
    for p in parts:
        where = f"{out_path}/{p['where']}/{p['name']}" if p["where"] else f"{out_path}/{p['name']}"
        with fs.open_input_file(where) as f:
            ids += pq.read_table(f, columns=["path"]).column("path").to_pylist()
    return ids


def _plan_shard(ids: list[str], prior: list[dict], fs, out_path: str) -> tuple[dict, np.ndarray | None]:
    """(the shard's plan entry, mask of its ids still to predict; None: all of them)."""
    rows, dig = len(ids), digest(ids)
    entry = {"rows": rows, "digest": str(dig), "reuse": []}
    if not prior:
        return entry, None
    if sum(p["rows"] for p in prior) == rows and sum(int(p["digest"]) for p in prior) & MASK == dig:
        entry["reuse"] = prior  # complete: skipped without reading it
        return entry, np.zeros(rows, dtype=bool)
    try:
        done = _read_ids(fs, out_path, prior)
    except OSError:
        return entry, None
    wanted = set(ids)
    if len(done) != len(set(done)) or not set(done) <= wanted:
        return entry, None  # parts of another input (it changed since) or doubled: predict the shard again
    entry["reuse"] = prior
    done_set = set(done)
    return entry, np.fromiter((i not in done_set for i in ids), dtype=bool, count=rows)


def expand_unit(batch: dict[str, np.ndarray], *, out_uri: str, rows_per_shard: int, path_column: str,
                image_column: str | None, counter=None) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map_batches fn (batch_size=1, one unit per call): list or read the unit, plan its
    shards (written to `_shards/plan-<key>.json` before any row is yielded), and yield the rows
    still to predict: `path`, `shard`, and `bytes` for a Parquet input that holds them, or for a
    manifest whose paths are relative, `uri`: each path joined to the manifest file's folder (the
    decode tasks do not run in the user's working directory; the id stays as the manifest wrote it)."""
    unit = json.loads(str(batch["unit"][0]))
    prior: dict[str, list[dict]] = json.loads(str(batch["prior"][0]))
    fs, out_path = resolve(out_uri)
    data, uris = None, None
    if unit["kind"] == "files":
        ids = list(unit["items"])
    elif unit["kind"] == "dirs":
        ids = [p for d in unit["items"] for p in list_files(d, IMAGE_EXTENSIONS)]
    else:  # one Parquet row group
        src_fs, src = resolve(unit["items"][0])
        with src_fs.open_input_file(src) as f:
            cols = [path_column] + ([image_column] if image_column else [])
            data = pq.ParquetFile(f).read_row_group(int(unit["row_group"]), columns=cols)
        ids = [str(i) for i in data.column(path_column).to_pylist()]
        if not image_column and not all(_absolute(i) for i in ids):
            base = unit["items"][0].rsplit("/", 1)[0]
            uris = [i if _absolute(i) else f"{base}/{i}" for i in ids]
    plan, todo = {}, []
    for index, start in enumerate(range(0, len(ids), rows_per_shard)):
        sid = shard_id(unit["key"], index)
        chunk = ids[start:start + rows_per_shard]
        entry, mask = _plan_shard(chunk, prior.get(sid, []), fs, out_path)
        plan[sid] = entry
        todo.append((sid, start, chunk, mask))
    _write_json(fs, f"{out_path}/{SHARDS}/plan-{unit['key']}.json", {"unit": unit["key"], "shards": plan})
    if counter is not None:
        counter.add_total.remote(sum(len(c) if m is None else int(m.sum()) for _, _, c, m in todo), 1)
    for sid, start, chunk, mask in todo:
        index = np.arange(start, start + len(chunk)) if mask is None else start + np.flatnonzero(mask)
        for i in range(0, len(index), EMIT_ROWS):
            take = index[i:i + EMIT_ROWS]
            out = {"path": np.asarray([ids[j] for j in take], dtype=object),
                   "shard": np.asarray([sid] * len(take), dtype=object)}
            if data is not None and image_column:
                out["bytes"] = data.column(image_column).take(pa.array(take)).to_numpy(zero_copy_only=False)
            elif uris is not None:
                out["uri"] = np.asarray([uris[j] for j in take], dtype=object)
            yield out


def _absolute(path: str) -> bool:
    """A URI (`s3://...`, `file://...`) or an absolute local path."""
    return "://" in path or path.startswith("/")


def plan_rows(rows: list[dict], spec: str, rows_per_shard: int, prior: dict[str, list[dict]], fs,
              out_path: str) -> tuple[list[dict], str]:
    """A registry input's rows (small: they were taken into the driver) planned as expand_unit
    plans a unit: (rows to predict, with `shard`; the unit's key)."""
    ids = [str(r["path"]) for r in rows]
    k = key("rows:" + spec)
    plan, todo = {}, []
    for index, start in enumerate(range(0, len(rows), rows_per_shard)):
        sid = shard_id(k, index)
        entry, mask = _plan_shard(ids[start:start + rows_per_shard], prior.get(sid, []), fs, out_path)
        plan[sid] = entry
        for j, r in enumerate(rows[start:start + rows_per_shard]):
            if mask is None or mask[j]:
                todo.append({**r, "shard": sid})
    _write_json(fs, f"{out_path}/{SHARDS}/plan-{k}.json", {"unit": k, "shards": plan})
    return todo, k


# ------------------------------------------------------------------------------------------------
# The sink: one part per shard per write task, then its sidecar
# ------------------------------------------------------------------------------------------------


def _datasink_base():
    from ray.data import Datasink

    return Datasink


class ShardSink(_datasink_base()):
    """Writes each write task's rows as one part file per shard in `<output>/_shards/`, each
    followed by its sidecar. Returns the parts' summaries to the driver."""

    def __init__(self, out_uri: str, run_id: str, schema: pa.Schema, rows_per_write: int):
        self.out_uri, self.run_id, self.schema, self.rows_per_write = out_uri, run_id, schema, rows_per_write
        self.written: list[dict] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_write

    def get_name(self) -> str:
        return "RaycvShards"

    def on_write_start(self, schema=None) -> None:
        self.written: list[dict] = []

    def on_write_complete(self, write_result) -> None:
        """In the driver: every write task's part summaries (one per part, never the ids)."""
        self.written = [side for task in write_result.write_returns for side in (task or [])]

    def write(self, blocks, ctx) -> list[dict]:
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables)
        fs, out_path = resolve(self.out_uri)
        shards = np.asarray(table.column("shard").to_pylist(), dtype=object)
        body = table.drop_columns(["shard"]).cast(self.schema)
        written = []
        for sid in sorted(set(shards.tolist())):
            part = body.take(pa.array(np.flatnonzero(shards == sid)))
            name = part_name(sid, self.run_id)
            path = f"{out_path}/{SHARDS}/{name}"
            with fs.open_output_stream(path) as f:
                pq.write_table(part, f)
            ids = part.column("path").to_pylist()
            side = {"shard": sid, "name": name, "rows": part.num_rows,
                    "errors": part.num_rows - part.column("error").null_count, "digest": str(digest(ids))}
            _write_json(fs, path[:-len(".parquet")] + ".json", side)
            written.append(side)
        return written
