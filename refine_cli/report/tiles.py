"""The report's tile map: one character per tile of a full-resolution grid, what the engine did there.

A level's map is stored in the run report (``tile_map``) as::

    {"height": H, "width": W, "tile_height": th, "tile_width": tw,
     "row_starts": [r0, r1, ...], "col_starts": [c0, c1, ...],
     "states": ["<one character per tile of grid row 0>", "<row 1>", ...]}

Tile ``(i, j)`` covers image rows ``row_starts[i] .. row_starts[i] + th`` and columns
``col_starts[j] .. col_starts[j] + tw`` (neighbours overlap); its state is ``states[i][j]``, one of
:data:`STATE_CHARS`. One byte per tile: 100 000 tiles take about 100 kB of JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

TILE_NOT_RUN, TILE_SKIPPED, TILE_REFINED, TILE_HELD = 0, 1, 2, 3
"""Tile states (uint8 codes): not run (rows an interrupted run had finished, or a level reused on
resume), skipped (the coarse values were copied: uniform coarse mask, or nothing to check), refined,
refined with some changes held back (the do-no-harm guard)."""

STATE_CHARS = "-.rh"
"""The report's character for each state code (index = code)."""

STATE_NAMES = ("not run", "skipped", "refined", "held back")
"""A word for each state code (index = code)."""


def encode_states(states: np.ndarray) -> list[str]:
    """One string per grid row, one character (:data:`STATE_CHARS`) per tile.

    Args:
        states: ``(rows, cols)`` uint8 codes in ``0..3``.
    """
    table = np.frombuffer(STATE_CHARS.encode("ascii"), np.uint8)
    chars = table[np.clip(states, 0, len(STATE_CHARS) - 1)]
    return [row.tobytes().decode("ascii") for row in chars]


def decode_states(rows: Sequence[str]) -> np.ndarray:
    """The inverse of :func:`encode_states`; unknown characters read as ``TILE_NOT_RUN``.

    Returns:
        ``(rows, cols)`` uint8 codes (``(0, 0)`` for no rows).

    Raises:
        ValueError: the rows differ in length.
    """
    if not rows:
        return np.zeros((0, 0), np.uint8)
    width = len(rows[0])
    if any(len(r) != width for r in rows):
        raise ValueError("tile map rows differ in length")
    lut = np.zeros(256, np.uint8)
    for code, ch in enumerate(STATE_CHARS):
        lut[ord(ch)] = code
    raw = np.frombuffer("".join(rows).encode("ascii", errors="replace"), np.uint8)
    return lut[raw].reshape(len(rows), width)


def tile_map_entry(shape: tuple[int, int], tile_shape: tuple[int, int], row_starts: Sequence[int],
                   col_starts: Sequence[int], states: np.ndarray) -> dict[str, Any]:
    """The report's entry for one level's grid (the layout in the module docstring)."""
    return {"height": int(shape[0]), "width": int(shape[1]), "tile_height": int(tile_shape[0]),
            "tile_width": int(tile_shape[1]), "row_starts": [int(r) for r in row_starts],
            "col_starts": [int(c) for c in col_starts], "states": encode_states(states)}


def state_counts(entry: dict[str, Any]) -> dict[str, int]:
    """Tiles per state name (:data:`STATE_NAMES`) of a tile map entry."""
    codes = decode_states(entry.get("states", []))
    counts = np.bincount(codes.ravel(), minlength=len(STATE_NAMES))
    return {name: int(n) for name, n in zip(STATE_NAMES, counts, strict=False)}
