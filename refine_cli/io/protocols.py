"""The typed contracts between the engine and its inputs and outputs.

The engine (``refine_cli.engine``) reads the image and the coarse input by window and hands
finished rows to a writer; these protocols say exactly what it calls, so a new reader, coarse
source or output only has to provide these methods. Windows are
:class:`~refine_cli.tiling.grid.Window` in the pixel grid of the level being refined.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

    from refine_cli.io.masks import LabelWindow
    from refine_cli.tiling.grid import Window


class ImageWindows(Protocol):
    """An RGB image read by window: one level of the engine's pyramid (``refine_cli.io.image.LevelImage``)."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` in pixels."""
        ...

    def read(self, window: Window) -> np.ndarray:
        """``(h, w, 3)`` uint8 RGB over ``window``."""
        ...


class PyramidImage(Protocol):
    """An image with its pyramid levels, read by window (``refine_cli.io.image.ImageSource``).

    MagNet's tiled pipeline reads its stage images through this (the nearest larger level, area
    downscaled); ``refine_cli.refiners.magnet_tiled.ArrayImage`` offers it for an array in memory.
    """

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of level 0."""
        ...

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        """``(h, w)`` of every stored level, level 0 first."""
        ...

    def read(self, window: Window, level: int = 0) -> np.ndarray:
        """``(h, w, 3)`` uint8 RGB over ``window`` of pyramid level ``level``."""
        ...


class CoarseSource(Protocol):
    """The coarse input of a level, read by window: the user's mask or a previous level's output."""

    @property
    def is_labels(self) -> bool:
        """A label map (read with :meth:`read_labels`), not probabilities."""
        ...

    @property
    def channels(self) -> int:
        """K, channels of :meth:`read_k`."""
        ...

    def constant(self, window: Window) -> np.ndarray | None:
        """The ``(K,)`` float32 value when the input is constant over ``window``, else ``None``."""
        ...

    def binary_uniform(self, window: Window, threshold: float = 0.5) -> bool:
        """Channel 0 lies on one side of ``threshold`` everywhere in ``window``."""
        ...

    def read_k(self, window: Window) -> np.ndarray:
        """``(h, w, K)`` float32 probabilities in ``[0, 1]``."""
        ...

    def read_labels(self, window: Window) -> LabelWindow:
        """The label map over ``window`` (label inputs only; others raise ``TypeError``)."""
        ...


class LevelInput(CoarseSource, Protocol):
    """A coarse source that a refiner builds for one of its levels and the engine closes after it."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(h, w)`` of the level."""
        ...

    def close(self) -> None:
        """Release what the source holds (stores, files, the previous level it reads)."""
        ...


class RowWriter(Protocol):
    """Receives the finished rows of a level, top to bottom."""

    def write(self, row0: int, block: np.ndarray) -> None:
        """Rows ``[row0, row0 + len(block))``: ``(rows, W, C)`` float32 (outputs, then uncertainty)."""
        ...
