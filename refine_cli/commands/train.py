"""Train a refinement module on generated composites: CascadePSP (lite or official) or MagNet's.

A thin translator over :mod:`refine_cli.train.trainer` and :mod:`refine_cli.train.magnet`:
flags become a ``TrainConfig`` (or a ``MagnetTrainConfig`` for ``--arch magnet-refinement``),
one training call runs, and the result is rendered. The same calls from Python::

    from refine_cli.train.trainer import TrainConfig, train
    train(TrainConfig(out="runs/lite", steps=6000))

    from refine_cli.train.magnet import MagnetTrainConfig, train_magnet
    train_magnet(MagnetTrainConfig(out="runs/magnet", steps=800, threads=1))

User errors are ``RefineError`` subclasses (``cli.py`` prints them as one red line). Logs,
the progress bar (terminals only) and the summary go to stderr; stdout gets the path of the
best exported weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    help="Train a CascadePSP refinement module, or MagNet's for a frozen segmenter, on generated composites "
    "(CPU or CUDA).",
    invoke_without_command=True,
    add_completion=False,
)


def _stderr() -> Console:
    return Console(stderr=True)


class _Bar:
    """Rich progress bar of the steps on stderr; inactive when stderr is not a terminal."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled and console.is_terminal
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=True,
            )
            self._bar.__enter__()
        return self

    def __call__(self, step: int, total: int, loss: float) -> None:
        if self._bar is None:
            return
        if self._task is None:
            self._task = self._bar.add_task("train", total=total, completed=step - 1, loss="-")
        self._bar.update(self._task, completed=step, total=total, loss=f"{loss:.4f}")

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


@app.callback(invoke_without_command=True)
def train_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: checkpoint.pt, best.pt/.json, "
                                      "final.pt/.json, log.jsonl.")],
    arch: Annotated[str | None, typer.Option(help="cascadepsp-lite (default), cascadepsp (official "
                                             "architecture, from scratch) or magnet-refinement.")] = None,
    arch_params: Annotated[str | None, typer.Option(
        "--arch-params", help='cascadepsp-lite only: JSON of architecture fields to change from the shipped '
        'v1, e.g. \'{"widths": [32, 64, 128], "psp": 96}\'.')] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps in total (default 6000).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Crops per step (default 8).")] = None,
    crop: Annotated[int | None, typer.Option(help="Crop side in px, multiple of 8 (default 224).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak AdamW learning rate (default 2e-3).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.pt "
                                         "(only --steps, --threads, --workers, --device, --val-every and "
                                         "--ckpt-every may change; the data mix, --kinds and "
                                         "--perturbations included, may not).")] = False,
    val_every: Annotated[int | None, typer.Option(help="Validate every N steps (default 500; 0 = at the "
                                                  "end only).")] = None,
    val_size: Annotated[int | None, typer.Option(help="Validation sample side and global-step size L "
                                                 "(default 320).")] = None,
    val_n: Annotated[int | None, typer.Option(help="Validation samples (default 24).")] = None,
    ckpt_every: Annotated[int | None, typer.Option(help="Write checkpoint.pt every N steps (default 250).")]
    = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto (fp32 on CPU, bf16/fp16 on CUDA), fp32, bf16 "
                                                  "or fp16.")] = None,
    photos: Annotated[Path | None, typer.Option(help="Folder of photos for textures and backgrounds "
                                                "(default ../shared/data/photos).")] = None,
    portraits: Annotated[Path | None, typer.Option(help="Folder with image/ and alpha*/ portraits (default "
                                                   "../shared/data/p3m-portraits-pseudogt).")] = None,
    pairs: Annotated[Path | None, typer.Option(help="CSV or folder of your own image/mask pairs to mix in "
                                               "(as pairs=0.3 unless --kinds names pairs).")]
    = None,
    kinds: Annotated[str | None, typer.Option(
        "--kinds", help="Sample kinds and their relative weights, name=weight,...; a bare name weighs 1: "
        "shapes, portraits, pairs, aerial, cells, thin (default portraits=0.38,shapes=0.62). Validation "
        "uses the same kinds, balanced, and best.pt is the step with the highest mean over kinds of the "
        "IoU gain over the coarse masks. Fixed for the run (--resume keeps it).")] = None,
    perturbations: Annotated[str | None, typer.Option(
        "--perturbations", help="Coarse masks and their relative weights, name=weight,...: cascadepsp, "
        "lowres, blobs, detector (the scene kinds' detector-like mask; cascadepsp for other kinds) "
        "(default blobs=0.25,cascadepsp=0.45,lowres=0.3). Fixed for the run.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of initialisation and data (default 0).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    workers: Annotated[int | None, typer.Option(help="Data-generation processes (default 1).")] = None,
    segmenter: Annotated[str | None, typer.Option(help="magnet-refinement only: the frozen segmenter, a "
                                                  "registry name or model file (default mediapipe-selfie).")]
    = None,
    samples: Annotated[int | None, typer.Option(help="magnet-refinement only: composites in the segmenter "
                                                "cache (default 400).")] = None,
    init: Annotated[str | None, typer.Option(help="Fine-tune from these weights: an exported .pt (its .json "
                                             "sidecar beside it) or a registry name, e.g. cascadepsp-lite-v2.")]
    = None,
    tiny: Annotated[bool, typer.Option("--tiny", help="CI smoke mode: a minute model, 8 steps of 2 x 64 px "
                                       "crops, 2 validation samples.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output.")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
) -> None:
    """Train a refinement module (CascadePSP's or MagNet's recipe); checkpoints and weights go to --out."""
    from refine_cli.cli import configure_logging
    from refine_cli.errors import UsageError
    from refine_cli.train import magnet, trainer

    configure_logging(verbose, quiet)
    given = {
        "arch": arch, "steps": steps, "batch_size": batch_size, "crop": crop, "lr": lr,
        "val_every": val_every, "val_size": val_size, "val_n": val_n, "ckpt_every": ckpt_every,
        "device": device, "precision": precision, "seed": seed, "threads": threads, "workers": workers,
    }
    console = _stderr()
    stored_arch = magnet.checkpoint_arch(out) if resume and arch is None else None
    if magnet.ARCH in (arch, stored_arch):
        cascade_only = {"--val-size": val_size, "--val-n": val_n, "--precision": precision,
                        "--workers": workers, "--pairs": pairs, "--arch-params": arch_params,
                        "--kinds": kinds, "--perturbations": perturbations}
        bad = [flag for flag, value in cascade_only.items() if value is not None]
        if bad:
            raise UsageError(f"{', '.join(bad)} do not apply to --arch {magnet.ARCH}; drop them")
        settings: dict[str, Any] = dict(magnet.TINY) if tiny else {}
        extra = {"segmenter": segmenter, "samples": samples, "photos": photos, "portraits": portraits,
                 "init": init}
        settings.update({k: v for k, v in {**given, **extra}.items() if v is not None and k != "arch"})
        with _Bar(console, enabled=not quiet) as bar:
            result = magnet.train_magnet(magnet.MagnetTrainConfig(out=out, **settings), resume=resume,
                                         overrides=settings, progress=bar)
    else:
        if segmenter is not None or samples is not None:
            raise UsageError(f"--segmenter and --samples apply to --arch {magnet.ARCH} only; drop them")
        settings = dict(trainer.TINY) if tiny else {}
        settings.update({k: v for k, v in {**given, "init": init}.items() if v is not None})
        if init is not None:
            settings.pop("arch_params", None)  # the weights bring their architecture (--tiny's included)
        if arch_params is not None:
            settings["arch_params"] = trainer.parse_arch_params(arch_params, settings.get("arch_params"))
        folders = {"photos": photos, "portraits": portraits, "pairs": pairs}
        data: dict[str, Any] = {k: v for k, v in folders.items() if v is not None}
        if kinds is not None:
            data["kinds"] = trainer.parse_mix(kinds, trainer.KINDS, "--kinds")
        if perturbations is not None:
            data["perturbations"] = trainer.parse_mix(perturbations, trainer.COARSE_METHODS,
                                                      "--perturbations")
        if data:
            settings["data"] = trainer.DataConfig(**data)
        cfg = trainer.TrainConfig(out=out, **settings)
        # on --resume only the data fields given are compared with the stored run's
        overrides = {**settings, "data": data} if data else settings
        with _Bar(console, enabled=not quiet) as bar:
            result = trainer.train(cfg, resume=resume, overrides=overrides, progress=bar)
    if not quiet:
        _print_summary(console, result)
    best = result.out / "best.pt"
    typer.echo(str(best if best.is_file() else result.final_weights))


def _print_summary(console: Console, result: Any) -> None:
    """The last and the best validation, overall and per kind, as a Rich table on stderr."""
    from rich.table import Table

    from refine_cli.train.trainer import selection_score

    caption = None
    if result.best:
        caption = (f"best.pt: step {result.best['step']}, the highest mean over kinds of the IoU gain "
                   f"({selection_score(result.best):+.4f})")
    table = Table(title=f"refine train: {result.steps} steps in {result.out}", title_justify="left",
                  caption=caption, caption_justify="left")
    for col in ("", "IoU", "mBA", "coarse IoU", "coarse mBA", "IoU gain"):
        table.add_column(col)
    for name, res in (("last validation", result.validations[-1] if result.validations else None),
                      ("best", result.best)):
        if not res:
            continue
        table.add_row(f"{name} (step {res['step']})", f"{res['iou']:.4f}", f"{res['mba']:.4f}",
                      f"{res['coarse_iou']:.4f}", f"{res['coarse_mba']:.4f}",
                      f"{res['iou'] - res['coarse_iou']:+.4f}")
        for kind, k in (res.get("by_kind") or {}).items():
            gain = k["iou"] - k["coarse_iou"]
            table.add_row(f"  {kind} ({k['n']})", f"{k['iou']:.4f}", f"{k['mba']:.4f}",
                          f"{k['coarse_iou']:.4f}", f"{k['coarse_mba']:.4f}", f"{gain:+.4f}")
    console.print(table)
