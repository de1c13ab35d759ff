"""Evaluation programs: they read files (videos, latents, result JSON), never live model objects.

Outputs: a program that writes a file refuses, before any compute, to replace one that exists unless
it is given --overwrite, and publishes each file in one step under a name it claims exclusively, so a
crash leaves no half file and two runs into one folder never replace each other's files.
"""

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

OVERWRITE_HELP = "replace outputs that exist already (without it, an existing output stops the run before any compute)"


def exit_code(work: Callable[[], object]) -> int:
    """Run a program's work; bad input (ValueError, OSError) ends it with one 'error: ...' line and code 2."""
    try:
        work()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    """ValueError naming the first of `paths` that exists, unless `overwrite`: call it before any compute."""
    if overwrite:
        return
    taken = [p for p in paths if os.path.lexists(p)]
    if taken:
        more = f" (and {len(taken) - 1} more of this run's outputs)" if len(taken) > 1 else ""
        raise ValueError(f"{taken[0]} already exists{more}: pass --overwrite to replace it, or choose another --out")


def _taken(dest: Path) -> OSError:
    return OSError(f"{dest} appeared while this run was writing it (another run into the same folder?); nothing "
                   "was replaced: choose another --out, or pass --overwrite")


def publish(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move the finished file `tmp` to `dest` (same folder or file system) in one step. Without
    `overwrite` the name is claimed exclusively: a file that appeared there meanwhile is never replaced."""
    if overwrite:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)  # unlike rename, link fails instead of replacing
    except FileExistsError:
        raise _taken(dest) from None
    except OSError:  # no hard links on this file system: claim the name empty, then fill it
        try:
            os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            raise _taken(dest) from None
        os.replace(tmp, dest)
        return
    os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def new_file(dest: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success it is published to `dest` (see `publish`). The
    temporary file is created at once, so an unwritable folder fails before the caller computes."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    except OSError as err:
        raise OSError(f"cannot write {dest} ({err.strerror or err}): choose a writable --out") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the group
        publish(Path(tmp), dest, overwrite)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
