"""Files detc writes: one atomic writer for files and folders, and where the cache lives.

Every output detc produces goes through :func:`write_file_atomically` (or its ``bytes`` / text
shorthands) or :func:`replace_directory`: the content is written beside its destination under a
hidden temporary name, flushed to disk, then renamed over the destination, so a reader never sees a
half-written file and a failed or interrupted run leaves the previous file (or nothing) behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

#: permissions of files detc writes (what ``open(..., "w")`` gives under the usual umask 022);
#: ``mkstemp`` would leave 0600, which surprises anyone who copies an artifact to a device
FILE_MODE = 0o644


def cache_dir() -> Path:
    """``$DETC_CACHE_DIR``, else ``$XDG_CACHE_HOME/detc``, else ``~/.cache/detc`` (created)."""
    explicit = os.environ.get("DETC_CACHE_DIR")
    if explicit:
        root = Path(explicit)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "detc"
    root.mkdir(parents=True, exist_ok=True)
    return root


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_file_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, fsync what it wrote, then rename it over ``path``.

    ``write`` gets a path in ``path``'s folder (so the rename never crosses file systems); on any
    failure, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb") as stream:
            os.fsync(stream.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    write_file_atomically(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomically(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    write_bytes_atomically(path, text.encode("utf-8"))


def replace_directory(staging: Path, destination: Path) -> None:
    """Rename the finished folder ``staging`` to ``destination``, replacing a previous one last.

    The previous ``destination`` is moved aside first and removed only once ``staging`` is in
    place; if the final rename fails it is moved back. ``staging`` must be in ``destination``'s
    parent folder.
    """
    if not destination.exists():
        os.rename(staging, destination)
        return
    retired = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(destination, retired)
    try:
        os.rename(staging, destination)
    except BaseException:
        os.rename(retired, destination)
        raise
    shutil.rmtree(retired, ignore_errors=True)
