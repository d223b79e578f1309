"""The refiner protocol: refine one window of an image given its coarse probability.

A refiner never opens files and never sees the whole image at once, except
through :class:`Scene`, which lets it read a downscaled overview in
:meth:`Refiner.prepare` (CascadePSP's global step, MagNet's first scale).

Shapes and ranges (see ``refine_cli.config``):

* ``image``: ``(h, w, 3)`` uint8 RGB, the tile grown by ``halo`` on each side
  (clipped at the image border).
* ``coarse``: ``(h, w)`` float32 probability in ``[0, 1]``; ``(h, w, K)`` when the
  coarse input has K channels (e.g. the OS1 and OS4 maps of a previous level).
* result ``prob``: ``(h, w)`` float32 in ``[0, 1]``, same window (``(h, w, K')`` for
  multi-channel refiners, see :meth:`Refiner.out_channels`).
* result ``uncertainty``: ``(h, w)`` float32 in ``[0, 1]`` or ``None`` (the engine
  then uses :func:`binary_uncertainty` of ``prob``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from refine_cli.tiling.grid import GridPlan, Tile, Window

if TYPE_CHECKING:
    from refine_cli.io.protocols import LevelInput, PyramidImage
    from refine_cli.io.readers import Reader
    from refine_cli.report.timing import StageTimer

FULL_RESOLUTION_SCALE = 1.5
"""A coarse mask whose error scale (image px per mask px, or the width of its soft ramps) is at most
this counts as full resolution: its boundary may already sit on the image's edges."""


def binary_uncertainty(prob: np.ndarray) -> np.ndarray:
    """``1 - |2p - 1|``: 0 where the probability is 0 or 1, 1 where it is 0.5.

    Args:
        prob: any shape, float in ``[0, 1]``.

    Returns:
        float32, same shape, in ``[0, 1]``.
    """
    p = prob.astype(np.float32, copy=False)
    u: np.ndarray = (1.0 - np.abs(2.0 * p - 1.0)).astype(np.float32)
    return u


def margin_uncertainty(probs: np.ndarray) -> np.ndarray:
    """``1 - (top1 - top2)`` over the last axis (class probabilities).

    Args:
        probs: ``(..., C)`` float, C >= 2.

    Returns:
        float32 ``(...)`` in ``[0, 1]``.
    """
    part = np.partition(probs, probs.shape[-1] - 2, axis=-1)
    return (1.0 - (part[..., -1] - part[..., -2])).astype(np.float32)


@dataclass
class TileInput:
    """What a refiner gets for one tile.

    Attributes:
        image: ``(h, w, 3)`` uint8 RGB over ``window`` (``None`` for refiners with ``needs_image = False``).
        coarse: ``(h, w)`` (or ``(h, w, K)``) float32 probability in [0, 1] over ``window``.
        window: where the arrays lie in the level's pixel grid (tile + halo).
        core: the part of ``window`` this tile alone accounts for (relative to ``window``; the
            owned windows of a grid partition the image), for counts kept per pixel; ``None``: all.
    """

    image: np.ndarray | None
    coarse: np.ndarray
    window: Window
    core: Window | None = None

    def rgb(self) -> np.ndarray:
        """The ``(h, w, 3)`` uint8 image of a refiner that reads it (``needs_image``)."""
        if self.image is None:
            raise ValueError("this tile was read without its image: the refiner must keep needs_image = True")
        return self.image


@dataclass
class TileResult:
    """A refiner's answer for one tile.

    Attributes:
        prob: ``(h, w)`` (or ``(h, w, K')``) float32 refined probability in [0, 1].
        uncertainty: ``(h, w)`` float32 in [0, 1], or ``None`` for the default.
        held: the refiner kept some of the coarse mask's values in the tile's core on purpose (the
            do-no-harm guard held changes back); recorded in the report's tile map.
    """

    prob: np.ndarray
    uncertainty: np.ndarray | None = None
    held: bool = False


@dataclass
class Scene:
    """Whole-image context for a refiner's global step.

    Attributes:
        shape: ``(H, W)`` of the image being refined.
        read_overview: ``f(shape, binarize=False) -> (image (h, w, 3) float32 in [0, 255], coarse)``:
            the image and the coarse probability downscaled ('area', not rounded) to ``shape``;
            ``coarse`` is ``(h, w)`` float32 (binary/soft; with ``binarize`` the mask is thresholded
            at full resolution before averaging) or ``(h, w, C)`` class shares (label maps);
            ``None`` without a coarse mask.
        device: torch device string the refiner should use.
        timer: stage timer to attribute time to (``read``, ``segment``, ``refine`` ...).
        progress: ``f(stage, done, total)`` for steps that take long inside a refiner (a global
            step, the patches of a whole-image pass, a segmenter); ``total = 0`` means the
            amount is unknown (a spinner). ``None``: nobody listens.
        image_source: the image, readable by window and as pyramid levels (the engine's
            :class:`~refine_cli.io.protocols.PyramidImage`); ``None`` when the refiner gets only
            :attr:`read_overview` (tests, whole-image callers).
        has_mask: a coarse mask was given (``False``: a refiner with its own segmenter makes it).
        coarse_scale: image height over the coarse mask's height (1 for a full-size mask): the
            coarse mask's error scale in image pixels.
        labels: the coarse mask is a label map (classes refined one by one).
        classes: classes of the coarse mask (1 for a binary or soft mask).
        bytes_out: bytes per image pixel of the outputs (mask and uncertainty) held while writing.
        max_memory: the run's memory budget in bytes (``--max-memory``).
        resident_bytes: bytes held all run long by decoded inputs (part of every memory plan).
        notes: lines for the run report that the refiner adds (paths taken, weights notices).
    """

    shape: tuple[int, int]
    read_overview: Callable[..., tuple[np.ndarray, Any]]
    device: str = "cpu"
    timer: StageTimer | None = None
    progress: Callable[[str, int, int], None] | None = None
    image_source: PyramidImage | None = None
    has_mask: bool = True
    coarse_scale: float = 1.0
    labels: bool = False
    classes: int = 1
    bytes_out: int = 2
    max_memory: int | None = None
    resident_bytes: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PlannedLevel:
    """One level that a run would have, as :meth:`Refiner.plan_levels` foresees it.

    Attributes:
        shape: ``(h, w)`` of the level.
        refiner: the level's refiner (its memory per tile, fixed memory and tile preferences).
        in_channels: K of the level's coarse input; ``None``: what the level before it writes (the
            user's mask for the first level).
    """

    shape: tuple[int, int]
    refiner: Refiner
    in_channels: int | None = None


class Refiner(abc.ABC):
    """Refines a coarse probability inside one window of an image.

    Subclasses set :attr:`name`, :attr:`halo` and implement :meth:`refine`. Every capability
    the engine and the API read is declared below with its default; a subclass overrides it as
    a class attribute, or per instance in ``__init__``/``prepare`` where it depends on options.
    """

    uses_torch: bool = False
    """Runs a torch network (the engine then batches ``RefineConfig.cascade.batch_size`` tiles)."""

    makes_coarse: bool = False
    """Makes its own coarse prediction (a segmenter inside) when no mask is given."""

    provides_uncertainty: bool = False
    """``TileResult.uncertainty`` is the refiner's own map (else the engine derives it from ``prob``)."""

    preferred_tile: int = 1024
    """Largest tile side the memory planner should choose for this refiner."""

    fixed_tile: int | None = None
    """A tile side the refiner needs (one network pass); ``None``: the planner chooses."""

    size_flag: str | None = None
    """The option that fixed :attr:`fixed_tile`, named in the message when the budget is too small."""

    custom_weights: bool = False
    """``True``: :meth:`tile_weights` gives the blend weights (``None`` per tile: feathering), which
    may leave pixels at weight 0 (filled by :attr:`skipped_tiles_weightless`' rule)."""

    cluster_ready: bool = True
    """Its levels can run as row bands in other processes (``refine run --scheduler``); ``False`` for
    a refiner whose levels need state it keeps in this process (MagNet's per-stage patches)."""

    custom_skip: bool = False
    """``True``: :meth:`skip_test` decides which tiles to skip (binary and soft inputs; label maps
    still follow :attr:`skip_rule`); the engine then reads the coarse input of every tile."""

    @property
    def num_classes(self) -> int:
        """Classes of a label space of the refiner's own (MagNet's segmenter).

        0 when the user's mask decides the output layout.
        """
        return 0

    name: ClassVar[str] = ""
    halo: int = 0
    """Context in px each side that the output needs to be independent of the tile cut."""
    needs_image: bool = True
    """``False`` for refiners that only transform the coarse input: the engine then does not
    read (decode) the image and ``TileInput.image`` is ``None``."""
    guarded: ClassVar[bool] = True
    """Whether the engine's do-no-harm guard (``refiners.guard``) checks this refiner's result against
    the user's mask (``False`` for refiners that cannot change a class, e.g. the null refiner)."""
    skip_rule: str = "uniform"
    """When the engine may skip a tile (with ``skip_uniform``): ``uniform`` = the coarse input is
    constant over the tile and its halo (the copy is then exact for refiners that keep constants);
    ``binary`` = its channel 0 lies on one side of 0.5 there (CascadePSP-style: no boundary to refine)."""

    def prepare(self, scene: Scene) -> None:  # noqa: B027 - optional hook
        """Whole-image step run once before any tile (default: nothing)."""

    @abc.abstractmethod
    def refine(self, tile: TileInput) -> TileResult:
        """Refine one window; see the module docstring for shapes."""

    # -- multi-level refiners (coarse-to-fine pyramids); one level by default ------------
    def level_shapes(self, shape: tuple[int, int]) -> list[tuple[int, int]]:
        """Sizes of the levels refined coarse-to-fine; the last is the image size ``shape``."""
        return [shape]

    def initial_coarse(self) -> np.ndarray | None:
        """The first level's coarse input as ``(h0, w0, K)`` float32 in [0, 1], or ``None``.

        The input is e.g. the output of a global step run in :meth:`prepare`; ``None`` uses the
        user's mask.
        """
        return None

    def plan_levels(self, scene: Scene) -> list[PlannedLevel]:
        """The levels a run on ``scene`` would have, decided without running a network or reading pixels.

        ``refine batch --dry-run`` plans each of them with the run's planner. ``scene`` carries what
        an image header tells: the shape, the mask's kind and classes, the output bytes, the budget
        and the resident bytes (its ``read_overview`` must not be called). The default: one level at
        the image size, this refiner, on the user's mask.
        """
        return [PlannedLevel(scene.shape, self)]

    def level_input(self, index: int, previous: Reader | None) -> LevelInput | None:
        """Level ``index``'s coarse input built by the refiner itself; ``None`` (default): the engine's.

        For refiners whose levels read the previous level in their own way (MagNet's stages upsample
        it with their own exact bilinear windows and pick patches on it first). The engine calls this
        before each of the refiner's levels.

        Args:
            index: the level, 0-based, coarse to fine.
            previous: the previous level's output as written, an ``(h, w, K)`` float32 raster at
                that level's own size read by window; ``None`` for level 0. A refiner that returns a
                source takes ``previous`` over and closes it when the source is closed.

        Returns:
            A source of the level's size, which the engine reads by window and closes after the
            level; or ``None``: level 0 reads :meth:`initial_coarse` or the user's mask, a later
            level ``previous`` resampled to its size.
        """
        return None

    def for_level(self, index: int, final: bool) -> Refiner:
        """The refiner that runs level ``index`` (``final`` for the last one); default: itself."""
        return self

    # -- tiling hooks (defaults: the engine's even grid, feathered blending, skip_rule) ---------
    skipped_tiles_weightless: bool = False
    """``True``: skipped tiles add nothing to the blend, and pixels no refined tile reached get
    :meth:`skip_output` of the coarse input (the official CascadePSP fallback)."""

    def plan_grid(self, shape: tuple[int, int], tile_size: int, overlap: int) -> GridPlan | None:
        """A grid of the refiner's own (e.g. the official CascadePSP patch grid), or ``None``."""
        return None

    def tile_weights(self, tile: Tile, plan: GridPlan) -> np.ndarray | None:
        """Blend weights ``(h, w)`` float32 >= 0 of a tile's window, or ``None`` for feathering."""
        return None

    def skip_test(self, coarse: np.ndarray) -> bool | None:
        """Decide from the coarse input ``(h, w, K)`` over the read window whether to skip the tile.

        Called only with :attr:`custom_skip`; ``None`` leaves it to :attr:`skip_rule`.
        """
        return None

    def out_channels(self, in_channels: int) -> int:
        """Channels of ``TileResult.prob`` for a coarse input of ``in_channels`` (default: the same)."""
        return in_channels

    def skip_output(self, coarse: np.ndarray) -> np.ndarray:
        """What a skipped tile outputs, from its coarse values ``(h, w, K)`` (default: them)."""
        return coarse

    def refine_batch(self, tiles: Sequence[TileInput]) -> list[TileResult]:
        """Refine several windows (batched on devices that benefit); default: one by one."""
        return [self.refine(t) for t in tiles]

    def tile_memory(self, pixels: int) -> int:
        """Working memory in bytes to refine one window of ``pixels`` px (estimate)."""
        return 64 * pixels

    def fixed_memory(self) -> int:
        """Memory in bytes held for the whole run (weights, caches)."""
        return 0

    def describe(self) -> dict[str, Any]:
        """Facts for the report: parameters, weights name and hash ..."""
        return {"name": self.name, "halo": self.halo}
