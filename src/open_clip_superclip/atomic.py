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


def write_atomically(path, write: Callable[[io.BufferedWriter], None]) -> None:
    """``write(f)`` into a temp file beside ``path``, fsync, rename over ``path`` (mode from the umask)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the platform allows
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


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
