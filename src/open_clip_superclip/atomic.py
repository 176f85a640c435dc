"""Writing files and folders so that an interrupted write never leaves something that looks complete."""
import contextlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable


_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def local_output_path(path, flag: str) -> str:
    """The local path an output option names: a ``file://`` URL is its path; any other URL is refused.

    The writers here work on local files only; ``os.path.abspath("s3://b/x")`` would quietly become ``./s3:/b/x``.
    Raises ValueError naming the option and the URL.
    """
    text = os.fspath(path)
    if text.startswith("file://"):
        return text[len("file://"):]
    if _URL_SCHEME.match(text):
        raise ValueError(f"{flag} {text}: only local paths and file:// URLs can be written")
    return text


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


PARTIAL_MARK = ".partial-"  # atomic_save writes into the hidden folder f".{name}{PARTIAL_MARK}XXXX" beside it


def _fsync_folder(directory: str) -> None:
    """Makes a rename in `directory` durable where the platform allows."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _replaced_on_success(path, same_name: bool):
    """Yields a temporary path beside `path` for the caller to write; once the write returns, the file is
    fsynced and renamed over `path` (mode from the umask); on any error nothing of it is left.

    same_name: the temporary file has `path`'s own name, inside a hidden folder (torch.save names the archive
    after its file, so the bytes then equal a direct save at `path`).
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if same_name:
        holder = tempfile.mkdtemp(prefix=f".{name}{PARTIAL_MARK}", dir=directory)
        tmp = os.path.join(holder, name)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        holder = None
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
        _fsync_folder(directory)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if holder is not None:
            shutil.rmtree(holder, ignore_errors=True)


def write_atomically(path, write: Callable[[io.BufferedWriter], None]) -> None:
    """``write(f)`` into a temp file beside ``path``, fsync, rename over ``path``: a kill leaves the old file or
    the new one, never a part."""
    with _replaced_on_success(path, same_name=False) as tmp:
        with open(tmp, "wb") as f:
            write(f)


def atomic_save(obj, f, *args, **kwargs) -> None:
    """``torch.save`` that never leaves a partial file at ``f`` (bytes identical to ``torch.save(obj, f)``).
    File objects are passed to torch.save unchanged."""
    import torch
    if not isinstance(f, (str, os.PathLike)):
        return torch.save(obj, f, *args, **kwargs)
    with _replaced_on_success(f, same_name=True) as tmp:
        torch.save(obj, tmp, *args, **kwargs)


def _publish(staging: Path, out: Path):
    """Moves a finished staging folder onto `out`, replacing what was there only once the new one is whole."""
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
        os.rename(out, retired / out.name)
        os.rename(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, out)


@contextlib.contextmanager
def staging_dir(out):
    """Yields an empty folder beside `out`; on success it becomes `out`, on any error it is deleted."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, out)


def is_nonempty_dir(path) -> bool:
    path = Path(path)
    return path.is_dir() and any(path.iterdir())
