"""``refine eval``: IoU, mBA and boundary F-score of predicted masks against ground truth.

A thin translator over :mod:`refine_cli.evaluation_io`: options become
:class:`~refine_cli.evaluate.EvalOptions`, one call evaluates, the result is
rendered as a Rich table on stderr and, with ``--json``, as JSON on stdout.

Mounted by ``cli._mount_optional`` through :func:`register` (a plain command,
not a group). No OpenCV or torch import at module top.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from refine_cli.commands.console import Debug, Quiet, Verbose, configure_logging, err_console

if TYPE_CHECKING:
    from rich.table import Table

    from refine_cli.evaluation_io import EvalSummary


def eval_cmd(
    pred: Annotated[str | None, typer.Argument(help="Predicted mask (hard, soft or label map), the GT's "
                                               "size.", show_default=False)] = None,
    gt: Annotated[str | None, typer.Argument(help="Ground-truth mask or label map.",
                                             show_default=False)] = None,
    coarse: Annotated[str | None, typer.Option("--coarse", "-c", help="Coarse mask the prediction was "
                                               "refined from (any resolution with the GT's aspect ratio); "
                                               "adds the gain (refined - coarse).")] = None,
    pred_dir: Annotated[str | None, typer.Option("--pred-dir", help="Folder of predictions (paired with "
                                                 "--gt-dir by file name without extension).")] = None,
    gt_dir: Annotated[str | None, typer.Option("--gt-dir", help="Folder of ground-truth masks.")] = None,
    coarse_dir: Annotated[str | None, typer.Option("--coarse-dir", help="Folder of coarse masks (same names) "
                                                   "for the gain.")] = None,
    threshold: Annotated[float, typer.Option(help="Soft predictions are foreground at or above this fraction "
                                             "of full scale.")] = 0.5,
    tolerance: Annotated[int, typer.Option(help="Boundary F-score matching distance, px.")] = 2,
    labels: Annotated[bool, typer.Option("--labels", help="Inputs are label maps: per-class IoU and mIoU "
                                         "(plus the metrics of label > 0).")] = False,
    classes: Annotated[int | None, typer.Option(help="Label maps with this many classes (implies --labels).")]
    = None,
    ignore_index: Annotated[int | None, typer.Option(help="Label mode: GT value left out of every count.")]
    = None,
    window: Annotated[int, typer.Option(help="Core window side, px; memory grows with (window + 2 halo)^2.")]
    = 2048,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Score PRED against GT (or every pair of --pred-dir/--gt-dir): IoU, mBA, boundary F, per-class IoU."""
    from refine_cli.errors import UsageError
    from refine_cli.evaluate import EvalOptions
    from refine_cli.evaluation_io import EvalSummary as Summary
    from refine_cli.evaluation_io import evaluate_directories, evaluate_pair

    configure_logging(verbose, quiet)
    single = pred is not None or gt is not None
    many = pred_dir is not None or gt_dir is not None
    if single and many:
        raise UsageError("give either PRED GT or --pred-dir/--gt-dir, not both")
    if not single and not many:
        raise UsageError("nothing to evaluate: give PRED GT, or --pred-dir DIR --gt-dir DIR")
    if single and (pred is None or gt is None):
        raise UsageError("give both PRED and GT (or --pred-dir and --gt-dir)")
    if many and (pred_dir is None or gt_dir is None):
        raise UsageError("--pred-dir and --gt-dir go together: give both")
    if coarse_dir is not None and not many:
        raise UsageError("--coarse-dir goes with --pred-dir/--gt-dir; for one pair use --coarse")
    if coarse is not None and many:
        raise UsageError("--coarse is for one PRED GT pair; with folders use --coarse-dir")
    if classes is not None and classes < 2:
        raise UsageError(f"--classes {classes} must be >= 2")
    options = EvalOptions(labels=labels or classes is not None, threshold=threshold, tolerance=tolerance,
                          ignore_index=ignore_index)

    if single:
        assert pred is not None and gt is not None
        result = evaluate_pair(pred, gt, coarse, options=options, window=window, classes=classes)
        summary = Summary([result], options, window)
    else:
        assert pred_dir is not None and gt_dir is not None
        summary = evaluate_directories(pred_dir, gt_dir, coarse_dir, options=options, window=window,
                                       classes=classes)
    if json_out:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
    if not quiet:
        err_console.print(render_table(summary))
        if summary.options.labels:
            err_console.print(render_class_table(summary))


def render_table(summary: EvalSummary) -> Table:
    """One row per image (and a mean row when there are several): IoU, mBA, boundary F (and gains)."""
    from rich.table import Table

    from refine_cli.evaluation_io import format_metric

    opts = summary.options
    tol = opts.tolerance
    title = f"refine eval: {len(summary.results)} image(s), threshold {opts.threshold:g}, BF at {tol} px"
    table = Table(title=title, title_justify="left")
    table.add_column("image")
    cols: list[tuple[str, str]] = []
    if opts.binary:
        cols += [("IoU", "iou"), ("mBA", "mba"), (f"BF@{tol}", "boundary_f")]
    if opts.labels:
        cols.append(("mIoU", "miou"))
    for head, _ in cols:
        table.add_column(head, justify="right")
    coarse = summary.has_coarse
    if coarse:
        for head, _ in cols:
            table.add_column(f"Δ{head}", justify="right")
    table.add_column("s", justify="right")

    def row(name: str, values: dict[str, float], gains: dict[str, float] | None, seconds: str,
            style: str | None = None) -> None:
        cells = [name] + [format_metric(values.get(k)) for _, k in cols]
        if coarse:
            cells += [_signed(None if gains is None else gains.get(k)) for _, k in cols]
        table.add_row(*cells, seconds, style=style)

    for r in summary.results:
        row(r.name, r.metrics.scalars(), r.gain, f"{r.seconds:.2f}")
    if len(summary.results) > 1:
        table.add_section()
        row("mean", summary.mean(), summary.mean_gain(), f"{sum(r.seconds for r in summary.results):.2f}",
            style="bold")
    return table


def render_class_table(summary: EvalSummary, max_rows: int = 40) -> Table:
    """Mean IoU per class over the images (label mode); long lists are cut to ``max_rows``."""
    from rich.table import Table

    from refine_cli.evaluation_io import format_metric

    per_class = summary.mean_class_iou()
    table = Table(title=f"per-class IoU ({len(per_class)} classes; mean over images where present)",
                  title_justify="left")
    table.add_column("class", justify="right")
    table.add_column("IoU", justify="right")
    items = list(per_class.items())
    for k, v in items[:max_rows]:
        table.add_row(str(k), format_metric(v))
    if len(items) > max_rows:
        table.add_row("...", f"{len(items) - max_rows} more in --json")
    return table


def _signed(value: float | None) -> str:
    if value is None:
        return "-"
    colour = "green" if value > 0 else "red" if value < 0 else "white"
    return f"[{colour}]{value:+.4f}[/]"


def register(parent: typer.Typer, name: str = "eval") -> None:
    """Add ``refine eval`` to ``parent`` as a plain command (once)."""
    if any(c.name == name for c in parent.registered_commands):
        return
    parent.command(name)(eval_cmd)
