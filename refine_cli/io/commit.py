"""The two-phase commit that every output of a run shares (raster sinks, polygon files).

An output finishes its files under temporary names (:meth:`TwoPhaseOutput.prepare`), renames them
into place (:meth:`TwoPhaseOutput.publish`) and, when anything fails, removes the temporaries and
whatever it already renamed (:meth:`TwoPhaseOutput.rollback`). The run's writer drives the phases
over all its outputs at once, so they are one unit; :meth:`TwoPhaseOutput.commit` does them for an
output on its own.
"""

from __future__ import annotations

import os

from refine_cli.errors import OutputExistsError


class TwoPhaseOutput:
    """An output committed in two phases; subclasses provide the phases, this class the order.

    Attributes:
        path: the final path of the output (``-`` for stdout).
    """

    path: str

    def prepare(self) -> None:
        """Phase 1: finish every file of this output under a temporary name (fsynced)."""
        raise NotImplementedError

    def check_publishable(self) -> None:
        """Refuse before any rename when a final name exists and ``overwrite`` is false."""
        raise NotImplementedError

    def publish(self) -> None:
        """Phase 2: rename the prepared files to their final names."""
        raise NotImplementedError

    def rollback(self) -> None:
        """Remove the prepared temporaries and the files this output already published."""
        raise NotImplementedError

    def cleanup(self) -> None:  # noqa: B027 - optional
        """After the whole unit is published: drop what is no longer needed (nothing by default)."""

    def abort(self) -> None:
        """Drop everything written; no file remains."""
        raise NotImplementedError

    def commit(self) -> None:
        """Prepare and publish this output on its own, then clean up; nothing stays on failure."""
        try:
            self.prepare()
            self.publish()
        except BaseException:
            self.rollback()
            raise
        self.cleanup()


def refuse_appeared(final: str, overwrite: bool) -> None:
    """Refuse to publish over ``final`` when it appeared during the run and ``overwrite`` is false.

    Raises:
        OutputExistsError: ``final`` exists and ``overwrite`` is false.
    """
    if not overwrite and os.path.exists(final):
        raise OutputExistsError(f"output {final} appeared while running; pass --overwrite to replace it")
