"""Refiners: per-window algorithms behind one protocol (see ``base.py``).

Methods are looked up by name; heavy modules (torch models) are imported only
when their method is built, so ``refine --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable

from refine_cli.config import RefineConfig
from refine_cli.errors import UsageError
from refine_cli.refiners.base import Refiner


def _guided(config: RefineConfig) -> Refiner:
    from refine_cli.refiners.classical import GuidedRefiner

    return GuidedRefiner(config.guided)


def _fgs(config: RefineConfig) -> Refiner:
    from refine_cli.refiners.classical import FGSRefiner

    return FGSRefiner(config.guided)


def _coarse(config: RefineConfig) -> Refiner:
    from refine_cli.refiners.classical import CoarseRefiner

    return CoarseRefiner()


BUILDERS: dict[str, tuple[Callable[[RefineConfig], Refiner], str]] = {
    "guided": (_guided, "colour guided filter of the coarse mask (no weights)"),
    "fgs": (_fgs, "fast global smoother of the coarse mask (no weights)"),
    "coarse": (_coarse, "no refinement: the coarse mask resampled to the image (baseline, pure I/O)"),
}


def list_refiners() -> list[str]:
    """Names accepted by ``--method``."""
    return list(BUILDERS)


def describe_refiners() -> dict[str, str]:
    """``{name: one-line description}``."""
    return {k: v[1] for k, v in BUILDERS.items()}


def build_refiner(config: RefineConfig) -> Refiner:
    """The refiner named by ``config.method``.

    Raises:
        UsageError: unknown method (the message lists the valid ones).
    """
    entry = BUILDERS.get(config.method)
    if entry is None:
        raise UsageError(f"unknown --method {config.method!r}: choose one of {', '.join(BUILDERS)}")
    return entry[0](config)
