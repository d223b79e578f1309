"""``--method cascade``: choose the weights, then the exact or the streamed CascadePSP.

Weights (``--weights``): a checkpoint file (the official one, or one exported by
``refine train`` with its JSON sidecar) or a registry name. Without ``--weights``
the official checkpoint is used when it is in the cache, else the project's own
``cascadepsp-lite-v2`` from ``weights/``, with a one-line notice; the report
records which weights ran and their sha256.

Path: the **exact** official procedure (``refiners.cascadepsp``) runs on the whole
image as one tile when the image, its per-pixel state and one network pass fit
``--max-memory``; otherwise the **streamed** cascade (``refiners.cascade_stream``)
refines a pyramid tile by tile. ``--exact`` / ``--streamed`` force one. Images no
larger than the working size always take the exact path.

Edge snap (``--cascade-snap``, default: on for the lite weights, off for the official
ones): binary masks get one more full-resolution level, tiled, that moves the refined
boundary onto the image's colour edges (``refiners.classical.EdgeSnapRefiner``).
"""

from __future__ import annotations

import logging
from typing import Any

from refine_cli.config import CascadeOptions, RefineConfig
from refine_cli.errors import WeightsError
from refine_cli.refiners.base import PlannedLevel, Refiner, Scene, TileInput, TileResult
from refine_cli.tiling.budget import smallest_need

log = logging.getLogger(__name__)

OFFICIAL_BYTES_PER_PIXEL = 5 * 1024
"""Activation memory of one official fp32 forward per input pixel (about 5 KB/px, measured)."""


def load_cascade_model(options: CascadeOptions, device: str, backend: str = "auto"
                       ) -> tuple[Any, dict[str, Any], int]:
    """Resolve ``--weights`` and build the matching module, loaded strictly, in eval mode on ``device``.

    With ``backend`` other than ``torch`` (see :func:`~refine_cli.models.runtime.resolve_backend`) the
    module's inference forwards run in that engine.

    Returns:
        ``(model, info, bytes_per_pixel)``: the module, facts for the report (weights name,
        path, sha256, notice) and its activation memory per pixel of one forward pass.

    Raises:
        WeightsError: no usable weights (the message says how to get them).
    """
    from refine_cli import weights
    from refine_cli.models.cascadepsp import CascadeRefinementModule, cascadepsp_official
    from refine_cli.models.runtime import CascadeRuntime, resolve_backend
    from refine_cli.weights.files import load_exported

    spec = options.weights
    notice = None
    if spec is None:
        if weights.cache_path(weights.DEFAULT_CASCADEPSP).is_file():
            spec = weights.DEFAULT_CASCADEPSP
        elif weights.DEFAULT_CASCADEPSP_LITE not in {r.name for r in weights.list_records()}:
            raise WeightsError(
                f"no CascadePSP weights: fetch the official ones with `refine weights fetch "
                f"{weights.DEFAULT_CASCADEPSP}` (or `refine weights import "
                f"{weights.DEFAULT_CASCADEPSP} FILE`), "
                "or pass --weights FILE")
        else:
            spec = weights.DEFAULT_CASCADEPSP_LITE
            notice = (f"official CascadePSP weights are not in the cache, using the bundled {spec} "
                      f"(get the official ones with `refine weights fetch {weights.DEFAULT_CASCADEPSP}`)")
    resolved = weights.resolve_weights(spec)
    info: dict[str, Any] = {"weights": resolved.name or str(resolved.path),
                            "weights_path": str(resolved.path)}
    sidecar = resolved.path.with_suffix(".json")
    if sidecar.is_file() and resolved.name != weights.DEFAULT_CASCADEPSP:
        model, side = load_exported(resolved.path, sha256=resolved.sha256)
        info["weights_sha256"] = side.get("sha256")
        info["architecture"] = side.get("arch")
        bpp = int(side.get("bytes_per_pixel", 1500))
    else:
        model = cascadepsp_official()
        model.load_state_dict(weights.load_state_dict(resolved.path, model), strict=True)
        if resolved.sha256:
            info["weights_sha256"] = resolved.sha256
        info["architecture"] = "cascadepsp"
        bpp = OFFICIAL_BYTES_PER_PIXEL
    if notice:
        info["notice"] = notice
        log.warning("%s", notice)
    from refine_cli.refiners.cascadepsp import resolve_device
    from refine_cli.tiling.cascade_grid import padded_shape

    dev = resolve_device(device)
    model = model.to(dev).eval()
    backend = resolve_backend(backend, dev, options.precision)
    info["backend"] = backend
    if backend != "torch" and isinstance(model, CascadeRefinementModule):
        pad = padded_shape((options.size or model.working_size,) * 2)[0]
        held = bpp * pad * pad * options.batch_size if backend == "openvino" else 0
        model.runtime = CascadeRuntime(model, backend, weights.refine_home() / "graphs", held_bytes=held)
    return model, info, bpp


class CascadeMethod(Refiner):
    """Facade of ``--method cascade``: decides exact vs streamed in :meth:`prepare` and delegates.

    Args:
        config: the run configuration (cascade options, memory budget).
        device: resolved torch device string.
    """

    name = "cascade"
    uses_torch = True

    def __init__(self, config: RefineConfig, device: str = "cpu") -> None:
        self.config = config
        self.options = config.cascade
        self.device = device
        from refine_cli.refiners.cascadepsp import with_model_defaults

        self.model, self.info, self.bytes_per_pixel = load_cascade_model(self.options, device, config.backend)
        self.options = with_model_defaults(self.options, self.model)  # the weights' own L, padding, snap
        self.impl: Refiner | None = None
        self.mode = ""
        self.snap: Refiner | None = None
        self.why = ""
        self._impl_levels = 0

    def exact_need(self, impl: Refiner, scene: Scene, snap: bool) -> int:
        """Bytes the engine's memory plan needs for the exact path on ``scene`` (the whole image as one tile).

        Computed as ``engine.levels`` will plan it, so that the path chosen here always runs within
        ``--max-memory``.

        Args:
            impl: the exact refiner (``fixed_tile`` set).
            scene: the image; its ``bytes_out`` (bytes per pixel of the outputs),
                ``resident_bytes`` (decoded inputs held in memory) and ``classes`` / ``labels``.
            snap: the edge snap follows (the exact level then writes a float level file).
        """
        channels = scene.classes if scene.labels else 1
        bytes_out = 4 * channels if snap else scene.bytes_out
        return smallest_need(scene.shape, halo=impl.halo, channels=channels, batch=self.options.batch_size,
                             tile_memory=impl.tile_memory, fixed_memory=impl.fixed_memory(),
                             bytes_out=bytes_out, tile_size=max(scene.shape),
                             resident=scene.resident_bytes)

    def _choose(self, scene: Scene) -> tuple[Refiner, str, str, bool]:
        """The path for ``scene``, decided without running the network.

        Returns:
            ``(refiner, mode, why, snap)``: the path's refiner (not prepared), ``exact`` or
            ``streamed``, the reason for the report, and whether the edge snap follows.
        """
        from refine_cli.refiners.cascade_stream import CascadeStreamRefiner
        from refine_cli.refiners.cascadepsp import CascadePSPRefiner
        from refine_cli.tiling.cascade_grid import global_resize

        labels = scene.labels
        size = self.options.size
        assert size is not None  # with_model_defaults gave the weights' own
        small = global_resize(scene.shape, size).mode != "down"
        snap = self.options.snap == "on" and not labels
        exact_impl = CascadePSPRefiner(self.model, size=size, fast=self.options.fast,
                                       batch_size=self.options.batch_size, precision=self.options.precision,
                                       device=self.device, weights_info=self.info,
                                       bytes_per_pixel=self.bytes_per_pixel, progress=scene.progress)
        exact_impl.fixed_tile = max(scene.shape)
        exact_impl.size_flag = (
            f"--cascade-size {self.options.size} (exact path: whole image + one network pass; --streamed "
            "needs less)")
        exact_impl.skip_rule = "uniform"
        need = self.exact_need(exact_impl, scene, snap)
        budget = self.config.max_memory
        mib = 1024**2
        if small:  # the streamed path needs an image larger than L: exact, whatever was asked
            if self.options.exact is False:
                log.info("the image is not larger than --cascade-size %d: using the exact path",
                         self.options.size)
            exact, why = True, f"the image is not larger than the working size {self.options.size}"
        elif self.options.exact is not None:
            exact = self.options.exact
            why = "--exact" if exact else "--streamed"
        elif need <= budget:
            exact, why = True, f"it needs about {-(-need // mib)} MiB of --max-memory {budget // mib} MiB"
        else:
            exact, why = False, (f"the exact path would need about {-(-need // mib)} MiB, above --max-memory "
                                 f"{budget // mib} MiB")
        if exact:
            return exact_impl, "exact", why, snap
        stream = CascadeStreamRefiner(self.model, size=size, precision=self.options.precision, labels=labels,
                                      classes=scene.classes, bytes_per_pixel=self.bytes_per_pixel,
                                      weights_info=self.info, fast=self.options.fast, grid=self.options.grid,
                                      skip=self.options.skip)
        return stream, "streamed", why, snap

    def plan_levels(self, scene: Scene) -> list[PlannedLevel]:
        """The chosen path's levels (exact: the whole image as one tile), then the edge snap.

        The streamed path is planned with its global step. Whether a run starts its levels from the
        mask instead depends on the mask's content (``CascadeStreamRefiner.anchor``), which the plan
        does not read; those levels are at most as many, and the image-size level, the largest, is
        the same.
        """
        from refine_cli.refiners.cascade_stream import CascadeStreamRefiner

        impl, _, _, snap = self._choose(scene)
        levels = [PlannedLevel(scene.shape, impl)]
        if isinstance(impl, CascadeStreamRefiner):
            shapes = impl.planned_shapes(scene.shape)
            levels = [PlannedLevel(s, impl.for_level(i, i == len(shapes) - 1), impl.input_channels() if i == 0
                                   else None) for i, s in enumerate(shapes)]
        if snap:
            from refine_cli.refiners.classical import EdgeSnapRefiner

            levels.append(PlannedLevel(scene.shape, EdgeSnapRefiner()))
        return levels

    def prepare(self, scene: Scene) -> None:
        """Choose the path for this image and run its global step."""
        impl, self.mode, why, snap = self._choose(scene)
        self.why = why
        log.info("cascade: %s path: %s", self.mode, why)
        self.impl = impl
        impl.prepare(scene)
        self._impl_levels = len(impl.level_shapes(scene.shape))
        self.snap = None
        if snap:
            from refine_cli.refiners.classical import EdgeSnapRefiner

            self.snap = EdgeSnapRefiner()  # the tuned radius and eps
        elif self.options.snap == "on":
            log.info("cascade: no edge snap for label maps")
        if "notice" in self.info:
            scene.notes.append(self.info["notice"])
        scene.notes.append(
            f"cascade: {self.mode} path ({self.why}); weights {self.info.get('weights')}"
            + (f" (sha256 {str(self.info['weights_sha256'])[:12]}...)"
               if self.info.get("weights_sha256") else ""))

    def _impl(self) -> Refiner:
        if self.impl is None:
            raise RuntimeError("prepare() first")
        return self.impl

    def level_shapes(self, shape: tuple[int, int]) -> list[tuple[int, int]]:
        """The chosen path's levels, then the edge snap at full resolution."""
        shapes = self._impl().level_shapes(shape)
        return shapes + [shape] if self.snap is not None else shapes

    def initial_coarse(self) -> Any:
        """The chosen path's first coarse input."""
        return self._impl().initial_coarse()

    def for_level(self, index: int, final: bool) -> Refiner:
        """The chosen path's level refiner, or the edge snap after its last level."""
        if self.snap is not None and index == self._impl_levels:
            return self.snap
        return self._impl().for_level(index, index == self._impl_levels - 1)

    def refine(self, tile: TileInput) -> TileResult:
        """Delegate (single-level exact path without snap)."""
        return self._impl().refine(tile)

    def fixed_memory(self) -> int:
        """The weights, and what an ONNX Runtime / OpenVINO backend keeps between calls."""
        from refine_cli.models.runtime import held_bytes

        weights = sum(int(p.numel() * p.element_size()) for p in self.model.parameters())
        return weights + held_bytes(self.model)

    def describe(self) -> dict[str, Any]:
        """Path, working size, weights."""
        base = self.impl.describe() if self.impl is not None else {}
        snap: Any = "off"
        if self.snap is not None:
            snap = {k: v for k, v in self.snap.describe().items() if k != "name"}
        return {**base, "name": self.name, "mode": self.mode, "size": self.options.size,
                "pad": self.options.pad, "snap": snap, **self.info}


