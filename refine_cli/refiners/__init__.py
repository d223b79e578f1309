"""Refiners: per-window algorithms behind one protocol (see ``base.py``).

Methods are looked up by name; heavy modules (torch models) are imported only
when their method is built, so ``refine --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable

from refine_cli.config import RefineConfig
from refine_cli.errors import UsageError
from refine_cli.refiners.base import Refiner


def _guided(config: RefineConfig, device: str) -> Refiner:
    from refine_cli.refiners.classical import GuidedRefiner

    return GuidedRefiner(config.guided)


def _fgs(config: RefineConfig, device: str) -> Refiner:
    from refine_cli.refiners.classical import FGSRefiner

    return FGSRefiner(config.guided)


def _coarse(config: RefineConfig, device: str) -> Refiner:
    from refine_cli.refiners.classical import CoarseRefiner

    return CoarseRefiner()


def _densecrf(config: RefineConfig, device: str) -> Refiner:
    from refine_cli.refiners.crf import build_densecrf

    return build_densecrf(config, device)


def _cascade(config: RefineConfig, device: str) -> Refiner:
    from refine_cli.refiners.cascade_method import CascadeMethod

    return CascadeMethod(config, device)


def _magnet(config: RefineConfig, device: str) -> Refiner:
    from refine_cli.refiners.magnet_method import MagnetRefiner

    return MagnetRefiner.from_options(config.magnet, segmenter=config.segmenter, device=device,
                                      backend=config.backend)


BUILDERS: dict[str, tuple[Callable[[RefineConfig, str], Refiner], str, bool]] = {
    # name: (builder, description, runs on torch)
    "guided": (_guided, "colour guided filter of the coarse mask (no weights)", False),
    "fgs": (_fgs, "fast global smoother of the coarse mask (no weights)", False),
    "coarse": (_coarse, "no refinement: the coarse mask resampled to the image (baseline, pure I/O)", False),
    "densecrf": (_densecrf, "fully connected CRF on the coarse mask (needs pydensecrf2; no weights)", False),
    "cascade": (_cascade, "CascadePSP global + local refinement (official or bundled lite weights)", True),
    "magnet-fast": (_magnet, "MagNet-Fast: multi-scale segmenter + MagNet refinement (--preset, --full, "
                    "--segmenter)", True),
}


def list_refiners() -> list[str]:
    """Names accepted by ``--method``."""
    return list(BUILDERS)


def describe_refiners() -> dict[str, str]:
    """``{name: one-line description}``."""
    return {k: v[1] for k, v in BUILDERS.items()}


def _entry(method: str) -> tuple[Callable[[RefineConfig, str], Refiner], str, bool]:
    entry = BUILDERS.get(method)
    if entry is None:
        raise UsageError(f"unknown --method {method!r}: choose one of {', '.join(BUILDERS)}")
    return entry


def uses_torch(method: str) -> bool:
    """Whether a method runs a torch model (and so cares about ``--device``)."""
    return _entry(method)[2]


def build_refiner(config: RefineConfig, device: str = "cpu") -> Refiner:
    """The refiner named by ``config.method``, on ``device`` (a resolved torch device string).

    Raises:
        UsageError: unknown method (the message lists the valid ones).
        WeightsError: the method's weights are missing or do not fit.
    """
    return _entry(config.method)[0](config, device)
