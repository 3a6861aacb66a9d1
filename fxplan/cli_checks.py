"""The command line's own checks: output paths tested before any search starts, and the one line
an unexpected failure becomes (the traceback only with --debug)."""

from __future__ import annotations

import os

from fxplan.errors import FxplanError


_SUFFIX = {"--json": ".json", "--png": ".png", "--trace": ".json"}


class OutputPathError(FxplanError):
    """An output file (--json, --png) cannot be written."""


def check_output_path(path: str | None, flag: str) -> None:
    """Refuse a path the command could not write at its end: a folder, a missing or read-only parent."""
    if path is None:
        return
    if not path or path.endswith(os.sep):
        raise OutputPathError(f"{flag} {path!r} names no file; give a file name, e.g. {flag} plan{_SUFFIX.get(flag, '')}")
    if os.path.isdir(path):
        raise OutputPathError(f"{flag} {path} is a folder; give a file name inside it, e.g. {os.path.join(path, 'plan' + _SUFFIX.get(flag, ''))}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputPathError(f"{flag} {path}: folder {parent} does not exist; create it first or pick another path")
    existed = os.path.exists(path)
    try:  # the one reliable test (permissions, read-only or virtual file systems): open it, as the end will
        with open(path, "a"):
            pass
    except OSError as exc:
        raise OutputPathError(f"{flag} {path} cannot be written ({exc.strerror}); pick another path") from None
    if not existed:
        os.remove(path)


def one_line(command: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError):
        return f"fxplan {command}: error: {text}; check the path and its permissions"
    return (f"fxplan {command}: internal error: {type(exc).__name__}: {text[:300]} "
            f"(rerun with --debug for the traceback and report it)")
