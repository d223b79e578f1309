"""MagNet-Fast behind the refiner protocol: loading the refinement modules and :class:`MagnetRefiner`.

The stage functions are in :mod:`refine_cli.refiners.magnet` (whole image) and
:mod:`refine_cli.refiners.magnet_tiled` (bounded memory: each refinement stage one of the engine's
levels); this module picks one and loads the checkpoints (sha256-checked, strict).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from refine_cli.errors import ResourceError, UsageError, WeightsError
from refine_cli.refiners.base import PlannedLevel, Refiner, Scene, TileInput, TileResult
from refine_cli.refiners.classical import EdgeSnapRefiner
from refine_cli.refiners.magnet import (
    PRESETS,
    SNAP_EPS,
    SNAP_MODES,
    SNAP_RADIUS,
    STAGE_MODES,
    MagnetPreset,
    MagnetResult,
    Schedule,
    Size,
    StageProgress,
    coarse_to_probs,
    custom_preset,
    get_preset,
    run_magnet,
)
from refine_cli.refiners.magnet_tiled import module_bytes
from refine_cli.segmenters.base import Segmenter
from refine_cli.tiling.budget import BASE_BYTES

if TYPE_CHECKING:
    from refine_cli.config import MagnetOptions
    from refine_cli.io.protocols import LevelInput
    from refine_cli.io.readers import Reader
    from refine_cli.models.magnet import RefinementMagNet
    from refine_cli.refiners.magnet_tiled import StageLevels

logger = logging.getLogger(__name__)




def load_refinement_modules(
    preset: MagnetPreset, device: str | torch.device = "cpu", *, weights: str | None = None,
    download: bool = False,
) -> list[RefinementMagNet]:
    """Build the preset's refinement modules and load their checkpoints strictly.

    Every file is checked against the sha256 known for it (the registry record, the cache
    sidecar, or the sidecar of weights exported by ``refine train``) before loading, and
    loading is strict (all keys and shapes). The ``binary`` preset's module is shipped in
    the repository's ``weights/`` folder (registry ``bundled``), so it needs no flags.

    Args:
        preset: gives C and the checkpoint names.
        device: where the modules go.
        weights: one checkpoint (file or registry name) used for every stage instead.
        download: fetch registry checkpoints that are not cached yet.

    Raises:
        WeightsError: a checkpoint is missing, damaged (checksum) or does not fit (for
            ``--preset binary``: the message names the shipped file that is missing).
    """
    from refine_cli import weights as registry
    from refine_cli.segmenters.base import resolve_device

    dev = resolve_device(device)
    modules = []
    for name in (weights,) if weights else preset.refinement:
        try:
            resolved = registry.resolve_weights(name, download=download)
        except WeightsError as exc:
            if preset.name == "binary" and weights is None:
                record = registry.get_record(name)
                shipped, cached = registry.bundled_path(record), registry.cache_path(name)
                raise WeightsError(
                    f"--preset binary needs the 2-class MagNet refinement module {name!r}, shipped "
                    f"with refine as {shipped}, but that file is missing and it is not in the cache "
                    f"({cached}); reinstall refine (in a checkout: `git checkout -- weights/`) or run "
                    f"`refine weights import {name} FILE`"
                ) from exc
            raise
        module = load_refinement_file(resolved.path, preset.num_classes, sha256=resolved.sha256)
        modules.append(module.to(dev))
    return modules


def load_refinement_file(path: Any, num_classes: int, *, sha256: str | None = None) -> RefinementMagNet:
    """One refinement module from a checkpoint file, checksum-checked and loaded strictly.

    Files exported by ``refine train --arch magnet-refinement`` (a ``.json`` sidecar with
    ``format`` ``refine-weights/1`` beside them) are checked against ``sha256`` or else the
    sidecar's digest, and must say ``arch`` ``magnet-refinement`` with C classes; plain
    state_dicts (the official files) are checked against ``sha256`` when it is known.

    Args:
        path: the checkpoint.
        num_classes: C the module must have.
        sha256: expected digest (registry or cache sidecar), or ``None``.

    Returns:
        The module in eval mode on the CPU.

    Raises:
        WeightsError: checksum mismatch, other architecture or class count, or keys / shapes that
            do not fit (named).
    """
    from pathlib import Path

    from refine_cli import weights as registry
    from refine_cli.models.magnet import RefinementMagNet, build_refinement_magnet

    path = Path(path)
    if path.with_suffix(".json").is_file() and path.suffix != ".json":
        from refine_cli.weights.files import load_exported
        from refine_cli.weights.files import read_export_sidecar as read_sidecar

        try:
            side = read_sidecar(path)
        except WeightsError:
            side = None
        if side is not None:
            classes = int((side.get("arch_params") or {}).get("n_classes", -1))
            if side.get("arch") != "magnet-refinement" or classes != num_classes:
                raise WeightsError(
                    f"{path} holds {side.get('arch')} weights ({side.get('arch_params')}), not a "
                    f"{num_classes}-class MagNet refinement module; pass the checkpoint trained for this "
                    "segmenter"
                )
            model, _ = load_exported(path, sha256=sha256)
            assert isinstance(model, RefinementMagNet)
            return model
    module = build_refinement_magnet(num_classes)
    if sha256:
        got = registry.file_digests(path).sha256
        if got != sha256.lower():
            raise WeightsError(f"checksum mismatch for {path} (sha256 {got}, expected {sha256}); the file is "
                               "damaged or not these weights: fetch or import it again")
    module.load_state_dict(registry.load_state_dict(path, module), strict=True)
    return module.eval()


def _known_sha256(spec: str) -> str | None:
    """The sha256 the run's checkpoint ``spec`` was checked against (registry, cache or export sidecar)."""
    from refine_cli import weights as registry

    resolved = registry.resolve_weights(spec)
    if resolved.sha256:
        return resolved.sha256
    side = resolved.path.with_suffix(".json")
    if side.is_file() and resolved.path.suffix != ".json":
        from refine_cli.weights.files import read_export_sidecar as read_sidecar

        try:
            return str(read_sidecar(resolved.path).get("sha256") or "") or None
        except WeightsError:
            return None
    return None


def attach_runtimes(modules: Sequence[RefinementMagNet], segmenter: Segmenter, backend: str,
                    batch_size: int = 1) -> str:
    """Run the refinement modules' (and a PyTorch backbone's) inference in ``backend``.

    ``auto`` picks OpenVINO, then ONNX Runtime, on the CPU (the faster for these networks:
    :data:`~refine_cli.models.runtime.MAGNET_ORDER`) and keeps torch on CUDA. Segmenters that are not
    PyTorch backbones (ONNX, TFLite, TorchScript files) keep their own engine. For the memory plan,
    OpenVINO's held buffers are taken as 256 float32 channels at the segmenter's input size per batch
    item (an upper bound of one forward's live activations for the refinement module).

    Returns:
        The backend that runs: ``torch``, ``onnx`` or ``openvino``.

    Raises:
        UsageError: a named backend that is not installed or cannot run on the segmenter's device.
    """
    from refine_cli import weights as registry
    from refine_cli.models.runtime import (
        BACKBONE_GRAPHS,
        MAGNET_ORDER,
        ModuleRuntime,
        refinement_graphs,
        resolve_backend,
    )
    from refine_cli.segmenters.torch_backbones import TorchBackboneSegmenter

    engine = resolve_backend(backend, torch.device(segmenter.device), "fp32", MAGNET_ORDER)
    if engine == "torch":
        return engine
    folder = registry.refine_home() / "graphs"
    w, h = segmenter.input_size
    held = 4 * 256 * w * h * batch_size if engine == "openvino" else 0
    for module in modules:
        module.runtime = ModuleRuntime(module, engine, folder, refinement_graphs(module.n_classes),
                                       "magnet-refine", held_bytes=held)
    if isinstance(segmenter, TorchBackboneSegmenter):
        segmenter.model.runtime = ModuleRuntime(segmenter.model, engine, folder, BACKBONE_GRAPHS, "backbone",
                                                held_bytes=held)
    return engine


class MagnetRefiner(Refiner):
    """MagNet-Fast (or full MagNet) behind the refiner protocol.

    Two ways to run the stages:

    * **whole image** (:func:`run_magnet`, in :meth:`prepare`): the image at full resolution and a
      dense Y per stage in memory, about ``16 C + 24`` bytes per image pixel; the engine then
      streams one level over the final Y;
    * **tiled** (:class:`~refine_cli.refiners.magnet_tiled.StageLevels`): :meth:`prepare` makes
      stage-1 Y, and every refinement stage is one of the engine's levels (:meth:`level_shapes`,
      :meth:`level_input`, :meth:`for_level`): its patches are picked and refined on the previous
      level's file, and the engine writes its Y tile by tile into the next; image regions are read
      by window and memory is bounded by ``--max-memory``. The result is the same (bit for bit
      where the stage images are integer factors of the image, see that module). It needs the
      engine's image source in :attr:`Scene.image_source <refine_cli.refiners.base.Scene.image_source>`.

    ``tiled=None`` takes the whole-image path when its estimate fits the budget
    (``Scene.max_memory``), else the tiled one; ``True``/``False`` force one. The
    engine then copies the final Y to the outputs (one pass-through level), or, with the
    **edge snap** (2 classes; ``snap="auto"`` follows :attr:`MagnetPreset.snap`, on for
    ``--preset binary``), runs :class:`~refine_cli.refiners.classical.EdgeSnapRefiner` on the
    class-1 probability of the final Y as that level, tiled, in either path: the same values, and
    the tiled path stays within its budget (windows of Y are rendered as the tiles ask).

    Uncertainty (``--uncertainty``) describes the final result pixel by pixel, from its
    probabilities alone: for 2 classes ``u = 1 - |2p - 1|`` of the final foreground probability
    ``p`` (after the snap when it runs; without it this is ``1 - (top1 - top2)`` of the final Y),
    for C > 2 ``1 - (top1 - top2)`` of the final class probabilities (the engine's defaults).
    MagNet's own per-stage maps (Yu, E, Q) only steer which patches and points are refined and are
    never written. ``u`` therefore depends on the patch grid only through ``p`` itself; two
    pipeline rules keep ``p`` free of patch-shaped plateaus: zero scores are never replaced (the
    canonical tie-break would fill the top rows of the refined patches), and ``--preset binary``
    replaces only where R is more certain than Y (its module hedges at ~0.22 on certain background).
    ``prob`` of :meth:`refine` is the class-1 probability for 2 classes and the top-1 probability for
    more (the label map is in :attr:`result`), before any snap.

    Args:
        segmenter: the coarse segmenter.
        modules: refinement modules (see :func:`run_magnet`).
        preset: the preset.
        fast: MagNet-Fast instead of full MagNet.
        n_patches: patches per stage override.
        n_points: points per stage override.
        batch_size: patches per forward pass.
        info: facts for :meth:`describe` (weights names ...).
        tiled: force the tiled (``True``) or whole-image (``False``) path; ``None`` decides by budget.
        snap: the edge snap: ``auto`` (the preset's :attr:`MagnetPreset.snap`), ``on`` or ``off``;
            2 classes only.
        stages: ``all`` (the schedule) or ``none`` (stage 1 only: no refinement module runs).

    Raises:
        UsageError: unknown ``snap`` or ``stages``.
    """

    name = "magnet-fast"
    halo = 0
    uses_torch = True
    cluster_ready = False

    def __init__(
        self, segmenter: Segmenter, modules: Sequence[RefinementMagNet], preset: MagnetPreset, *,
        fast: bool = True, n_patches: int | None = None, n_points: float | None = None, batch_size: int = 1,
        info: dict[str, Any] | None = None, tiled: bool | None = None, snap: str = "auto",
        stages: str = "all",
    ) -> None:
        if snap not in SNAP_MODES:
            raise UsageError(f"magnet-fast edge snap {snap!r}: use one of {', '.join(SNAP_MODES)}")
        if stages not in STAGE_MODES:
            raise UsageError(f"magnet-fast stages {stages!r}: use one of {', '.join(STAGE_MODES)}")
        self.stages = stages
        self.segmenter = segmenter
        self.modules = list(modules)
        self.preset = preset
        self.fast, self.n_patches, self.n_points, self.batch_size = fast, n_patches, n_points, batch_size
        self.info = dict(info or {})
        self.tiled = tiled
        self.snap_mode = snap
        self.snap: EdgeSnapRefiner | None = None
        self.result: MagnetResult | None = None
        self.staged: StageLevels | None = None

    @classmethod
    def from_options(
        cls, options: MagnetOptions, *, segmenter: str | None = None, device: str = "auto",
        download: bool = False, batch_size: int = 1, backend: str = "torch",
    ) -> MagnetRefiner:
        """Build from ``RefineConfig.magnet`` (and ``RefineConfig.segmenter``, ``RefineConfig.backend``).

        The preset comes from ``--preset``, else from the segmenter's name, else ``cityscapes``.
        A segmenter file without a preset runs the generic schedule and needs ``--weights``.
        The edge snap and the stages follow ``options.snap`` / ``options.stages``; the refinement
        modules and a PyTorch backbone segmenter run in ``backend`` (see :func:`attach_runtimes`).
        """
        from refine_cli.segmenters import load_segmenter

        preset: MagnetPreset | None
        if segmenter is None:
            preset = get_preset(options.preset or "cityscapes")
            segmenter = preset.segmenter
        elif options.preset:
            preset = get_preset(options.preset)
        else:
            preset = next((p for p in PRESETS.values() if p.segmenter == segmenter), None)
        seg = load_segmenter(segmenter, device, download=download)
        if preset is None:
            if not options.weights:
                raise UsageError(
                    f"--segmenter {segmenter} has no preset: give --weights, a refinement checkpoint for its "
                    f"{seg.num_classes} classes ({', '.join(seg.classes)})"
                )
            preset = custom_preset(seg, options.weights)
        if seg.num_classes != preset.num_classes or tuple(seg.input_size) != tuple(preset.input_size):
            raise UsageError(
                f"--segmenter {seg.name} ({seg.num_classes} classes, input {seg.input_size}) does not fit "
                f"--preset {preset.name} ({preset.num_classes} classes, input {preset.input_size})"
            )
        modules = load_refinement_modules(preset, seg.device, weights=options.weights, download=download)
        refinement = [options.weights] if options.weights else list(preset.refinement)
        info = {"preset": preset.name, "segmenter": seg.name, "refinement": refinement,
                "refinement_sha256": [_known_sha256(name) for name in refinement],
                "backend": attach_runtimes(modules, seg, backend, batch_size)}
        return cls(seg, modules, preset, fast=not options.full, n_patches=options.n_patches,
                   n_points=options.n_points, batch_size=batch_size, info=info,
                   tiled=options.tiled, snap=options.snap, stages=options.stages)

    def refine_image(self, image_u8: np.ndarray, coarse: np.ndarray | None = None,
                     progress: StageProgress | None = None) -> MagnetResult:
        """Run on a whole image.

        ``coarse`` is a user mask in any form :func:`coarse_to_probs` accepts; ``progress`` as
        :func:`run_magnet`.
        """
        seg = self.segmenter
        probs = None if coarse is None else coarse_to_probs(coarse, seg.num_classes, seg.classes)
        self.result = run_magnet(image_u8, seg, self.modules, self.schedule(image_u8.shape[:2]), probs,
                                 batch_size=self.batch_size, progress=progress)
        return self.result

    def schedule(self, image_hw: Size) -> Schedule:
        """The stages to run on an image of ``image_hw`` ``(H, W)`` (only stage 1 with ``stages="none"``)."""
        schedule = self.preset.schedule(image_hw, fast=self.fast, n_patches=self.n_patches,
                                        n_points=self.n_points)
        if self.stages == "none":
            schedule = dataclasses.replace(schedule, stages=schedule.stages[:1])
        return schedule

    def whole_image_bytes(self, shape: Size) -> int:
        """Estimated peak bytes of the whole-image path on an image of ``shape`` ``(H, W)``."""
        return BASE_BYTES + self.fixed_memory() + shape[0] * shape[1] * (16 * self.segmenter.num_classes + 24)

    def prepare(self, scene: Scene) -> None:
        """Run the whole-image pipeline, or the tiled one's stage 1 (see the class docstring).

        Without a mask (``scene.has_mask`` false) the segmenter produces stage-1 Y; otherwise the
        overview's coarse map becomes it.

        Raises:
            ResourceError: the whole-image path is forced (or the tiled one unavailable) and does
                not fit ``--max-memory``.
        """
        self.close()
        held = scene.resident_bytes  # decoded inputs, held all run long
        tiled, need, budget = self._path(scene)
        source = scene.image_source
        if tiled and source is None:
            raise ResourceError(
                "the tiled MagNet reads the image by window, but this caller gives no image source "
                "(Scene.image_source); run it through refine_cli.api.refine_file or use the "
                f"whole-image path with --max-memory {(need >> 20) + 64}M or more")
        if not tiled and need > budget:
            raise ResourceError(
                f"MagNet-Fast holds the whole {scene.shape[1]}x{scene.shape[0]} image in memory (about "
                f"{need >> 20} MiB with {self.segmenter.num_classes} classes) but --max-memory is "
                f"{budget >> 20} MiB; raise --max-memory to {(need >> 20) + 64}M or more, or let it run "
                "tiled")
        if scene.timer is not None:
            with scene.timer.stage("refine"):
                self._prepare_tiled(scene, source, budget - held) if tiled else self._prepare_whole(scene)
        else:
            self._prepare_tiled(scene, source, budget - held) if tiled else self._prepare_whole(scene)
        self.snap = self._make_snap()
        if self.snap is not None:
            scene.notes.append(
                f"magnet-fast: edge snap at full resolution (guided filter, radius {self.snap.radius}, "
                f"eps {self.snap.eps:g})")

    def _path(self, scene: Scene) -> tuple[bool, int, int]:
        """``(tiled, need, budget)``: the path for ``scene``, the whole-image path's bytes, the budget."""
        need = self.whole_image_bytes(scene.shape) + scene.resident_bytes
        budget = scene.max_memory if scene.max_memory is not None else need
        return (self.tiled if self.tiled is not None else need > budget), need, budget

    def plan_levels(self, scene: Scene) -> list[PlannedLevel]:
        """The levels of the path ``prepare`` will take, with the memory their refiners will declare.

        Whole image: one level over the final Y. Tiled: one level per refinement stage (all C
        channels), the image-size level last (the class-1 probability for 2 classes).
        """
        from refine_cli.refiners.magnet_tiled import StageLevels, TiledPlan

        tiled, _, budget = self._path(scene)
        c = self.num_classes
        k_final = 1 if c == 2 else c
        snap = self._make_snap()
        if not tiled:
            return [PlannedLevel(scene.shape, self._level_refiner(True, snap, None, 0), k_final)]
        schedule = self.schedule(scene.shape)
        plan = TiledPlan.from_budget(budget - scene.resident_bytes, c, module_bytes(self.modules),
                                     input_hw=schedule.input_hw, batch_size=self.batch_size)
        shapes = StageLevels.level_shapes(schedule, scene.shape)
        held = StageLevels.planned_held(schedule, plan, c, scene.shape)
        return [PlannedLevel(shape, self._level_refiner(i == len(shapes) - 1, snap, plan.bytes_per_pixel,
                                                        self.fixed_memory() + stage_held),
                             k_final if i == len(shapes) - 1 else c)
                for i, (shape, stage_held) in enumerate(zip(shapes, held, strict=True))]

    @staticmethod
    def _level_refiner(final: bool, snap: EdgeSnapRefiner | None, y_bpp: int | None, fixed: int) -> Refiner:
        """A level's refiner: a stage's exact copy, or the last level's edge snap (else a copy).

        ``y_bpp``: working bytes per pixel of rendering a window of the tiled path's Y (``None``: the
        whole-image path, whose result is in memory); ``fixed``: what the run holds meanwhile.
        """
        from refine_cli.refiners.classical import CoarseRefiner
        from refine_cli.refiners.magnet_tiled import PassThrough, StagePassThrough

        if y_bpp is None:
            return SnapOverY(snap.radius, snap.eps) if snap is not None else CoarseRefiner()
        if not final:
            return StagePassThrough(y_bpp, fixed)
        if snap is not None:
            return SnapOverY(snap.radius, snap.eps, y_bpp + 8, fixed)
        return PassThrough(y_bpp, fixed)

    def _make_snap(self) -> EdgeSnapRefiner | None:
        """The edge snap when it is on and the output is one probability (2 classes)."""
        on = self.snap_mode == "on" or (self.snap_mode == "auto" and self.preset.snap)
        if not on:
            return None
        if self.num_classes != 2:
            logger.info("magnet-fast: no edge snap for %d classes (label maps)", self.num_classes)
            return None
        return EdgeSnapRefiner(SNAP_RADIUS, SNAP_EPS)

    def _prepare_whole(self, scene: Scene) -> None:
        image, coarse = scene.read_overview(scene.shape)
        if tuple(image.shape[:2]) != tuple(scene.shape):
            raise UsageError("MagNet's whole-image reference needs the image at full resolution")
        img = np.clip(np.rint(image), 0, 255).astype(np.uint8) if image.dtype != np.uint8 else image
        use_mask = scene.has_mask and coarse is not None
        self.refine_image(img, coarse if use_mask else None, progress=scene.progress)

    def _prepare_tiled(self, scene: Scene, source: Any, budget: int) -> None:
        from refine_cli.io.writers import default_tmp_dir
        from refine_cli.refiners.magnet_tiled import StageLevels

        schedule = self.schedule(scene.shape)
        probs = None
        if scene.has_mask:
            first = schedule.stages[1].hw if len(schedule.stages) > 1 else schedule.stages[0].hw
            shape = (min(first[0], scene.shape[0]), min(first[1], scene.shape[1]))
            _, coarse = scene.read_overview(shape)
            if coarse is not None:
                seg = self.segmenter
                probs = coarse_to_probs(coarse, seg.num_classes, seg.classes)
                scene.notes.append(
                    f"magnet-fast (tiled): the mask became stage-1 Y at {shape[1]}x{shape[0]} (area average)")
        self.staged = StageLevels.create(source, self.segmenter, self.modules, schedule, budget=budget,
                                         batch_size=self.batch_size, tmp_dir=default_tmp_dir(),
                                         progress=scene.progress)
        self.staged.stage_one(probs)

    def report(self) -> dict[str, Any]:
        """The run's per-stage facts (``{}`` before :meth:`prepare`)."""
        if self.staged is not None:
            return self.staged.report()
        return self.result.report() if self.result is not None else {}

    makes_coarse = True
    """Runs its own segmenter when no ``--mask`` is given."""

    @property
    def num_classes(self) -> int:
        """C of the segmenter and refinement modules."""
        return self.segmenter.num_classes

    def initial_coarse(self) -> np.ndarray | None:
        """The whole-image path's final Y as its single level's input (the tiled path: ``None``).

        ``(H, W, K)`` float32: the class-1 probability for 2 classes, all C class probabilities
        otherwise (written as a label map).
        """
        if self.staged is not None:
            return None
        if self.result is None:
            raise RuntimeError("MagnetRefiner.prepare must run first")
        probs = self.result.probs
        return probs[..., 1:2] if probs.shape[-1] == 2 else probs

    def level_shapes(self, shape: Size) -> list[Size]:
        """The tiled path's levels (its refinement stages, ending at the image size), else ``[shape]``."""
        return self.staged.shapes() if self.staged is not None else [shape]

    def level_input(self, index: int, previous: Reader | None) -> LevelInput | None:
        """The tiled path: stage ``index + 2``'s Y by window, after its patches are refined.

        The image-size level gives the class-1 probability for 2 classes, all C otherwise.
        """
        return self.staged.level_input(index, previous) if self.staged is not None else None

    def for_level(self, index: int, final: bool) -> Refiner:
        """A stage's pass-through (tiled); the last level: the edge snap when it is on, else a copy."""
        run = self.staged
        if run is None:
            return self._level_refiner(True, self.snap, None, 0)
        return self._level_refiner(final, self.snap, run.plan.bytes_per_pixel,
                                   self.fixed_memory() + run.held_bytes())

    def refine(self, tile: TileInput) -> TileResult:
        """The window of the whole-image result (``prepare`` must have run; the tiled path has none)."""
        if self.result is None:
            raise RuntimeError("MagnetRefiner.refine reads the whole-image result: prepare must run first, "
                               "and the tiled path runs as the engine's levels (engine.levels.run_levels)")
        sl = tile.window.slices
        probs, unc = self.result.probs[sl], self.result.uncertainty[sl].copy()
        prob = probs[..., 1] if probs.shape[-1] == 2 else probs.max(axis=-1)
        return TileResult(np.ascontiguousarray(prob, dtype=np.float32), unc)

    def tile_memory(self, pixels: int) -> int:
        """Bytes per window: the whole-image result is held, so only the window copies."""
        if self.staged is not None:
            return (self.staged.plan.bytes_per_pixel + 8) * pixels
        return 16 * pixels

    def fixed_memory(self) -> int:
        """Bytes held by the refinement weights (the whole-image result adds ~4 C + 5 B/px after prepare)."""
        from refine_cli.models.runtime import held_bytes

        weights = module_bytes(self.modules)
        from refine_cli.segmenters.torch_backbones import TorchBackboneSegmenter

        held = sum(held_bytes(m) for m in self.modules)
        if isinstance(self.segmenter, TorchBackboneSegmenter):
            held += held_bytes(self.segmenter.model)
        return int(weights) + held

    def close(self) -> None:
        """Drop the result; delete a tiled run's temporary files."""
        if self.staged is not None:
            self.staged.close()
        self.staged = None
        self.result = None

    def describe(self) -> dict[str, Any]:
        """Facts for the report (``snap``: its radius, eps and halo, or ``off``, as ``--method cascade``)."""
        snap: Any = "off"
        if self.snap is not None:
            snap = {k: v for k, v in self.snap.describe().items() if k != "name"}
        out = {**super().describe(), **self.info, "fast": self.fast, "snap": snap,
               "replace": self.preset.replace, "stages": self.stages, **self.segmenter.describe()}
        report = self.report()
        if report:
            out["magnet"] = report
            out["tiled"] = "tiled" in report
        return out


class SnapOverY(EdgeSnapRefiner):
    """The edge snap as the level refiner of MagNet's final Y (:meth:`MagnetRefiner.for_level`).

    The same filter as :class:`~refine_cli.refiners.classical.EdgeSnapRefiner`; its memory
    estimate adds what producing a window of the final Y costs (the tiled run renders it from
    its stores as the engine reads) and what the run holds meanwhile, so the engine's tile plan
    keeps ``--max-memory``.

    Args:
        radius: box radius in px.
        eps: regularisation (guide in [0, 1] units).
        y_bytes_per_pixel: working bytes per pixel of rendering a window of Y (0: it is in memory).
        fixed: bytes held for the whole level (weights, the tiled run's in-memory maps).
    """

    def __init__(self, radius: int = SNAP_RADIUS, eps: float = SNAP_EPS, y_bytes_per_pixel: int = 0,
                 fixed: int = 0) -> None:
        super().__init__(radius, eps)
        self._y_bpp, self._fixed = int(y_bytes_per_pixel), int(fixed)

    def tile_memory(self, pixels: int) -> int:
        """The guided filter's planes plus rendering Y over the window."""
        return super().tile_memory(pixels) + self._y_bpp * pixels

    def fixed_memory(self) -> int:
        """What the MagNet run holds while the level runs."""
        return self._fixed
