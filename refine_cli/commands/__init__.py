"""Typer sub-apps of the ``refine`` command line (mounted by ``refine_cli.cli``)."""
