"""Where datasets live: a local folder or object storage (`s3://bucket/prefix`, and `gs://` or `az://` where
fsspec has the library for it). Every data module goes through here, so a dataset root is a Path or a
universal_pathlib UPath with the same methods; tars stream through ranged reads, never a local copy of the data.

Credentials are never Kino's: the storage library reads them from the environment or the usual files
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_PROFILE`, ~/.aws/credentials, an instance role;
`AWS_ENDPOINT_URL` for an S3-compatible server). Config, manifests and logs hold only the URL."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Union

Location = Union[Path, Any]  # a Path, or a upath.UPath for a URL
READ_BLOCK = 8 << 20  # bytes per ranged read of a streamed tar


def _umask() -> int:
    """The process's umask, read once at import (setting it to read it would change it for every thread)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()


def is_remote(root) -> bool:
    text = str(root)
    return "://" in text and not text.startswith("file://")


def location(root) -> Location:
    """`root` as a path object: a Path for a local folder, a UPath (same methods) for a URL."""
    if isinstance(root, Path):
        return root
    if is_remote(root):
        from upath import UPath

        return UPath(str(root))
    return Path(str(root).removeprefix("file://"))


def join(root, *names: str) -> str:
    """A path below `root`, as the string a config or manifest records."""
    return str(location(root).joinpath(*names))


def open_read(path, block_size: int = READ_BLOCK):
    """A binary file object: a local file, or a remote object read in ranged requests of `block_size`."""
    path = location(path)
    if isinstance(path, Path):
        return open(path, "rb")
    return path.fs.open(path.path, "rb", block_size=block_size)


def tar_samples(path, handler: Callable[[Exception], bool]) -> Iterator[Dict[str, Any]]:
    """webdataset's samples of one tar (`__key__`, `__url__` and one entry per member), streamed."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    try:
        stream = open_read(path)
    except Exception as error:  # a missing or unreadable shard is the handler's to report
        handler(error)
        return
    with stream:
        files = tar_file_expander([{"url": str(path), "stream": stream}], handler=handler)
        yield from group_by_keys(files, handler=handler)


@contextmanager
def staged(target) -> Iterator[Path]:
    """A local file to write, published at `target` whole once the block ends (a local rename, or one upload):
    a reader sees the old file or the new one, never part of either. Nothing is published if the block fails."""
    target = location(target)
    local_dir = target.parent if isinstance(target, Path) else None
    if local_dir is not None:
        local_dir.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=local_dir)
    os.close(handle)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp's 0600 would hide a shared dataset from the other users and pods
    try:
        yield tmp
        if isinstance(target, Path):
            os.replace(tmp, target)
        else:
            target.fs.put_file(str(tmp), target.path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target, text: str) -> None:
    with staged(target) as tmp:
        tmp.write_text(text)


def size_of(path) -> int:
    return location(path).stat().st_size


def make_folder(root) -> Location:
    """Create a dataset folder (object storage has no folders: nothing to do there)."""
    root = location(root)
    if isinstance(root, Path):
        root.mkdir(parents=True, exist_ok=True)
    return root


def remove(path, missing_ok: bool = False) -> None:
    path = location(path)
    if isinstance(path, Path):
        path.unlink(missing_ok=missing_ok)
    elif not missing_ok or path.exists():
        path.fs.rm_file(path.path)
