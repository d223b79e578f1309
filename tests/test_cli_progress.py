"""The CLI's progress display: one bar per stage, a spinner when the amount is unknown."""

from __future__ import annotations

import io

from rich.console import Console

from refine_cli import cli


def test_progress_shows_every_stage_and_spins_for_unknown_amounts(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(cli, "err_console", Console(file=buf, force_terminal=True, width=120))
    with cli._Progress(enabled=True) as progress:
        progress("segmenter", 0, 0)  # unknown amount: a spinner, no total
        progress("segmenter", 1, 1)
        progress("cascade global step", 0, 1)
        progress("level 1/2 cascade tiles", 3, 10)
        bar = progress._bar
        tasks = {t.description: t for t in bar.tasks}
        assert set(tasks) == {"segmenter", "cascade global step", "level 1/2 cascade tiles"}
        assert tasks["segmenter"].completed == 1 and tasks["level 1/2 cascade tiles"].total == 10
    assert "segmenter" in buf.getvalue()


def test_progress_is_off_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(cli, "err_console", Console(file=io.StringIO(), force_terminal=False))
    with cli._Progress(enabled=True) as progress:
        progress("segmenter", 0, 0)
        assert progress._bar is None
