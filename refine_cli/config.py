"""Run configuration: frozen dataclasses and their validation. No IO.

Value conventions, defined here once for the whole package:

* **Images** reach refiners as ``(h, w, 3)`` uint8 RGB (HWC). Readers convert
  grey, RGBA, 16-bit and float inputs to that (see ``io.readers``).
* **Probabilities** are float32 in ``[0, 1]``: ``(h, w)`` for a binary mask
  (probability of foreground) and ``(h, w, C)`` for C classes.
* **Hard masks** on disk are uint8 ``{0, 255}`` (:data:`MASK_FG`); a pixel is
  foreground when its probability is ``>= threshold`` (default 0.5).
* **Label maps** are integer class indices ``0 .. C-1`` (uint8, or uint16 when C > 256).
* **Uncertainty** maps are float32 in ``[0, 1]`` inside the library and uint8
  ``0..255`` on disk (255 = most uncertain). The definition is per method and
  documented on each refiner.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from refine_cli.errors import UsageError

MASK_FG = 255
"""Value of a foreground pixel in a hard mask written to disk."""

MASK_BG = 0
"""Value of a background pixel in a hard mask written to disk."""

DEFAULT_THRESHOLD = 0.5
"""Probability at or above which a pixel is foreground."""

GIB = 1024**3
MIB = 1024**2

MIN_MAX_MEMORY = 512 * MIB
"""The smallest ``--max-memory``: the engine's fixed items alone (``tiling.budget``: 350 MiB base +
2 x 64 MiB block caches) plan about 480 MiB for the smallest image; ``tests/test_memory.py``
checks that a run at this budget fits."""

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
MaskKind = Literal["auto", "binary", "soft", "labels", "instances"]
"""How a coarse mask's values are read (``--mask-kind``; see ``refine_cli.io.masks``)."""
Precision = Literal["fp32", "fp16", "bf16"]
"""Network precision (``--precision``): fp32, or autocast to fp16 (CUDA) / bf16."""
Backend = Literal["auto", "torch", "onnx", "openvino"]
"""Inference engine of the networks, CascadePSP's and MagNet's (``--backend``): ``auto`` picks the fastest
installed on the CPU (ONNX Runtime, then OpenVINO, then torch) and torch on CUDA or with fp16/bf16."""
OnOff = Literal["on", "off"]
AutoOnOff = Literal["auto", "on", "off"]
"""``auto`` follows the weights' or preset's own choice."""
CascadeGrid = Literal["official", "feather"]
CascadeSkip = Literal["official", "boundary"]
CascadePad = Literal["auto", "official", "replicate"]
MagnetStages = Literal["all", "none"]
SoftDtype = Literal["uint8", "uint16", "float32"]
"""Sample type of the soft outputs (``--dtype``): probabilities and uncertainty, scaled as
:data:`SOFT_SCALE` says."""

SOFT_SCALE = {"uint8": 255, "uint16": 65535, "float32": 1}
"""On-disk value of probability (or uncertainty) 1.0 per ``--dtype``: ``round(p * scale)`` for the
integer types (uint8 0..255 = 0..1, uint16 0..65535 = 0..1), ``p`` itself for float32."""

PRECISIONS: tuple[str, ...] = get_args(Precision)
MASK_KINDS: tuple[str, ...] = get_args(MaskKind)
"""Values of ``--mask-kind``."""


def check_choice(flag: str, value: object, kind: object) -> None:
    """Reject ``value`` unless it is one of the values of the ``Literal`` type ``kind``.

    Raises:
        UsageError: ``--flag 'value': use a, b or c``.
    """
    options = [str(o) for o in get_args(kind)]
    if value not in options:
        raise UsageError(f"{flag} {value!r}: use {', '.join(options[:-1])} or {options[-1]}")


def check_mask_kind(kind: str, classes: int | None) -> None:
    """Reject an unknown ``--mask-kind`` and one that contradicts ``--classes``.

    Raises:
        UsageError: one line naming the flags.
    """
    if kind not in MASK_KINDS:
        raise UsageError(f"--mask-kind {kind!r} is not valid: use one of {', '.join(MASK_KINDS)}")
    if classes is not None and kind not in ("auto", "labels"):
        raise UsageError(f"--classes {classes} declares a label map but --mask-kind {kind} says otherwise: "
                         "drop one of them")


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``2G``, ``1500M``, ``512MiB`` or a plain integer.

    Returns:
        Bytes (int > 0).
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise UsageError(f"cannot read size {text!r}: use e.g. 2G, 1500M or 512MiB")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": MIB, "g": GIB, "t": 1024 * GIB}[m.group(2)]
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return int(value)


@dataclass(frozen=True)
class GuidedOptions:
    """Options of ``--method guided`` (and ``fgs``).

    Attributes:
        radius: guided-filter radius at full resolution, px; ``None`` derives it
            from the image size and the coarse mask's resolution.
        eps: regularisation (guide in [0, 1] units); smaller follows edges more tightly.
    """

    radius: int | None = None
    eps: float = 1e-2


@dataclass(frozen=True)
class CascadeOptions:
    """Options of ``--method cascade`` (CascadePSP).

    Attributes:
        size: working size L of the global step and of local patches; ``None`` takes the
            weights' own (900 for the official weights, as the paper; 640 for the lite ones).
        fast: global step only (the pip package's ``fast=True``).
        weights: a checkpoint file or registry name; ``None`` picks the default.
        precision: ``fp32`` | ``fp16`` | ``bf16`` (autocast; fp16 only on CUDA).
        batch_size: local patches per forward pass.
        exact: ``True`` forces the official whole-image procedure, ``False`` the
            streamed cascade, ``None`` lets the memory budget decide.
        grid: streamed local steps on the ``official`` patch grid (step ``L // 2 - 32``,
            overlaps averaged, 16-px trims) or a ``feather`` grid (fewer, feathered tiles: faster).
        skip: streamed local steps skip windows as the ``official`` code does (under 10 % or
            over 90 % foreground; with the official grid the streamed result then equals the
            exact one on a 4K image, ``benchmarks/cascade_paths.py``), or windows with no
            ``boundary`` of the mask (refines thin structures the official rule skips).
        pad: how network inputs are padded to a multiple of 8: ``auto`` (the weights' own
            convention: ``official`` for the official architecture, ``replicate`` for the
            lite one), ``official`` (mean colour / background) or ``replicate`` (edge pixels).
        snap: a last full-resolution step that moves the refined boundary onto the image's colour
            edges (``refiners.classical.EdgeSnapRefiner``, binary masks): ``auto`` (the weights'
            own: ``off`` for the official weights, ``on`` for the lite ones), ``on`` or ``off``.
    """

    size: int | None = None
    fast: bool = False
    weights: str | None = None
    precision: Precision = "fp32"
    batch_size: int = 1
    exact: bool | None = None
    grid: CascadeGrid = "official"
    skip: CascadeSkip = "official"
    pad: CascadePad = "auto"
    snap: AutoOnOff = "auto"


@dataclass(frozen=True)
class MagnetOptions:
    """Options of ``--method magnet-fast``.

    Attributes:
        preset: ``cityscapes`` | ``deepglobe`` | ``binary`` | ``None`` (from the segmenter).
        full: all patches at all scales (full MagNet) instead of MagNet-Fast.
        weights: refinement-module checkpoint (file or registry name).
        n_patches: patches refined per scale (MagNet-Fast).
        n_points: points replaced per scale.
        tiled: ``True`` forces the tiled pipeline (Y in tiled stores on disk, bounded memory),
            ``False`` the whole-image one, ``None`` picks whole-image when it fits ``max_memory``.
        snap: a last full-resolution edge snap of a binary result (a colour guided filter that moves
            the boundary onto the image's edges): ``auto`` (on for the ``binary`` preset), ``on`` or ``off``.
        stages: ``all`` (MagNet's refinement scales after the segmenter's pass) or ``none`` (the
            segmenter's pass only, then the snap: several times faster).
    """

    preset: str | None = None
    full: bool = False
    weights: str | None = None
    n_patches: int | None = None
    n_points: float | None = None
    tiled: bool | None = None
    snap: AutoOnOff = "auto"
    stages: MagnetStages = "all"


def parse_creation_options(values: list[str] | tuple[str, ...] | str | None) -> tuple[tuple[str, str], ...]:
    """``--co KEY=VAL`` values (each may hold a comma-separated list) to ``((KEY, VAL), ...)``.

    Keys are upper-cased (GDAL's names are case-insensitive); a later value of a key wins and
    the order of first appearance is kept. Values are kept as written.

    Raises:
        UsageError: an item without ``=`` or with an empty key.
    """
    if values is None:
        return ()
    items = [values] if isinstance(values, str) else list(values)
    out: dict[str, str] = {}
    for text in items:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, val = part.partition("=")
            if not sep or not key.strip():
                raise UsageError(f"--co {part!r}: give KEY=VALUE, e.g. --co COMPRESS=ZSTD (several: "
                                 "--co COMPRESS=ZSTD,PREDICTOR=2)")
            out[key.strip().upper()] = val.strip()
    return tuple(out.items())


@dataclass(frozen=True)
class EncodingOptions:
    """How the TIFF outputs are encoded (they change the files' bytes, and soft values' scale).

    Attributes:
        creation: GDAL creation options ``((KEY, VALUE), ...)``, keys upper-case, applied to every
            TIFF/COG output over the defaults (``io.writers``); checked against the driver there.
        nodata: value written as the outputs' nodata tag, and in every output where the image's alpha
            is 0 (elsewhere every pixel holds a computed value), or ``None`` for neither.
        soft_dtype: sample type of the soft mask and the uncertainty map (see :data:`SOFT_SCALE`);
            ``None`` keeps the defaults (soft mask float32 in TIFF and uint8 in PNG, uncertainty uint8).
    """

    creation: tuple[tuple[str, str], ...] = ()
    nodata: float | None = None
    soft_dtype: SoftDtype | None = None

    def __post_init__(self) -> None:
        if self.soft_dtype is not None:
            check_choice("--dtype", self.soft_dtype, SoftDtype)

    @property
    def is_default(self) -> bool:
        """No option given (the files are encoded as before these options existed)."""
        return not self.creation and self.nodata is None and self.soft_dtype is None


@dataclass(frozen=True)
class RefineConfig:
    """Everything that decides what a run computes.

    Attributes:
        method: refiner name (see ``refine_cli.refiners.list_refiners()``).
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        max_memory: RAM budget in bytes; tile size and queue depth follow from it.
        tile_size: tile side in px; ``None`` derives it from the budget.
        overlap: minimum overlap (= feather width) between tiles, px.
        skip_uniform: copy tiles whose coarse mask is uniform within the halo
            instead of running the refiner (boundary-only processing).
        classes: number of classes of a label-map mask; ``None`` detects it.
        mask_kind: how the mask's values are read: ``auto`` (detect), ``binary`` (non-zero is
            foreground), ``soft`` (probabilities at the dtype scale), ``labels`` (class indices,
            refined per class) or ``instances`` (object ids, refined as one foreground).
        threshold: probability at or above which a pixel is foreground.
        soft: write probabilities instead of a hard mask.
        segmenter: coarse segmenter name or path, used when no mask is given.
        inline_limit: images up to this many pixels in formats without windowed
            reads (PNG, JPEG, stripped TIFF) are kept in memory; larger ones are
            converted once to a tiled temporary file.
        max_pixels: refuse images declaring more pixels than this (decompression-bomb guard).
        threads: CPU threads for torch/OpenCV; ``None`` uses all cores.
        backend: inference engine of the networks: ``auto`` | ``torch`` | ``onnx`` | ``openvino``
            (see :data:`Backend`).
        guard: ``on``: the do-no-harm guard holds back the refiner's changes that lie beyond the
            coarse mask's error band, detach from its boundary, or delete a small component whole
            (``refine_cli.refiners.guard``); ``off``: the refiner's output as is.
        max_shift: the guard's band, px: how far the true boundary may lie from the coarse one;
            ``None`` derives it from the mask's resolution.
        guided: options of the guided filter.
        cascade: options of CascadePSP.
        magnet: options of MagNet-Fast.
        encoding: how the outputs are encoded (``--co``, ``--nodata``, ``--dtype``).
    """

    method: str = "guided"
    device: str = "auto"
    max_memory: int = 2 * GIB
    tile_size: int | None = None
    overlap: int = 64
    skip_uniform: bool = True
    classes: int | None = None
    mask_kind: MaskKind = "auto"
    threshold: float = DEFAULT_THRESHOLD
    soft: bool = False
    segmenter: str | None = None
    inline_limit: int = 64_000_000
    max_pixels: int = 50_000_000_000
    threads: int | None = None
    backend: Backend = "auto"
    guard: OnOff = "on"
    max_shift: float | None = None
    guided: GuidedOptions = field(default_factory=GuidedOptions)
    cascade: CascadeOptions = field(default_factory=CascadeOptions)
    magnet: MagnetOptions = field(default_factory=MagnetOptions)
    encoding: EncodingOptions = field(default_factory=EncodingOptions)

    def __post_init__(self) -> None:
        if not DEVICE_PATTERN.match(self.device):
            raise UsageError(f"--device {self.device!r} is not valid: use auto, cpu, cuda or cuda:N")
        if self.max_memory < MIN_MAX_MEMORY:
            floor = MIN_MAX_MEMORY // MIB
            raise UsageError(f"--max-memory {self.max_memory // MIB}M is below the smallest budget a run "
                             f"fits in ({floor}M: Python, NumPy, OpenCV, torch and the writers' caches); "
                             f"give --max-memory {floor}M or more")
        if self.tile_size is not None and self.tile_size < 64:
            raise UsageError(f"--tile-size {self.tile_size} is too small: use 64 or more")
        if self.overlap < 0:
            raise UsageError("--overlap must be >= 0")
        if self.tile_size is not None and self.overlap >= self.tile_size // 2:
            raise UsageError(f"--overlap {self.overlap} must be below half the tile size ({self.tile_size})")
        if not 0.0 < self.threshold < 1.0:
            raise UsageError(f"--threshold {self.threshold} must be strictly between 0 and 1")
        if self.classes is not None and not 2 <= self.classes <= 65535:
            raise UsageError(f"--classes {self.classes} must be between 2 and 65535")
        check_mask_kind(self.mask_kind, self.classes)
        if self.max_shift is not None and not self.max_shift > 0:
            raise UsageError(f"--max-shift {self.max_shift} must be > 0 px")
        if self.cascade.size is not None and (self.cascade.size < 66 or self.cascade.size % 2):
            raise UsageError(f"--cascade-size {self.cascade.size} must be an even number >= 66")
        for flag, value, kind in (("--guard", self.guard, OnOff),
                                  ("--precision", self.cascade.precision, Precision),
                                  ("--backend", self.backend, Backend),
                                  ("--cascade-grid", self.cascade.grid, CascadeGrid),
                                  ("--cascade-skip", self.cascade.skip, CascadeSkip),
                                  ("--cascade-pad", self.cascade.pad, CascadePad),
                                  ("--cascade-snap", self.cascade.snap, AutoOnOff),
                                  ("--magnet-snap", self.magnet.snap, AutoOnOff),
                                  ("--magnet-stages", self.magnet.stages, MagnetStages)):
            check_choice(flag, value, kind)
        if self.cascade.batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        if self.guided.radius is not None and self.guided.radius < 1:
            raise UsageError("--radius must be >= 1")
        if self.guided.eps <= 0:
            raise UsageError("--eps must be > 0")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view (for reports and config hashes)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RefineConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
