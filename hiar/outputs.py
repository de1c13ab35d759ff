"""What an evaluation program (eval/) does with its outputs and its errors.

A program that writes a file refuses, before any compute, to replace one that exists unless it is given
--overwrite (`refuse_existing`), and publishes each file in one step under a name it claims exclusively
(`new_file`, `publish`), so a crash leaves no half file and two runs into one folder never replace each
other's files. Bad input ends a program with one 'error: ...' line and exit code 2 (`exit_code`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from hiar import atomic

OVERWRITE_HELP = "replace outputs that exist already (without it, an existing output stops the run before any compute)"


def exit_code(work: Callable[[], object], also: tuple[type[Exception], ...] = ()) -> int:
    """Run a program's work; bad input (ValueError, OSError, or the program's own errors `also`, e.g. a
    checkpoint it cannot read) ends it with one 'error: ...' line and code 2."""
    try:
        work()
    except (ValueError, OSError, *also) as err:
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
    """`hiar.atomic.publish`, with the evaluation programs' message when the name was taken meanwhile."""
    try:
        atomic.publish(tmp, dest, overwrite)
    except FileExistsError:
        raise _taken(dest) from None


@contextlib.contextmanager
def new_file(dest: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """`hiar.atomic.atomic_path` for an output: an unwritable folder (found before the caller computes)
    or a name taken while the caller wrote is one error line naming the file."""
    dest, stage = Path(dest), "open"
    try:
        with atomic.atomic_path(dest, overwrite) as tmp:
            stage = "write"
            yield tmp
            stage = "publish"
    except FileExistsError:
        if stage == "publish":
            raise _taken(dest) from None
        raise
    except OSError as err:
        if stage == "open":
            raise OSError(f"cannot write {dest} ({err.strerror or err}): choose a writable --out") from None
        raise
