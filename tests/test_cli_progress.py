"""The CLI's progress display: one bar per stage, a spinner when the amount is unknown."""

from __future__ import annotations

import io

from rich.console import Console

from refine_cli.commands import console
from refine_cli.commands.console import ProgressBars


def test_progress_shows_every_stage_and_spins_for_unknown_amounts(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(console, "err_console", Console(file=buf, force_terminal=True, width=120))
    with ProgressBars(enabled=True) as progress:
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
    monkeypatch.setattr(console, "err_console", Console(file=io.StringIO(), force_terminal=False))
    with ProgressBars(enabled=True) as progress:
        progress("segmenter", 0, 0)
        assert progress._bar is None


def test_bars_reset_advance_and_count_bytes(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(console, "err_console", Console(file=buf, force_terminal=True, width=120))
    with ProgressBars(enabled=True) as bars:
        bars("files", 0, 3)
        bars.advance("files")
        bars.reset("tiles", "  a.tif")
        bars("tiles", 5, 10, description="  a.tif level 1")
        tasks = {t.description: t for t in bars._bar.tasks}
        assert tasks["files"].completed == 1 and tasks["files"].total == 3
        assert tasks["  a.tif level 1"].completed == 5
    with ProgressBars(enabled=True, unit="bytes") as bars:
        bars("model.pt", 2_000_000, 4_000_000)
    assert "model.pt" in buf.getvalue() and "MB" in buf.getvalue()


def test_every_command_takes_the_same_verbosity_switches():
    import typer

    from refine_cli import cli

    group = typer.main.get_command(cli.app)
    commands = dict(group.commands)
    for sub in ("weights",):
        commands.update({f"{sub} {k}": v for k, v in commands.pop(sub).commands.items()})
    for name, cmd in commands.items():
        opts = {o for p in cmd.params for o in p.opts}
        assert {"-v", "--verbose", "-q", "--quiet", "--debug"} <= opts, name
