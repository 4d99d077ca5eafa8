"""Complete, exactly-once Parquet outputs.

An output folder holds `part-<run>-<n>.parquet` files and `_raycv_manifest.json`, written last:
the manifest lists the files that make up the output and the row counts. An output without a
manifest is incomplete; a part file the manifest does not list is debris from a crashed run and is
never read. A run writes into `_tmp-<run>/` inside the output (readers skip `_` names), and
publishes only after every row is written and counted:

- mode=error: an existing output is refused.
- mode=overwrite: the manifest goes first (the output reads as incomplete), then the new files
  move in, the old ones go, and the new manifest is written.
- mode=resume: only inputs whose path is not already in the output are processed; the new files
  move in and the manifest is rewritten to list old and new.
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

MANIFEST = "_raycv_manifest.json"
# The only names raycv writes in an output folder: it reads and deletes nothing else.
PART = re.compile(r"part-\d{14}-[0-9a-f]{6}-\d{5,}\.parquet")
TMP = re.compile(r"_tmp-\d{14}-[0-9a-f]{6}")


# Up to this many rows, the exactly-once check reads the ids into the driver (~100 MB at most);
# above it, Ray counts the distinct ids.
LOCAL_ID_CHECK_ROWS = 1_000_000


def _rows_and_nulls(f, column: str) -> tuple[int, int]:
    """(rows, nulls in `column`) of a Parquet file, from its footer's statistics (the column itself
    is read only where a row group has none)."""
    pf = pq.ParquetFile(f)
    meta = pf.metadata
    index = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == column)
    nulls = 0
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(index).statistics
        if stats is None or not stats.has_null_count:
            return meta.num_rows, pf.read(columns=[column]).column(column).null_count
        nulls += stats.null_count
    return meta.num_rows, nulls


@dataclass
class Manifest:
    files: list[str] = field(default_factory=list)  # names inside the output folder
    rows: int = 0
    errors: int = 0
    runs: list[dict] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"complete": True, "files": self.files, "rows": self.rows, "errors": self.errors,
                           "runs": self.runs, "metadata": self.metadata}, indent=1)


class OutputLocation:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.path = resolve(self.uri)
        self.run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.tmp_path = f"{self.path}/_tmp-{self.run_id}"
        self.created = False  # set by prepare(): this run made the output folder

    @property
    def tmp_uri(self) -> str:
        return with_scheme(self.fs, self.tmp_path, self.uri)

    def _info(self, p: str) -> pafs.FileInfo:
        return self.fs.get_file_info(p)

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
            files, rows, errors = d["files"], d["rows"], d["errors"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise UserError(f"{where} is not a raycv manifest (unreadable)") from None
        if not (isinstance(files, list) and isinstance(rows, int) and isinstance(errors, int)):
            raise UserError(f"{where} is not a raycv manifest (files, rows or errors of the wrong type)")
        bad = [n for n in files if not (isinstance(n, str) and PART.fullmatch(n))]
        if bad:
            raise UserError(f"{where} is not a raycv manifest: it lists {bad[0]!r}, not a part file raycv writes")
        return Manifest(files=files, rows=rows, errors=errors, runs=d.get("runs", []), metadata=d.get("metadata", {}))

    def check(self, mode: str) -> None:
        """Refuse, touching nothing, an output that `mode` may not write into: an existing one with
        mode=error, and whatever the mode one that holds anything raycv did not write (raycv deletes
        only its own `_tmp-<run>` folders and part files)."""
        if not self.exists():
            return
        if mode == "error":
            raise UserError(f"output {self.uri} already exists; pass infer.mode=overwrite to replace it "
                            f"or infer.mode=resume to add the inputs it lacks")
        for f in self.fs.get_file_info(pafs.FileSelector(self.path)):
            name = f.path.rsplit("/", 1)[-1]
            ours = (name == MANIFEST and f.type == pafs.FileType.File) or \
                (PART.fullmatch(name) and f.type == pafs.FileType.File) or \
                (TMP.fullmatch(name) and f.type == pafs.FileType.Directory)
            if not ours:
                raise UserError(f"output {self.uri} holds {name!r}, which raycv did not write; "
                                f"nothing was changed: choose a new or empty folder for --output")
        self.manifest()  # a manifest raycv did not write is refused here

    def prepare(self, mode: str) -> Manifest | None:
        """Check the mode against what is there; return the manifest to build on (resume)."""
        self.created = self._info(self.path).type == pafs.FileType.NotFound
        self.check(mode)
        if self.exists():
            current = self.manifest()
            if mode == "resume" and current is None:
                current = Manifest()  # nothing was published: resume is a fresh run
            self._remove_debris(current)
        else:
            current = None
        try:
            self.fs.create_dir(self.tmp_path, recursive=True)
        except OSError as e:
            raise UserError(f"cannot write to output {self.uri}: {str(e).splitlines()[0]}") from None
        return current if mode == "resume" else None

    def _remove_debris(self, current: Manifest | None) -> None:
        """A crashed run's temp folders and unlisted part files (`check` proved every name is raycv's)."""
        keep = set(current.files if current else [])
        for f in self.fs.get_file_info(pafs.FileSelector(self.path)):
            name = f.path.rsplit("/", 1)[-1]
            if TMP.fullmatch(name) and f.type == pafs.FileType.Directory:
                self.fs.delete_dir(f.path)
            elif f.type == pafs.FileType.File and PART.fullmatch(name) and name not in keep:
                self.fs.delete_file(f.path)

    def done_paths(self, current: Manifest | None) -> set[str]:
        paths: set[str] = set()
        for name in current.files if current else []:
            with self.fs.open_input_file(f"{self.path}/{name}") as f:
                paths.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
        return paths

    def written_files(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.tmp_path, recursive=True))
        return sorted(f.path for f in infos if f.type == pafs.FileType.File and f.path.endswith(".parquet"))

    def count_written(self, expected: int, num_cpus: float) -> tuple[int, int, int]:
        """(rows, error rows, distinct ids) of what this run wrote into its temporary folder. For up
        to LOCAL_ID_CHECK_ROWS `expected` rows, the id and error columns are read here (one read per
        file). Above, rows and errors come from the Parquet footers (row counts, the `error`
        column's null counts) and Ray counts the distinct ids (a groupby on the id, hash-shuffled
        across the cluster), so the driver's memory does not grow with N."""
        files = self.written_files()
        rows = errors = 0
        if expected <= LOCAL_ID_CHECK_ROWS:
            ids: set = set()
            for p in files:
                with self.fs.open_input_file(p) as f:
                    t = pq.read_table(f, columns=["path", "error"])
                rows, errors = rows + t.num_rows, errors + t.num_rows - t.column("error").null_count
                ids.update(t.column("path").to_pylist())
            return rows, errors, len(ids)
        for p in files:
            with self.fs.open_input_file(p) as f:
                n, ok = _rows_and_nulls(f, "error")
            rows, errors = rows + n, errors + n - ok
        from raycv.data.sources import read_parquet_rows

        ds, _ = read_parquet_rows([with_scheme(self.fs, p, self.uri) for p in files], ["path"], num_cpus=num_cpus)
        return rows, errors, ds.groupby("path").count().count()

    def publish(self, mode: str, base: Manifest | None, *, rows: int, errors: int, metadata: dict) -> Manifest:
        old = self.manifest()
        manifest_path = f"{self.path}/{MANIFEST}"
        if mode == "overwrite" and old is not None:
            self.fs.delete_file(manifest_path)  # from here until the end the output reads as incomplete
        new_files = []
        for i, src in enumerate(self.written_files()):
            name = f"part-{self.run_id}-{i:05d}.parquet"
            self.fs.move(src, f"{self.path}/{name}")
            new_files.append(name)
        if mode == "overwrite" and old is not None:
            for name in old.files:
                if self._info(f"{self.path}/{name}").type == pafs.FileType.File:
                    self.fs.delete_file(f"{self.path}/{name}")
        self.fs.delete_dir(self.tmp_path)
        prev = base or Manifest()
        manifest = Manifest(files=prev.files + new_files, rows=prev.rows + rows, errors=prev.errors + errors,
                            runs=prev.runs + [{"run": self.run_id, "mode": mode, "rows": rows, "errors": errors}],
                            metadata=metadata)
        with self.fs.open_output_stream(manifest_path) as f:
            f.write(manifest.to_json().encode())
        return manifest

    def abandon(self) -> None:
        """A failed run leaves the output as it found it: its temp folder goes, and so does the
        output folder when this run created it and nothing else is in it."""
        if self._info(self.tmp_path).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.tmp_path)
        if self.created and self._info(self.path).type == pafs.FileType.Directory \
                and not self.fs.get_file_info(pafs.FileSelector(self.path)):
            self.fs.delete_dir(self.path)


def read_output(uri: str):
    """The complete output as one Arrow table (only the files the manifest lists)."""
    loc = OutputLocation(uri)
    m = loc.manifest()
    if m is None:
        raise UserError(f"{uri} is not a complete raycv output (no {MANIFEST})")
    import pyarrow as pa

    tables = []
    for name in m.files:
        with loc.fs.open_input_file(f"{loc.path}/{name}") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else None
