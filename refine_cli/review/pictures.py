"""The review's pictures: a region side by side with its heat map, and the tile map.

* **Region** (``crop`` px tall, ``2 crop + GAP`` wide, RGB uint8): left, the image at full
  resolution with the coarse mask's contour (:data:`~refine_cli.overlay.COMPARE_COLOUR`) and the
  refined mask's (:data:`~refine_cli.overlay.MASK_COLOUR`), drawn by
  :func:`refine_cli.overlay.crop_picture`; right, the uncertainty as a heat map
  (:func:`refine_cli.overlay.heat_map`; without an uncertainty map, ``|p_refined - p_coarse|``)
  with the refined contour.
* **Tile map** (the image's thumbnail): each pixel takes the state of the tile of the report's
  ``tile_map`` it lies in (the last tile starting at or before it): skipped tiles dimmed, refined
  tiles tinted blue, tiles where the guard held changes back tinted and framed red; tile borders
  where tiles are at least 6 px wide, and the regions framed and numbered.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from refine_cli.io.image import ImageSource
from refine_cli.overlay import (
    BACKGROUND,
    COMPARE_COLOUR,
    GAP,
    MASK_COLOUR,
    crop_picture,
    draw_text,
    draw_values,
    heat_map,
)
from refine_cli.report.tiles import TILE_HELD, TILE_NOT_RUN, TILE_REFINED, TILE_SKIPPED, decode_states
from refine_cli.review.scan import Maps, Region
from refine_cli.tiling.grid import Window

REFINED_TINT = (40, 120, 255)
"""Tint of refined tiles (RGB, blue)."""

HELD_TINT = (255, 40, 40)
"""Tint of tiles where the guard held changes back (RGB, red)."""

REGION_COLOUR = (255, 220, 0)
"""Frames of the regions on the tile map (RGB, yellow)."""

STATE_LEGEND = {TILE_SKIPPED: ("skipped (uniform coarse mask)", (110, 110, 110)),
                TILE_REFINED: ("refined", REFINED_TINT), TILE_HELD: ("guard held changes back", HELD_TINT),
                TILE_NOT_RUN: ("not run (resumed)", (20, 20, 20))}
"""Name and swatch colour (RGB) of each tile state."""


def region_picture(image: ImageSource, maps: Maps, region: Region, index: int) -> np.ndarray:
    """The region at full resolution with both contours, beside its heat map.

    Returns:
        ``(h, 2 w + GAP, 3)`` uint8 RGB, ``(h, w)`` the region's window shape.
    """
    win = region.window
    masks = [(maps.refined, MASK_COLOUR)]
    if maps.coarse is not None:
        masks.append((maps.coarse, COMPARE_COLOUR))
    left = crop_picture(image, masks, win, labels=maps.labels, threshold=maps.threshold,
                        caption=f"#{index} x={win.col} y={win.row}")
    grey = cv2.cvtColor(image.read(win), cv2.COLOR_RGB2GRAY)
    if maps.uncertainty is not None:
        heat, what = maps.uncertainty(win)[..., 0], "uncertainty"
    elif maps.coarse is not None:
        heat, what = _change(maps, win), "|refined - coarse|"
    else:
        heat, what = np.zeros(win.shape, np.float32), "no uncertainty map"
    right = heat_map(heat, grey)
    refined = maps.refined.read_labels(win).labels() if maps.labels else maps.refined.read(win)
    draw_values(right, refined, maps.labels, maps.threshold, MASK_COLOUR, 1)
    draw_text(right, [(f"{what}: mean {float(heat.mean()):.3f}", (255, 255, 255))])
    out = np.empty((win.height, 2 * win.width + GAP, 3), np.uint8)
    out[:] = BACKGROUND
    out[:, : win.width] = left
    out[:, win.width + GAP:] = right
    return out


def _change(maps: Maps, win: Window) -> np.ndarray:
    """``(h, w)`` float32 in ``[0, 1]``: ``|p_refined - p_coarse|`` (label maps: 1 where they differ)."""
    assert maps.coarse is not None
    if maps.labels:
        changed = maps.classes(maps.refined, win) != maps.classes(maps.coarse, win)
        diff: np.ndarray = changed.astype(np.float32)
    else:
        diff = np.abs(maps.refined.read(win) - maps.coarse.read(win)).astype(np.float32)
    return diff


def _pixel_states(entry: dict[str, Any], shape: tuple[int, int], out: tuple[int, int]) -> np.ndarray:
    """``out``-shaped uint8 state of the tile each thumbnail pixel lies in."""
    states = decode_states(entry.get("states", []))
    H, W = shape
    if states.size == 0:
        return np.full(out, TILE_NOT_RUN, np.uint8)
    ys = (np.arange(out[0]) + 0.5) * H / out[0]
    xs = (np.arange(out[1]) + 0.5) * W / out[1]
    ri = np.clip(np.searchsorted(entry["row_starts"], ys, side="right") - 1, 0, states.shape[0] - 1)
    ci = np.clip(np.searchsorted(entry["col_starts"], xs, side="right") - 1, 0, states.shape[1] - 1)
    pixel_states: np.ndarray = states[ri[:, None], ci[None, :]]
    return pixel_states


def tile_map_picture(thumb: np.ndarray, shape: tuple[int, int], tile_map: dict[str, Any],
                     regions: list[Region]) -> np.ndarray:
    """The thumbnail with the tiles' states, their borders and the numbered regions (module docstring).

    Args:
        thumb: ``(th, tw, 3)`` uint8 RGB thumbnail of the image.
        shape: ``(H, W)`` of the image.
        tile_map: the report's ``tile_map`` (``refine`` and optionally ``guard``); ``{}``: none.
        regions: the regions to frame, best first.

    Returns:
        ``(th, tw, 3)`` uint8 RGB.
    """
    th, tw = thumb.shape[:2]
    pic = thumb.astype(np.float32)
    grid = tile_map.get("refine")
    if grid is not None:
        st = _pixel_states(grid, shape, (th, tw))
        guard = tile_map.get("guard")
        if guard is not None:
            st = np.where(_pixel_states(guard, shape, (th, tw)) == TILE_HELD, TILE_HELD, st)
        grey = pic.mean(axis=2, keepdims=True)
        pic = np.where((st == TILE_SKIPPED)[..., None], 0.45 * grey + 20, pic)
        pic = np.where((st == TILE_NOT_RUN)[..., None], 0.2 * grey, pic)
        for code, tint in ((TILE_REFINED, REFINED_TINT), (TILE_HELD, HELD_TINT)):
            pic = np.where((st == code)[..., None], 0.6 * pic + 0.4 * np.asarray(tint, np.float32), pic)
    out = np.clip(np.rint(pic), 0, 255).astype(np.uint8)
    if grid is not None:
        _borders(out, grid, shape)
        _frame_held(out, tile_map.get("guard") or grid, shape)
    sy, sx = th / shape[0], tw / shape[1]
    for k, r in enumerate(regions, 1):
        w = r.window
        p0 = (int(w.col * sx), int(w.row * sy))
        p1 = (max(p0[0] + 2, int(w.col_end * sx) - 1), max(p0[1] + 2, int(w.row_end * sy) - 1))
        cv2.rectangle(out, p0, p1, REGION_COLOUR, 1)
        cv2.putText(out, str(k), (p0[0] + 2, min(th - 2, p0[1] + 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    REGION_COLOUR, 1, cv2.LINE_AA)
    return out


def _borders(out: np.ndarray, grid: dict[str, Any], shape: tuple[int, int]) -> None:
    """Dark lines where tiles start, when tiles are at least 6 px wide on the thumbnail (in place)."""
    th, tw = out.shape[:2]
    sy, sx = th / shape[0], tw / shape[1]
    if grid["tile_height"] * sy < 6 or grid["tile_width"] * sx < 6:
        return
    for r in grid["row_starts"][1:]:
        out[min(th - 1, int(r * sy))] //= 2
    for c in grid["col_starts"][1:]:
        out[:, min(tw - 1, int(c * sx))] //= 2


MAX_FRAMES = 20_000
"""At most this many held tiles are framed (beyond, the tint alone shows them)."""


def _frame_held(out: np.ndarray, grid: dict[str, Any], shape: tuple[int, int]) -> None:
    """Frame the tiles where changes were held back, each from its start to the next tile's (in place).

    Only when tiles are at least 6 px wide on the thumbnail; the frame is 2 px where they are 16 or more.
    """
    th, tw = out.shape[:2]
    sy, sx = th / shape[0], tw / shape[1]
    if grid["tile_height"] * sy < 6 or grid["tile_width"] * sx < 6:
        return
    rows, cols = list(grid["row_starts"]) + [shape[0]], list(grid["col_starts"]) + [shape[1]]
    thick = 2 if min(grid["tile_height"] * sy, grid["tile_width"] * sx) >= 16 else 1
    held = np.argwhere(decode_states(grid.get("states", [])) == TILE_HELD)[:MAX_FRAMES]
    for i, j in held:
        p0 = (int(cols[j] * sx), int(rows[i] * sy))
        p1 = (int(cols[j + 1] * sx) - 1, int(rows[i + 1] * sy) - 1)
        cv2.rectangle(out, p0, p1, HELD_TINT, thick)


def stack(pictures: list[np.ndarray], gap: int = GAP, horizontal: bool = False) -> np.ndarray:
    """Pictures one under the other (or side by side), top-left aligned, on the background colour."""
    if horizontal:
        h = max(p.shape[0] for p in pictures)
        w = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
    else:
        h = sum(p.shape[0] for p in pictures) + gap * (len(pictures) - 1)
        w = max(p.shape[1] for p in pictures)
    out = np.empty((h, w, 3), np.uint8)
    out[:] = BACKGROUND
    at = 0
    for p in pictures:
        if horizontal:
            out[: p.shape[0], at: at + p.shape[1]] = p
            at += p.shape[1] + gap
        else:
            out[at: at + p.shape[0], : p.shape[1]] = p
            at += p.shape[0] + gap
    return out


def text_strip(lines: list[str], width: int) -> np.ndarray:
    """Lines of text on a dark strip ``width`` px wide (for the PNG sheet)."""
    h = 8 + 18 * len(lines)
    out = np.empty((h, max(width, 16), 3), np.uint8)
    out[:] = BACKGROUND
    for k, line in enumerate(lines):
        cv2.putText(out, line, (6, 18 + 18 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (235, 235, 235), 1,
                    cv2.LINE_AA)
    return out
