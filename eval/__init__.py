"""Evaluation programs: they read files (videos, latents, result JSON), never live model objects."""

import sys
from collections.abc import Callable


def exit_code(work: Callable[[], object]) -> int:
    """Run a program's work; bad input (ValueError, OSError) ends it with one 'error: ...' line and code 2."""
    try:
        work()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
