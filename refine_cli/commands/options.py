"""Command-line options shared by ``refine run`` and ``refine batch``, defined once.

:func:`run_options` adds every option that decides what a run computes and how its
files are written to a command, and hands the command one :class:`RunOptions` value in
its ``opts`` parameter; :meth:`RunOptions.config` turns it into a
:class:`~refine_cli.config.RefineConfig`. Options whose meaning differs between the
commands stay with each command: ``--mask``, ``--out``, ``--uncertainty`` and
``--report`` (paths for ``run``, a folder and switches for ``batch``) and ``--json``.

Used by: ``refine run`` (cli.py), ``refine batch`` (commands/batch.py). Defaults come from
``RefineConfig``, choices from the ``Literal`` types in ``refine_cli.config`` and the registries;
``--config run.toml`` supplies defaults from a file. The logging switches live in
``refine_cli.commands.console``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

from refine_cli.config import (
    GIB,
    AutoOnOff,
    Backend,
    CascadeGrid,
    CascadeOptions,
    CascadePad,
    CascadeSkip,
    EncodingOptions,
    GuidedOptions,
    MagnetOptions,
    MagnetStages,
    MaskKind,
    OnOff,
    Precision,
    RefineConfig,
    SoftDtype,
    parse_creation_options,
    parse_size,
)
from refine_cli.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])


TAIL = ("verbose", "quiet", "debug")
"""Parameters kept after the shared options in ``--help``."""


_D = RefineConfig()
"""The defaults: every option's default is read from here, so they live once, in ``RefineConfig``."""

OutputFormat = Literal["png", "tiff"]


@dataclass(frozen=True)
class RunOptions:
    """The parsed shared options, as typed on the command line (see ``refine run --help``)."""

    method: str = _D.method
    soft: bool = _D.soft
    threshold: float = _D.threshold
    classes: int | None = _D.classes
    mask_kind: MaskKind = _D.mask_kind
    device: str = _D.device
    max_memory: str = f"{_D.max_memory // GIB}G"
    tile_size: int | None = _D.tile_size
    overlap: int = _D.overlap
    no_skip: bool = not _D.skip_uniform
    radius: int | None = _D.guided.radius
    eps: float = _D.guided.eps
    cascade_size: int | None = _D.cascade.size
    fast: bool = _D.cascade.fast
    exact: bool | None = _D.cascade.exact
    cascade_grid: CascadeGrid = _D.cascade.grid
    cascade_skip: CascadeSkip = _D.cascade.skip
    cascade_pad: CascadePad = _D.cascade.pad
    cascade_snap: AutoOnOff = _D.cascade.snap
    segmenter: str | None = _D.segmenter
    preset: str | None = _D.magnet.preset
    full: bool = _D.magnet.full
    tiled: bool | None = _D.magnet.tiled
    magnet_snap: AutoOnOff = _D.magnet.snap
    magnet_stages: MagnetStages = _D.magnet.stages
    patches: int | None = _D.magnet.n_patches
    points: float | None = _D.magnet.n_points
    weights: str | None = _D.cascade.weights
    precision: Precision = _D.cascade.precision
    backend: Backend = _D.backend
    batch_size: int = _D.cascade.batch_size
    overwrite: bool = False
    fmt: OutputFormat | None = None
    cog: bool = False
    co: list[str] | str | None = None
    nodata: float | None = _D.encoding.nodata
    dtype: SoftDtype | None = _D.encoding.soft_dtype
    bands: str | None = None
    threads: int | None = _D.threads
    guard: OnOff = _D.guard
    max_shift: float | None = _D.max_shift
    max_pixels: float = float(_D.max_pixels)
    inline_limit: float = float(_D.inline_limit)

    def config(self) -> RefineConfig:
        """The run configuration (validated).

        Raises:
            UsageError: an invalid value (the message names the flag).
        """
        return RefineConfig(
            method=self.method, device=self.device, max_memory=parse_size(self.max_memory),
            tile_size=self.tile_size, overlap=self.overlap, skip_uniform=not self.no_skip,
            classes=self.classes, threshold=self.threshold, soft=self.soft, threads=self.threads,
            mask_kind=self.mask_kind, backend=self.backend, guard=self.guard, max_shift=self.max_shift,
            max_pixels=int(self.max_pixels), inline_limit=int(self.inline_limit),
            guided=GuidedOptions(radius=self.radius, eps=self.eps),
            cascade=CascadeOptions(size=self.cascade_size, fast=self.fast, weights=self.weights,
                                   precision=self.precision, batch_size=self.batch_size,
                                   exact=self.exact,
                                   grid=self.cascade_grid, skip=self.cascade_skip, pad=self.cascade_pad,
                                   snap=self.cascade_snap),
            segmenter=self.segmenter,
            magnet=MagnetOptions(preset=self.preset, full=self.full, weights=self.weights,
                                 n_patches=self.patches,
                                 n_points=self.points, tiled=self.tiled, snap=self.magnet_snap,
                                 stages=self.magnet_stages),
            encoding=EncodingOptions(creation=parse_creation_options(self.co), nodata=self.nodata,
                                     soft_dtype=self.dtype),
        )

    def band_indices(self) -> tuple[int, ...] | None:
        """``--bands`` as 0-based indices, or ``None``."""
        from refine_cli.io.readers import parse_bands

        return parse_bands(self.bands)


INPUT, OUTPUT, METHOD, MEMORY, ADVANCED = "Input", "Output", "Method", "Memory and speed", "Advanced"
"""The help panels of ``refine run --help`` and ``refine batch --help``."""


def _methods() -> list[str]:
    from refine_cli.refiners import list_refiners

    return list_refiners()


def _weights_names() -> list[str]:
    from refine_cli.weights import list_records

    return [r.name for r in list_records()]


def _segmenter_names() -> list[str]:
    from refine_cli.segmenters import list_segmenters

    return list_segmenters()


def _preset_names() -> list[str]:
    from refine_cli.refiners.magnet import PRESETS

    return list(PRESETS)


def _opt(kind: Any, flag: str, panel: str, complete: Callable[[], list[str]] | None = None, *,
         text: str) -> Any:
    """``Annotated[kind, typer.Option(flag, help=text, rich_help_panel=panel)]``; complete lists values."""
    extra: dict[str, Any] = {}
    if complete is not None:
        extra["autocompletion"] = lambda incomplete: [n for n in complete() if n.startswith(incomplete)]
    return Annotated[kind, typer.Option(flag, help=text, rich_help_panel=panel, **extra)]


def _method_help() -> str:
    from refine_cli.refiners import list_refiners

    return f"Refiner: {', '.join(list_refiners())} (see README, 'Which method?')."


OPTIONS: dict[str, Any] = {
    "method": _opt(str, "--method", METHOD, _methods, text=_method_help()),
    "soft": _opt(bool, "--soft", OUTPUT,
        text="Write probabilities (float32 TIFF / uint8 PNG) instead of a 0/255 mask."),
    "threshold": _opt(float, "--threshold", OUTPUT,
        text="Foreground probability threshold of the hard mask."),
    "classes": _opt(int | None, "--classes", INPUT,
        text="Treat the mask as a label map with this many classes."),
    "mask_kind": _opt(MaskKind, "--mask-kind", INPUT,
        text="How to read the mask's values: auto (detect; see README), binary (non-zero is foreground), "
        "soft (probabilities: uint8 v/255, uint16 v/65535, float as is), labels (class indices 0..C-1 "
        "refined per class, C from --classes or max+1) or instances (object ids, refined as one "
        "foreground)."),
    "guard": _opt(OnOff, "--guard", METHOD,
        text="on: keep the coarse mask wherever the refiner's change is implausible (beyond --max-shift "
        "of the coarse boundary, detached from it, or deleting a small object whole; counts in the "
        "report); off: the refiner's output as is."),
    "max_shift": _opt(float | None, "--max-shift", METHOD,
        text="guard: how far (px) the true boundary may lie from the coarse mask's (default: from the "
        "mask's resolution, see README)."),
    "device": _opt(str, "--device", MEMORY,
        text="auto, cpu, cuda or cuda:N."),
    "max_memory": _opt(str, "--max-memory", MEMORY,
        text="RAM budget, e.g. 2G or 1500M; tile size follows."),
    "tile_size": _opt(int | None, "--tile-size", MEMORY,
        text="Tile side in px (default: from the budget)."),
    "overlap": _opt(int, "--overlap", ADVANCED,
        text="Blend overlap between tiles, px."),
    "no_skip": _opt(bool, "--no-skip", ADVANCED,
        text="Refine every tile, also where the coarse mask is uniform."),
    "radius": _opt(int | None, "--radius", METHOD,
        text="guided/fgs: filter radius in px (default: from the resolution)."),
    "eps": _opt(float, "--eps", METHOD,
        text="guided: regularisation (smaller follows edges more)."),
    "cascade_size": _opt(int | None, "--cascade-size", METHOD,
        text="cascade: working size L of global step and patches (default: the weights' own, 900 "
        "official, 640 lite)."),
    "fast": _opt(bool, "--fast", METHOD,
        text="cascade: global step only."),
    "exact": Annotated[bool | None, typer.Option("--exact/--streamed", show_default=False,
                                                 rich_help_panel=METHOD,
                                                 help="cascade: force the official whole-image procedure or "
                                                 "the streamed pyramid (default: exact when it fits "
                                                 "--max-memory).")],
    "cascade_grid": _opt(CascadeGrid, "--cascade-grid", ADVANCED,
        text="cascade, streamed: official patch grid (overlaps averaged, as the official local step) or "
        "feather (fewer tiles, faster)."),
    "cascade_skip": _opt(CascadeSkip, "--cascade-skip", ADVANCED,
        text="cascade, streamed: official (skip windows under 10 % or over 90 % foreground, as the "
        "official code; default) or boundary (skip windows without a boundary)."),
    "cascade_pad": _opt(CascadePad, "--cascade-pad", ADVANCED,
        text="cascade: padding of network inputs to a multiple of 8: auto (the weights' own: official "
        "for the official weights, replicate for the bundled lite ones), official (mean colour / "
        "background) or replicate (edge pixels)."),
    "cascade_snap": _opt(AutoOnOff, "--cascade-snap", METHOD,
        text="cascade: finish by moving the boundary onto the image's colour edges (guided filter, "
        "radius 8): auto (on for the bundled lite weights, off for the official ones), on or off."),
    "segmenter": _opt(str | None, "--segmenter", INPUT, _segmenter_names,
        text="Without --mask: make the coarse mask with this segmenter first (a name, e.g. "
        "mediapipe-selfie, see `refine weights list`, or a .onnx/.tflite/TorchScript file + sidecar "
        "JSON); for magnet-fast, its segmenter."),
    "preset": _opt(str | None, "--preset", METHOD, _preset_names,
        text="magnet-fast: cityscapes, deepglobe or binary (default: from the segmenter)."),
    "full": _opt(bool, "--full", METHOD,
        text="magnet-fast: full MagNet (every patch at every scale) instead of MagNet-Fast."),
    "tiled": Annotated[bool | None, typer.Option("--tiled/--whole", show_default=False,
                                                 rich_help_panel=MEMORY,
                                                 help="magnet-fast: force the tiled pipeline (bounded "
                                                 "memory) or the whole-image one (default: whole when it "
                                                 "fits --max-memory).")],
    "magnet_snap": _opt(AutoOnOff, "--magnet-snap", METHOD,
        text="magnet-fast: finish a binary result by moving its boundary onto the image's colour edges: "
        "auto (on for --preset binary), on or off."),
    "magnet_stages": _opt(MagnetStages, "--magnet-stages", METHOD,
        text="magnet-fast: all (the refinement scales) or none (the segmenter's pass, then the snap: "
        "several times faster)."),
    "patches": _opt(int | None, "--patches", ADVANCED,
        text="magnet-fast: patches refined per scale (default: the preset's)."),
    "points": _opt(float | None, "--points", ADVANCED,
        text="magnet-fast: points replaced per scale (count, or a fraction <= 1)."),
    "weights": _opt(str | None, "--weights", METHOD, _weights_names,
        text="Checkpoint file or registry name (see `refine weights list`)."),
    "precision": _opt(Precision, "--precision", MEMORY,
        text="fp32, fp16 or bf16 (autocast)."),
    "backend": _opt(Backend, "--backend", MEMORY,
        text="Inference engine of the networks (cascade, magnet-fast): auto (the fastest installed on "
        "the CPU: onnx, then openvino, then torch; torch on CUDA or with fp16/bf16), torch, onnx "
        "(onnxruntime) or openvino."),
    "batch_size": _opt(int, "--batch-size", MEMORY,
        text="Patches per forward pass."),
    "overwrite": _opt(bool, "--overwrite", OUTPUT,
        text="Replace existing outputs."),
    "fmt": _opt(OutputFormat | None, "--format", OUTPUT,
        text="Output format (default: from the extension; png for -)."),
    "cog": _opt(bool, "--cog", OUTPUT,
        text="Write Cloud-Optimised GeoTIFFs (with overviews)."),
    "co": Annotated[list[str] | None, typer.Option(
        "--co", rich_help_panel=OUTPUT, metavar="KEY=VAL", show_default=False,
        help="GDAL creation option KEY=VAL of every TIFF output (repeatable, or comma-separated: "
        "COMPRESS=ZSTD,PREDICTOR=2,BLOCKXSIZE=256,BLOCKYSIZE=256); the GTiff driver's names, the COG "
        "driver's with --cog (BLOCKSIZE, LEVEL, OVERVIEW_RESAMPLING ...). Not given: deflate, 512 px "
        "tiles.")],
    "nodata": _opt(float | None, "--nodata", OUTPUT,
        text="Nodata tag of the TIFF outputs (a tag only: every pixel holds a computed value; see README)."),
    "dtype": _opt(SoftDtype | None, "--dtype", OUTPUT,
        text="Samples of the soft outputs (--soft mask, --uncertainty): uint8 (0-255 = 0-1), uint16 "
        "(0-65535 = 0-1) or float32 (0-1). Default: float32 soft TIFF, uint8 PNG and uncertainty."),
    "bands": _opt(str | None, "--bands", INPUT,
        text="Image bands to use as RGB, 1-based, e.g. 3,2,1."),
    "threads": _opt(int | None, "--threads", MEMORY,
        text="CPU threads (default: $REFINE_THREADS, else the cores this process may use)."),
    "max_pixels": _opt(float, "--max-pixels", ADVANCED,
        text="Refuse images declaring more pixels than this."),
    "inline_limit": _opt(float, "--inline-limit", ADVANCED,
        text="PNG/JPEG images above this many pixels are cached as tiled TIFF first."),
}
"""Parameter name → annotated type with its Typer option; defaults come from :class:`RunOptions`."""


CONFIG_OPTION = Annotated[Path | None, typer.Option(
    "--config", rich_help_panel=ADVANCED, show_default=False,
    help="TOML file of option defaults (keys are option names: method = \"cascade\", max-memory = \"4G\"); "
    "options on the command line win.")]


def _flag_names() -> dict[str, str]:
    """Option name as written in a config file (flag without dashes, or the parameter name) -> parameter."""
    names = {}
    for name, ann in OPTIONS.items():
        info = ann.__metadata__[0]
        first = [info.default] if isinstance(info.default, str) and info.default.startswith("-") else []
        for decl in [*first, *(info.param_decls or ())]:
            names[decl.split("/")[0].lstrip("-")] = name
        names[name] = name
    return names


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a TOML value fits a :class:`RunOptions` field's type (Literal values are checked later)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_accepts(args[0], v) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    if typing.get_origin(hint) is Literal:
        return isinstance(value, str)
    return any(_accepts(a, value) for a in args if a is not type(None))


def read_run_config(path: str | Path) -> dict[str, Any]:
    """The option values of a ``--config`` TOML file, by :class:`RunOptions` field name.

    Raises:
        UsageError: unreadable TOML, an unknown option name, or a value of the wrong type.
    """
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path} is not valid TOML ({exc}); fix the file") from None
    names, hints = _flag_names(), typing.get_type_hints(RunOptions)
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = names.get(key)
        if name is None:
            raise UsageError(f"--config {path}: unknown option {key!r}; use the names of `refine run --help` "
                             "without the dashes, e.g. max-memory = \"4G\"")
        if not _accepts(hints[name], value):
            raise UsageError(f"--config {path}: {key} = {value!r} has the wrong type for --{key}")
        values[name] = value
    return values


def run_options(func: F) -> F:
    """Decorator: add the shared options to a Typer command and pass them as ``opts: RunOptions``.

    The command declares its own parameters plus ``opts``; the decorated function's
    signature (what Typer reads) has the command's parameters, then every entry of
    :data:`OPTIONS` and ``--config``, then ``verbose``/``quiet``/``debug`` if the command has
    them. A ``--config`` file's values replace the defaults of the options not given on the
    command line. Apply it below ``@app.command(...)``.

    Raises:
        TypeError: the command has no ``opts`` parameter or declares a shared option itself.
    """
    sig = inspect.signature(func, eval_str=True)
    if "opts" not in sig.parameters:
        raise TypeError(f"{func.__name__} needs an `opts: RunOptions` parameter to use @run_options")
    kw = inspect.Parameter.KEYWORD_ONLY
    own = [p.replace(kind=kw) for p in sig.parameters.values() if p.name != "opts"]
    clash = sorted({p.name for p in own} & {*OPTIONS, "config_file", "run_context"})
    if clash:
        raise TypeError(f"{func.__name__} declares shared options itself: {', '.join(clash)}")
    defaults = {f.name: f.default for f in dataclasses.fields(RunOptions)}
    shared = [inspect.Parameter(name, kw, default=defaults[name], annotation=ann)
              for name, ann in OPTIONS.items()]
    shared.append(inspect.Parameter("config_file", kw, default=None, annotation=CONFIG_OPTION))
    context = inspect.Parameter("run_context", kw, annotation=typer.Context)
    params = [context, *(p for p in own if p.name not in TAIL), *shared, *(p for p in own if p.name in TAIL)]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx: typer.Context | None = kwargs.pop("run_context", None)
        config_file: Path | None = kwargs.pop("config_file", None)
        values = {name: kwargs.pop(name, defaults[name]) for name in OPTIONS}
        if config_file is not None:
            for name, value in read_run_config(config_file).items():
                source = ctx.get_parameter_source(name) if ctx is not None else None
                if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
                    values[name] = value
        return func(*args, opts=RunOptions(**values), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper  # type: ignore[return-value]


VectorFormatOpt = Annotated[str | None, typer.Option(
    "--vector-format", rich_help_panel=OUTPUT,
    help="Polygon file format: gpkg, geojson, fgb or parquet (GeoParquet); default from the extension.")]
SimplifyOpt = Annotated[str | None, typer.Option(
    "--simplify", rich_help_panel=OUTPUT, metavar="TOL",
    help="Simplify polygons (topology-preserving, per polygon) by TOL map units, or TOLpx pixels.")]
MinAreaOpt = Annotated[str | None, typer.Option(
    "--min-area", rich_help_panel=OUTPUT, metavar="A",
    help="Drop polygons smaller than A map units², or Apx pixels.")]
"""The polygon options of ``refine run --vector``, ``refine batch --vector-dir`` and ``refine vectorize``."""
