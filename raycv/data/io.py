"""Paths that may be local or object-storage URIs, through pyarrow filesystems."""

from __future__ import annotations

import pyarrow.fs as pafs

from raycv.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """`s3://bucket/key`, `gs://...`, `file:///x` or a plain local path -> (filesystem, path)."""
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except Exception as e:
            raise UserError(f"cannot open {path}: {e}") from None
    from pathlib import Path

    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def with_scheme(fs: pafs.FileSystem, path: str, original: str) -> str:
    """Give a listed path back the scheme of the URI the user gave, so any process can reopen it."""
    if "://" in original and "://" not in path:
        return f"{original.split('://', 1)[0]}://{path}"
    return path


def normalize(path: str) -> str:
    """The form `list_files` returns: URIs unchanged, local paths absolute."""
    fs, p = resolve(path)
    return with_scheme(fs, p, path)


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def list_files(root: str, extensions: tuple[str, ...] | None = None) -> list[str]:
    """Every file under `root`, recursively, sorted; hidden (`.`) and `_` files and folders are
    skipped. Locally, as `find` does by default, symlinked folders are not followed (a link out of
    the root or a loop back into it adds nothing); a symlinked file is listed."""
    fs, base = resolve(root)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"path does not exist: {root}")
    if info.type == pafs.FileType.File:
        return [with_scheme(fs, base, root)]
    if isinstance(fs, pafs.LocalFileSystem):
        import os

        found = []
        for d, dirs, files in os.walk(base, followlinks=False):
            dirs[:] = [x for x in dirs if not x.startswith((".", "_")) and not os.path.islink(os.path.join(d, x))]
            found += [os.path.join(d, f) for f in files if not f.startswith((".", "_"))]
    else:
        found = []
        for f in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            rel = f.path[len(base):].lstrip("/")
            if f.type == pafs.FileType.File and not any(part.startswith((".", "_")) for part in rel.split("/")):
                found.append(f.path)
    return sorted(with_scheme(fs, p, root) for p in found if extensions is None or p.lower().endswith(extensions))


def sha256_file(path) -> str:
    """SHA-256 of a local file, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def read_text(path: str) -> str | None:
    """A small text file's content, or None when there is no such file."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    """Replace a small file whole: locally through a temp file and a rename, on object storage
    with one PUT (both atomic: a reader sees the old or the new content, never half)."""
    fs, p = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        import os
        from pathlib import Path

        target = Path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return
    with fs.open_output_stream(p) as f:
        f.write(data)


def list_names(path: str) -> list[str]:
    """The names directly inside a folder (files and folders); [] when it does not exist."""
    fs, p = resolve(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(p)))


def make_dirs(path: str) -> None:
    fs, p = resolve(path)
    fs.create_dir(p, recursive=True)


def download_dir(uri: str, local: str) -> None:
    """Copy a folder from any pyarrow filesystem to a local folder."""
    fs, p = resolve(uri)
    pafs.copy_files(p, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
