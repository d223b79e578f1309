"""Refuse runs whose files collide: two outputs, or an output and an input, that are one file.

Two paths name the same file when they resolve to the same place after following
symbolic links (``os.path.realpath``; this also catches a link in either position and
``a/../b`` spellings), or, when both exist, when :func:`os.path.samefile` says so
(hard links, bind mounts, case-insensitive file systems). ``-`` (stdin/stdout) and
``None`` take part in no comparison. The check runs before anything is read or
written, so ``--overwrite`` can never destroy an input.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from refine_cli.errors import UsageError


def same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file (see the module docstring)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): only the resolved names count
        return False


def check_distinct(inputs: Mapping[str, str | None], outputs: Mapping[str, str | None]) -> None:
    """Raise when an output is an input, or two outputs are one file.

    Args:
        inputs: flag or role (``image``, ``--mask``) → path; ``-`` and ``None`` are ignored.
        outputs: flag (``-o``, ``--uncertainty``, ``--report`` ...) → path, in the order the
            user would read them; ``-`` and ``None`` are ignored.

    Raises:
        UsageError: the first collision found; the message names both flags and the fix.
    """
    ins = [(k, v) for k, v in inputs.items() if v and v != "-"]
    outs = [(k, v) for k, v in outputs.items() if v and v != "-"]
    for flag, path in outs:
        for role, src in ins:
            if same_file(path, src):
                raise UsageError(f"{flag} {path} is the {role} ({src}): writing it would destroy the input, "
                                 f"even with --overwrite; give {flag} another path")
    for i, (flag, path) in enumerate(outs):
        for other, path2 in outs[i + 1:]:
            if same_file(path, path2):
                raise UsageError(f"{flag} {path} and {other} {path2} are the same file; give each output "
                                 "its own path")
