"""Atomic file writes: a crash leaves the old file or the new one, never half of one; and, without
`overwrite`, a name is published exclusively: a file that another process made meanwhile is never
replaced."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# link() publishes a file without replacing anything; these say the filesystem has no hard links (FAT,
# some network mounts), where an exclusive create of the name, then a rename over it, is used instead.
NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def publish(tmp: str | os.PathLike, dest: str | os.PathLike, overwrite: bool = True) -> None:
    """Give the finished file `tmp` (same folder) the name `dest` in one step. With `overwrite` it
    replaces what is there; without, a `dest` that exists raises FileExistsError and nothing is replaced."""
    if overwrite:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)  # unlike rename, link fails instead of replacing
    except OSError as err:
        if err.errno not in NO_HARD_LINKS:
            raise  # FileExistsError among them
        os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # claim the name, then fill it
        os.replace(tmp, dest)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`, made at once (an unwritable folder fails before the caller
    computes); on success it is published to `path` (`publish`) with the usual permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the group
        publish(tmp, path, overwrite)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
