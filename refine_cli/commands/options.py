"""Command-line options shared by ``refine run`` and ``refine batch``, defined once.

:func:`run_options` adds every option that decides what a run computes and how its
files are written to a command, and hands the command one :class:`RunOptions` value in
its ``opts`` parameter; :meth:`RunOptions.config` turns it into a
:class:`~refine_cli.config.RefineConfig`. Options whose meaning differs between the
commands stay with each command: ``--mask``, ``--out``, ``--uncertainty`` and
``--report`` (paths for ``run``, a folder and switches for ``batch``) and ``--json``.

Used by: ``refine run`` (cli.py), ``refine batch`` (commands/batch.py). The logging
switches :data:`Verbose`, :data:`Quiet` and :data:`Debug` are shared the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from refine_cli.config import CascadeOptions, GuidedOptions, MagnetOptions, RefineConfig, parse_size

F = TypeVar("F", bound=Callable[..., Any])


TAIL = ("verbose", "quiet", "debug")
"""Parameters kept after the shared options in ``--help``."""


@dataclass(frozen=True)
class RunOptions:
    """The parsed shared options, as typed on the command line (see ``refine run --help``)."""

    method: str = "guided"
    soft: bool = False
    threshold: float = 0.5
    classes: int | None = None
    mask_kind: str = "auto"
    device: str = "auto"
    max_memory: str = "2G"
    tile_size: int | None = None
    overlap: int = 64
    no_skip: bool = False
    radius: int | None = None
    eps: float = 1e-2
    cascade_size: int | None = None
    fast: bool = False
    exact: bool | None = None
    cascade_grid: str = "official"
    cascade_skip: str = "official"
    cascade_pad: str = "auto"
    cascade_snap: str = "auto"
    segmenter: str | None = None
    preset: str | None = None
    full: bool = False
    tiled: bool | None = None
    magnet_snap: str = "auto"
    magnet_stages: str = "all"
    patches: int | None = None
    points: float | None = None
    weights: str | None = None
    precision: str = "fp32"
    batch_size: int = 1
    overwrite: bool = False
    fmt: str | None = None
    cog: bool = False
    bands: str | None = None
    threads: int | None = None
    guard: str = "on"
    max_shift: float | None = None
    max_pixels: float = 5e10
    inline_limit: float = 6.4e7

    def config(self) -> RefineConfig:
        """The run configuration (validated).

        Raises:
            UsageError: an invalid value (the message names the flag).
        """
        return RefineConfig(
            method=self.method, device=self.device, max_memory=parse_size(self.max_memory),
            tile_size=self.tile_size, overlap=self.overlap, skip_uniform=not self.no_skip,
            classes=self.classes, threshold=self.threshold, soft=self.soft, threads=self.threads,
            mask_kind=self.mask_kind, guard=self.guard, max_shift=self.max_shift,
            max_pixels=int(self.max_pixels), inline_limit=int(self.inline_limit),
            guided=GuidedOptions(radius=self.radius, eps=self.eps),
            cascade=CascadeOptions(size=self.cascade_size, fast=self.fast, weights=self.weights,
                                   precision=self.precision, batch_size=self.batch_size, exact=self.exact,
                                   grid=self.cascade_grid, skip=self.cascade_skip, pad=self.cascade_pad,
                                   snap=self.cascade_snap),
            segmenter=self.segmenter,
            magnet=MagnetOptions(preset=self.preset, full=self.full, weights=self.weights, n_patches=self.patches,
                                 n_points=self.points, tiled=self.tiled, snap=self.magnet_snap,
                                 stages=self.magnet_stages),
        )

    def band_indices(self) -> tuple[int, ...] | None:
        """``--bands`` as 0-based indices, or ``None``."""
        from refine_cli.io.readers import parse_bands

        return parse_bands(self.bands)


def _opt(kind: Any, flag: str, text: str) -> Any:
    """``Annotated[kind, typer.Option(flag, help=text)]``."""
    return Annotated[kind, typer.Option(flag, help=text)]


OPTIONS: dict[str, Any] = {
    "method": _opt(str, "--method", "Refiner: guided, fgs, coarse, densecrf, cascade, magnet-fast (see README, 'Which method?')."),
    "soft": _opt(bool, "--soft", "Write probabilities (float32 TIFF / uint8 PNG) instead of a 0/255 mask."),
    "threshold": _opt(float, "--threshold", "Foreground probability threshold of the hard mask."),
    "classes": _opt(int | None, "--classes", "Treat the mask as a label map with this many classes."),
    "mask_kind": _opt(str, "--mask-kind", "How to read the mask's values: auto (detect; see README), "
                      "binary (non-zero is foreground), soft (probabilities: uint8 v/255, uint16 v/65535, "
                      "float as is), labels (class indices 0..C-1 refined per class, C from --classes or "
                      "max+1) or instances (object ids, refined as one foreground)."),
    "guard": _opt(str, "--guard", "on: keep the coarse mask wherever the refiner's change is implausible "
                  "(beyond --max-shift of the coarse boundary, detached from it, or deleting a small object "
                  "whole; counts in the report); off: the refiner's output as is."),
    "max_shift": _opt(float | None, "--max-shift", "guard: how far (px) the true boundary may lie from the "
                      "coarse mask's (default: from the mask's resolution, see README)."),
    "device": _opt(str, "--device", "auto, cpu, cuda or cuda:N."),
    "max_memory": _opt(str, "--max-memory", "RAM budget, e.g. 2G or 1500M; tile size follows."),
    "tile_size": _opt(int | None, "--tile-size", "Tile side in px (default: from the budget)."),
    "overlap": _opt(int, "--overlap", "Blend overlap between tiles, px."),
    "no_skip": _opt(bool, "--no-skip", "Refine every tile, also where the coarse mask is uniform."),
    "radius": _opt(int | None, "--radius", "guided/fgs: filter radius in px (default: from the resolution)."),
    "eps": _opt(float, "--eps", "guided: regularisation (smaller follows edges more)."),
    "cascade_size": _opt(int | None, "--cascade-size", "cascade: working size L of global step and patches "
                         "(default: the weights' own, 900 official, 640 lite)."),
    "fast": _opt(bool, "--fast", "cascade: global step only."),
    "exact": Annotated[bool | None, typer.Option("--exact/--streamed", show_default=False,
                                                 help="cascade: force the official whole-image procedure or "
                                                 "the streamed pyramid (default: exact when it fits "
                                                 "--max-memory).")],
    "cascade_grid": _opt(str, "--cascade-grid", "cascade, streamed: official patch grid (overlaps averaged, "
                         "as the official local step) or feather (fewer tiles, faster)."),
    "cascade_skip": _opt(str, "--cascade-skip", "cascade, streamed: official (skip windows under 10 % or over 90 % "
                         "foreground, as the official code; default) or boundary (skip windows without a boundary)."),
    "cascade_pad": _opt(str, "--cascade-pad", "cascade: padding of network inputs to a multiple of 8: auto (the "
                        "weights' own: official for the official weights, replicate for the bundled lite ones), "
                        "official (mean colour / background) or replicate (edge pixels)."),
    "cascade_snap": _opt(str, "--cascade-snap", "cascade: finish by moving the boundary onto the image's "
                         "colour edges (guided filter, radius 8): auto (on for the bundled lite weights, off "
                         "for the official ones), on or off."),
    "segmenter": _opt(str | None, "--segmenter", "Without --mask: make the coarse mask with this segmenter "
                      "first (a name, e.g. mediapipe-selfie, see `refine weights list`, or a .onnx/.tflite/"
                      "TorchScript file + sidecar JSON); for magnet-fast, its segmenter."),
    "preset": _opt(str | None, "--preset", "magnet-fast: cityscapes, deepglobe or binary (default: from the "
                   "segmenter)."),
    "full": _opt(bool, "--full", "magnet-fast: full MagNet (every patch at every scale) instead of MagNet-Fast."),
    "tiled": Annotated[bool | None, typer.Option("--tiled/--whole", show_default=False,
                                                 help="magnet-fast: force the tiled pipeline (bounded memory) or "
                                                 "the whole-image one (default: whole when it fits --max-memory).")],
    "magnet_snap": _opt(str, "--magnet-snap", "magnet-fast: finish a binary result by moving its boundary "
                        "onto the image's colour edges: auto (on for --preset binary), on or off."),
    "magnet_stages": _opt(str, "--magnet-stages", "magnet-fast: all (the refinement scales) or none (the "
                          "segmenter's pass, then the snap: several times faster)."),
    "patches": _opt(int | None, "--patches", "magnet-fast: patches refined per scale (default: the preset's)."),
    "points": _opt(float | None, "--points", "magnet-fast: points replaced per scale (count, or a fraction <= 1)."),
    "weights": _opt(str | None, "--weights", "Checkpoint file or registry name (see `refine weights list`)."),
    "precision": _opt(str, "--precision", "fp32, fp16 or bf16 (autocast)."),
    "batch_size": _opt(int, "--batch-size", "Patches per forward pass."),
    "overwrite": _opt(bool, "--overwrite", "Replace existing outputs."),
    "fmt": _opt(str | None, "--format",
                "Output format png or tiff (default: from the extension; png for -)."),
    "cog": _opt(bool, "--cog", "Write Cloud-Optimised GeoTIFFs (with overviews)."),
    "bands": _opt(str | None, "--bands", "Image bands to use as RGB, 1-based, e.g. 3,2,1."),
    "threads": _opt(int | None, "--threads", "CPU threads (default: all cores)."),
    "max_pixels": _opt(float, "--max-pixels", "Refuse images declaring more pixels than this."),
    "inline_limit": _opt(float, "--inline-limit",
                         "PNG/JPEG images above this many pixels are cached as tiled TIFF first."),
}
"""Parameter name → annotated type with its Typer option; defaults come from :class:`RunOptions`."""


def run_options(func: F) -> F:
    """Decorator: add the shared options to a Typer command and pass them as ``opts: RunOptions``.

    The command declares its own parameters plus ``opts``; the decorated function's
    signature (what Typer reads) has the command's parameters, then every entry of
    :data:`OPTIONS`, then ``verbose``/``quiet``/``debug`` if the command has them. Apply it
    below ``@app.command(...)``.

    Raises:
        TypeError: the command has no ``opts`` parameter or declares a shared option itself.
    """
    sig = inspect.signature(func, eval_str=True)
    if "opts" not in sig.parameters:
        raise TypeError(f"{func.__name__} needs an `opts: RunOptions` parameter to use @run_options")
    kw = inspect.Parameter.KEYWORD_ONLY
    own = [p.replace(kind=kw) for p in sig.parameters.values() if p.name != "opts"]
    clash = sorted({p.name for p in own} & set(OPTIONS))
    if clash:
        raise TypeError(f"{func.__name__} declares shared options itself: {', '.join(clash)}")
    defaults = {f.name: f.default for f in dataclasses.fields(RunOptions)}
    shared = [inspect.Parameter(name, kw, default=defaults[name], annotation=ann)
              for name, ann in OPTIONS.items()]
    params = [p for p in own if p.name not in TAIL] + shared + [p for p in own if p.name in TAIL]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name, defaults[name]) for name in OPTIONS}
        return func(*args, opts=RunOptions(**values), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper  # type: ignore[return-value]
