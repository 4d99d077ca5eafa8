"""Complete, exactly-once Parquet outputs.

An output folder holds part files and `_raycv_manifest.json`, written last: the manifest lists the
files that make up the output, its row counts, and per input shard (`raycv/inference/shards.py`) the
parts that hold it. An output without a manifest is incomplete; a part file the manifest does not
list is never read. While a run works, its parts are committed one by one in `<output>/_shards/`
(readers skip `_` names) and stay there if the run dies; the output is published only after every
shard is complete:

- mode=error: an existing output (published, or a killed run's `_shards/`) is refused.
- mode=overwrite: nothing is reused; at the end the manifest goes first (the output reads as
  incomplete), the new parts move in, the old ones go, and the new manifest is written.
- mode=resume: the shards already committed (published, or in `_shards/` from a killed run) are
  reused; only the rest is predicted, and the manifest is rewritten to list old and new.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raycv.data.io import resolve, with_scheme
from raycv.errors import UserError
from raycv.inference.shards import MASK, SHARDS, committed_parts

MANIFEST = "_raycv_manifest.json"
# The only names raycv writes in an output folder: it reads and deletes nothing else. Parts are
# named after their shard (`part-<shard>-<run>-<n>.parquet`); outputs written before shards have
# `part-<run>-<n>.parquet`, still read (not resumed).
_RUN = r"\d{14}-[0-9a-f]{6}"
PART = re.compile(rf"part-(?:[0-9a-f]{{12}}-\d{{6}}-{_RUN}-[0-9a-f]{{8}}|{_RUN}-\d{{5,}})\.parquet")
SIDECAR = re.compile(rf"part-[0-9a-f]{{12}}-\d{{6}}-{_RUN}-[0-9a-f]{{8}}\.json")
PLAN = re.compile(r"plan-[0-9a-f]{12}\.json")
TMP = re.compile(rf"_tmp-{_RUN}")

# Up to this many rows, the duplicate-id check of a Parquet or registry input reads the ids into
# the driver (~100 MB at most); above it, Ray counts the distinct ids.
LOCAL_ID_CHECK_ROWS = 1_000_000


@dataclass
class Manifest:
    files: list[str] = field(default_factory=list)  # names inside the output folder
    rows: int = 0
    errors: int = 0
    runs: list[dict] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    shards: dict | None = None  # {shard: {"rows", "errors", "digest", "files": [{"name", "rows", "errors", "digest"}]}}

    def to_json(self) -> str:
        return json.dumps({"complete": True, "files": self.files, "rows": self.rows, "errors": self.errors,
                           "runs": self.runs, "metadata": self.metadata, "shards": self.shards}, indent=1)


@dataclass
class Checked:
    """What a run's shards add up to (`OutputLocation.check_shards`)."""
    shards: dict  # the manifest's shard table
    rows: int
    errors: int
    reused: int  # rows of parts committed before this run
    new_rows: int
    new_errors: int


class OutputLocation:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.path = resolve(self.uri)
        self.run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.shards_path = f"{self.path}/{SHARDS}"
        self.created = False  # set by prepare(): this run made the output folder

    def _info(self, p: str) -> pafs.FileInfo:
        return self.fs.get_file_info(p)

    def _list(self, p: str) -> list[pafs.FileInfo]:
        if self._info(p).type != pafs.FileType.Directory:
            return []
        return self.fs.get_file_info(pafs.FileSelector(p))

    def exists(self) -> bool:
        if self._info(self.path).type == pafs.FileType.NotFound:
            return False
        return bool(self.fs.get_file_info(pafs.FileSelector(self.path)))

    def manifest(self) -> Manifest | None:
        """The published manifest, or None. One that raycv did not write (not JSON, a file name that
        is not a part raycv names, such as `../x`) is refused: its names are joined to paths."""
        p = f"{self.path}/{MANIFEST}"
        if self._info(p).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(p) as f:
            raw = f.read()
        where = with_scheme(self.fs, p, self.uri)
        try:
            d = json.loads(raw.decode())
            files, rows, errors, shards = d["files"], d["rows"], d["errors"], d.get("shards")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError):
            raise UserError(f"{where} is not a raycv manifest (unreadable)") from None
        if not (isinstance(files, list) and isinstance(rows, int) and isinstance(errors, int)
                and (shards is None or isinstance(shards, dict))):
            raise UserError(f"{where} is not a raycv manifest (files, rows, errors or shards of the wrong type)")
        bad = [n for n in files if not (isinstance(n, str) and PART.fullmatch(n))]
        if bad:
            raise UserError(f"{where} is not a raycv manifest: it lists {bad[0]!r}, not a part file raycv writes")
        try:
            for entry in (shards or {}).values():
                if not all(p["name"] in files for p in entry["files"]):
                    raise UserError(f"{where} is not a raycv manifest: a shard lists a file the output does not")
                [(int(p["rows"]), int(p["digest"])) for p in entry["files"]]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where} is not a raycv manifest (its shard table is unreadable)") from None
        return Manifest(files=files, rows=rows, errors=errors, runs=d.get("runs", []), metadata=d.get("metadata", {}),
                        shards=shards)

    def check(self, mode: str) -> None:
        """Refuse, touching nothing, an output that `mode` may not write into: an existing one with
        mode=error, and whatever the mode one that holds anything raycv did not write (raycv deletes
        only its own part files, sidecars, plans and `_shards`/`_tmp-<run>` folders)."""
        if not self.exists():
            return
        if mode == "error":
            raise UserError(f"output {self.uri} already exists; pass infer.mode=overwrite to replace it "
                            f"or infer.mode=resume to add the inputs it lacks")
        for f in self.fs.get_file_info(pafs.FileSelector(self.path)):
            name = f.path.rsplit("/", 1)[-1]
            ours = (name == MANIFEST and f.type == pafs.FileType.File) or \
                (PART.fullmatch(name) and f.type == pafs.FileType.File) or \
                (TMP.fullmatch(name) and f.type == pafs.FileType.Directory) or \
                (name == SHARDS and f.type == pafs.FileType.Directory)
            if not ours:
                raise UserError(f"output {self.uri} holds {name!r}, which raycv did not write; "
                                f"nothing was changed: choose a new or empty folder for --output")
        for f in self._list(self.shards_path):
            name = f.path.rsplit("/", 1)[-1]
            if f.type != pafs.FileType.File or not (PART.fullmatch(name) or SIDECAR.fullmatch(name)
                                                    or PLAN.fullmatch(name)):
                raise UserError(f"output {self.uri} holds {SHARDS}/{name!r}, which raycv did not write; "
                                f"nothing was changed: choose a new or empty folder for --output")
        self.manifest()  # a manifest raycv did not write is refused here

    def prepare(self, mode: str) -> tuple[Manifest | None, dict[str, list[dict]]]:
        """Check the mode against what is there, clear debris; return the manifest to build on and
        the committed parts per shard (resume; empty otherwise)."""
        self.created = self._info(self.path).type == pafs.FileType.NotFound
        self.check(mode)
        current = self.manifest() if self.exists() else None
        if mode == "resume" and current is not None and current.shards is None and current.files:
            raise UserError(f"output {self.uri} was written by a raycv without input shards and cannot be "
                            f"resumed; pass infer.mode=overwrite")
        if self.exists():
            self._remove_debris(current)
        try:
            self.fs.create_dir(self.shards_path, recursive=True)
        except OSError as e:
            raise UserError(f"cannot write to output {self.uri}: {str(e).splitlines()[0]}") from None
        if mode != "resume":
            return None, {}
        return current or Manifest(), committed_parts(self.fs, self.path, current.shards if current else None)

    def _remove_debris(self, current: Manifest | None) -> None:
        """A crashed run's temp folders, unlisted part files, and parts in `_shards/` without their
        sidecar (`check` proved every name is raycv's)."""
        keep = set(current.files if current else [])
        for f in self.fs.get_file_info(pafs.FileSelector(self.path)):
            name = f.path.rsplit("/", 1)[-1]
            if TMP.fullmatch(name) and f.type == pafs.FileType.Directory:
                self.fs.delete_dir(f.path)
            elif f.type == pafs.FileType.File and PART.fullmatch(name) and name not in keep:
                self.fs.delete_file(f.path)
        self._remove_uncommitted({f.path.rsplit("/", 1)[-1] for f in self._list(self.shards_path)})

    def _remove_uncommitted(self, names: set[str]) -> None:
        """Parts in `_shards/` without their sidecar: a write cut short."""
        for name in names:
            if PART.fullmatch(name) and name[:-len(".parquet")] + ".json" not in names:
                self.fs.delete_file(f"{self.shards_path}/{name}")

    def check_shards(self, unit_keys: list[str], written: list[dict]) -> Checked:
        """Every unit's plan is there, and every planned shard's reused and newly written parts add
        up to its rows and digest; the driver holds one summary per part, never the ids."""
        new: dict[str, list[dict]] = {}
        for w in written:
            new.setdefault(w["shard"], []).append({k: w[k] for k in ("name", "rows", "errors", "digest")})
        table, rows = {}, 0
        errors = reused = new_rows = new_errors = 0
        for k in unit_keys:
            p = f"{self.shards_path}/plan-{k}.json"
            try:
                with self.fs.open_input_stream(p) as f:
                    plan = json.loads(f.read().decode())["shards"]
            except (OSError, ValueError, KeyError) as e:
                raise UserError(f"the inputs of unit {k} were never listed ({str(e).splitlines()[0]}); "
                                f"nothing was published") from None
            for sid, entry in plan.items():
                parts = [{k2: p2[k2] for k2 in ("name", "rows", "errors", "digest")} | {"where": p2.get("where", "")}
                         for p2 in entry["reuse"]] + [p2 | {"where": SHARDS} for p2 in new.pop(sid, [])]
                got = sum(p2["rows"] for p2 in parts)
                dig = sum(int(p2["digest"]) for p2 in parts) & MASK
                if got != entry["rows"] or dig != int(entry["digest"]):
                    raise UserError(f"shard {sid} holds {got} rows for its {entry['rows']} inputs"
                                    + ("" if got != entry["rows"] else " (other ids)")
                                    + ", so the output would not hold every input exactly once; nothing was published")
                e = sum(p2["errors"] for p2 in parts)
                table[sid] = {"rows": got, "errors": e, "digest": entry["digest"], "files": parts}
                rows, errors = rows + got, errors + e
                reused += sum(p2["rows"] for p2 in entry["reuse"])
                new_rows += got - sum(p2["rows"] for p2 in entry["reuse"])
                new_errors += e - sum(p2["errors"] for p2 in entry["reuse"])
        if new:
            raise UserError(f"rows of shard {next(iter(new))} were written but no listing planned it; nothing was "
                            f"published")
        return Checked(table, rows, errors, reused, new_rows, new_errors)

    def distinct_ids(self, checked: Checked, num_cpus: float) -> int:
        """How many distinct ids the output's parts hold (for inputs whose ids may repeat: Parquet,
        registry). Up to LOCAL_ID_CHECK_ROWS rows the id column is read here; above, Ray counts
        them (a groupby on the id, hash-shuffled across the cluster)."""
        files = [self._part_path(p) for entry in checked.shards.values() for p in entry["files"]]
        if checked.rows <= LOCAL_ID_CHECK_ROWS:
            ids: set = set()
            for path in files:
                with self.fs.open_input_file(path) as f:
                    ids.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
            return len(ids)
        from raycv.data.sources import read_parquet_rows

        ds, _ = read_parquet_rows([with_scheme(self.fs, p, self.uri) for p in files], ["path"], num_cpus=num_cpus)
        return ds.groupby("path").count().count()

    def _part_path(self, part: dict) -> str:
        return f"{self.shards_path}/{part['name']}" if part.get("where") else f"{self.path}/{part['name']}"

    def publish(self, mode: str, base: Manifest | None, checked: Checked, *, metadata: dict) -> Manifest:
        old = self.manifest()
        manifest_path = f"{self.path}/{MANIFEST}"
        if mode == "overwrite" and old is not None:
            self.fs.delete_file(manifest_path)  # from here until the end the output reads as incomplete
        files = []
        for entry in checked.shards.values():
            for p in entry["files"]:
                if p.pop("where", ""):
                    self.fs.move(f"{self.shards_path}/{p['name']}", f"{self.path}/{p['name']}")
                files.append(p["name"])
        prev = base or Manifest()
        manifest = Manifest(files=sorted(files), rows=checked.rows, errors=checked.errors,
                            runs=prev.runs + [{"run": self.run_id, "mode": mode, "rows": checked.new_rows,
                                               "reused": checked.reused}],
                            metadata=metadata, shards=checked.shards)
        with self.fs.open_output_stream(manifest_path) as f:
            f.write(manifest.to_json().encode())
        listed = set(files)
        for name in (old.files if old else []):  # replaced: parts of shards predicted again, or overwritten
            if name not in listed and self._info(f"{self.path}/{name}").type == pafs.FileType.File:
                self.fs.delete_file(f"{self.path}/{name}")
        self._clear_shards()
        return manifest

    def _clear_shards(self) -> None:
        for f in self._list(self.shards_path):
            name = f.path.rsplit("/", 1)[-1]
            if f.type == pafs.FileType.File and (PART.fullmatch(name) or SIDECAR.fullmatch(name) or PLAN.fullmatch(name)):
                self.fs.delete_file(f.path)
        if self._info(self.shards_path).type == pafs.FileType.Directory and not self._list(self.shards_path):
            self.fs.delete_dir(self.shards_path)

    def abandon(self, keep: bool = True) -> int:
        """A failed run keeps the parts it committed (for infer.mode=resume; not with `keep=False`,
        when the input itself is at fault) and removes the rest of what it wrote; with nothing
        committed, the output is left as it was found (its folder goes too when this run created it
        and nothing else is in it). Returns the committed parts kept."""
        names = {f.path.rsplit("/", 1)[-1] for f in self._list(self.shards_path)}
        kept = sum(1 for n in names if SIDECAR.fullmatch(n) and n[:-5] + ".parquet" in names) if keep else 0
        if not kept:
            self._clear_shards()
        else:
            self._remove_uncommitted(names)
        if self.created and self._info(self.path).type == pafs.FileType.Directory \
                and not self.fs.get_file_info(pafs.FileSelector(self.path)):
            self.fs.delete_dir(self.path)
        return kept


def read_output(uri: str, columns: list[str] | None = None):
    """The complete output as one Arrow table (only the files the manifest lists; `columns`: only these)."""
    loc = OutputLocation(uri)
    m = loc.manifest()
    if m is None:
        raise UserError(f"{uri} is not a complete raycv output (no {MANIFEST})")
    import pyarrow as pa

    tables = []
    for name in m.files:
        with loc.fs.open_input_file(f"{loc.path}/{name}") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables) if tables else None
