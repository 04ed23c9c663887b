"""The ``fastddpm`` command's argument types and its error policy.

Every user error is found before the work starts where it can be (argument types, output paths)
and reported as one line, ``fastddpm <command>: error: <what>``, with exit status 2; real bugs keep
their traceback (and ``--debug`` shows one for every error).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Tuple

USER_ERRORS: Tuple[type, ...] = (ValueError, TypeError, OSError)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str):
        """Print ``<prog>: error: <message>`` and exit with status 2."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``low``."""
    what = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def _writable_location(path: str) -> None:
    """Raise ArgumentTypeError unless a file or folder can be created at ``path``: its parent folder
    is made now (as the write would make it), so a path that cannot exist fails before the work."""
    if not path:
        raise argparse.ArgumentTypeError("expected a path, got ''")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{path!r} cannot be created: {parent!r}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{path!r} cannot be created: {parent!r} is not writable")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def output_file(suffixes: Tuple[str, ...], what: str) -> Callable[[str], str]:
    """An argparse type: a path ``what`` (e.g. "an image") ending in one of ``suffixes`` can be written to."""

    def check(path: str) -> str:
        if os.path.isdir(path) or path.endswith(os.sep):
            raise argparse.ArgumentTypeError(f"{path!r} is a folder; expected {what} file name such as "
                                             f"{os.path.join(path, 'out' + suffixes[0])!r}")
        if not path.lower().endswith(suffixes):
            raise argparse.ArgumentTypeError(f"expected {what} file name ending in {', '.join(suffixes)}; "
                                             f"got {path!r}")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{path!r} exists and is not writable")
        _writable_location(path)
        return path

    return check


image_file = output_file(IMAGE_SUFFIXES, "an image")
npy_file = output_file((".npy",), "a NumPy")


def run_folder(path: str) -> str:
    """An argparse type: a training run folder: an existing folder, or a path one can be made at."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path!r} is a file; expected a run folder (it holds the checkpoint, "
                                         f"samples and log)")
    if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{path!r} is not writable")
    _writable_location(path)
    return path


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``func(args)`` under the error policy: user errors as one line and status 2, Ctrl-C as one
    line and status 130, anything else (a bug) with its traceback; ``--debug`` re-raises all."""
    if getattr(args, "debug", False):
        return func(args)
    from .sampling import NonFiniteWarning

    try:
        return func(args)
    except USER_ERRORS + (NonFiniteWarning,) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, OSError) and e.filename is not None and e.strerror:
            message = f"{e.filename}: {e.strerror}"
        print(f"fastddpm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastddpm {args.command}: interrupted", file=sys.stderr)
        return 130
