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
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from refine_cli.commands.console import Debug, ProgressBars, Quiet, Verbose, configure_logging, err_console
from refine_cli.errors import UsageError

if TYPE_CHECKING:
    from refine_cli.train.runtime import TrainResult

app = typer.Typer(
    help="Train a CascadePSP refinement module, or MagNet's for a frozen segmenter, on generated composites "
    "(CPU or CUDA).",
    invoke_without_command=True,
    add_completion=False,
)


class _Bar:
    """``bar(step, total, loss)``: the training steps as one progress bar with the loss, on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.bars = ProgressBars(enabled, fields=("loss",))

    def __enter__(self) -> _Bar:
        self.bars.__enter__()
        return self

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.bars("train", step, total, loss=f"{loss:.4f}")

    def __exit__(self, *exc: object) -> None:
        self.bars.__exit__(*exc)


# the options of ``refine train``, one alias each (typer reads the help from the annotation)
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder: checkpoint.pt, best.pt/.json, "
                                      "final.pt/.json, log.jsonl.")]
ArchOpt = Annotated[str | None, typer.Option(help="cascadepsp-lite (default), cascadepsp (official "
                                             "architecture, from scratch) or magnet-refinement.")]
ArchParamsOpt = Annotated[str | None, typer.Option(
    "--arch-params", help='cascadepsp-lite only: JSON of architecture fields to change from the shipped '
    'v1, e.g. \'{"widths": [32, 64, 128], "psp": 96}\'.')]
StepsOpt = Annotated[int | None, typer.Option(help="Optimiser steps in total (default 6000).")]
BatchOpt = Annotated[int | None, typer.Option(help="Crops per step (default 8).")]
CropOpt = Annotated[int | None, typer.Option(help="Crop side in px, multiple of 8 (default 224).")]
LrOpt = Annotated[float | None, typer.Option(help="Peak AdamW learning rate (default 2e-3).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.pt "
                                         "(only --steps, --threads, --workers, --device, --val-every and "
                                         "--ckpt-every may change; the data mix, --kinds and "
                                         "--perturbations included, may not).")]
ValEveryOpt = Annotated[int | None, typer.Option(help="Validate every N steps (default 500; 0 = at the "
                                                 "end only).")]
ValSizeOpt = Annotated[int | None, typer.Option(help="Validation sample side and global-step size L "
                                                "(default 320).")]
ValNOpt = Annotated[int | None, typer.Option(help="Validation samples (default 24).")]
CkptEveryOpt = Annotated[int | None, typer.Option(help="Write checkpoint.pt every N steps (default 250).")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[str | None, typer.Option(help="auto (fp32 on CPU, bf16/fp16 on CUDA), fp32, bf16 "
                                                  "or fp16.")]
PhotosOpt = Annotated[Path | None, typer.Option(help="Folder of photos for textures and backgrounds "
                                                "(default ../shared/data/photos).")]
PortraitsOpt = Annotated[Path | None, typer.Option(help="Folder with image/ and alpha*/ portraits (default "
                                                   "../shared/data/p3m-portraits-pseudogt).")]
PairsOpt = Annotated[Path | None, typer.Option(help="CSV or folder of your own image/mask pairs to mix in "
                                               "(as pairs=0.3 unless --kinds names pairs).")]
KindsOpt = Annotated[str | None, typer.Option(
    "--kinds", help="Sample kinds and their relative weights, name=weight,...; a bare name weighs 1: "
    "shapes, portraits, pairs, aerial, cells, thin (default portraits=0.38,shapes=0.62). Validation "
    "uses the same kinds, balanced, and best.pt is the step with the highest mean over kinds of the "
    "IoU gain over the coarse masks. Fixed for the run (--resume keeps it).")]
PerturbationsOpt = Annotated[str | None, typer.Option(
    "--perturbations", help="Coarse masks and their relative weights, name=weight,...: cascadepsp, "
    "lowres, blobs, detector (the scene kinds' detector-like mask; cascadepsp for other kinds) "
    "(default blobs=0.25,cascadepsp=0.45,lowres=0.3). Fixed for the run.")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed of initialisation and data (default 0).")]
ThreadsOpt = Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")]
WorkersOpt = Annotated[int | None, typer.Option(help="Data-generation processes (default 1).")]
SegmenterOpt = Annotated[str | None, typer.Option(help="magnet-refinement only: the frozen segmenter, a "
                                                  "registry name or model file (default mediapipe-selfie).")]
SamplesOpt = Annotated[int | None, typer.Option(help="magnet-refinement only: composites in the segmenter "
                                                "cache (default 400).")]
InitOpt = Annotated[str | None, typer.Option(help="Fine-tune from these weights: an exported .pt (its .json "
                                             "sidecar beside it) or a registry name, e.g. "
                                             "cascadepsp-lite-v2.")]
TinyOpt = Annotated[bool, typer.Option("--tiny", help="CI smoke mode: a minute model, 8 steps of 2 x 64 px "
                                       "crops, 2 validation samples.")]


@app.callback(invoke_without_command=True)
def train_cmd(
    out: OutOpt,
    arch: ArchOpt = None,
    arch_params: ArchParamsOpt = None,
    steps: StepsOpt = None,
    batch_size: BatchOpt = None,
    crop: CropOpt = None,
    lr: LrOpt = None,
    resume: ResumeOpt = False,
    val_every: ValEveryOpt = None,
    val_size: ValSizeOpt = None,
    val_n: ValNOpt = None,
    ckpt_every: CkptEveryOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    photos: PhotosOpt = None,
    portraits: PortraitsOpt = None,
    pairs: PairsOpt = None,
    kinds: KindsOpt = None,
    perturbations: PerturbationsOpt = None,
    seed: SeedOpt = None,
    threads: ThreadsOpt = None,
    workers: WorkersOpt = None,
    segmenter: SegmenterOpt = None,
    samples: SamplesOpt = None,
    init: InitOpt = None,
    tiny: TinyOpt = False,
    verbose: Verbose = 1,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Train a refinement module (CascadePSP's or MagNet's recipe); checkpoints and weights go to --out."""
    from refine_cli.train import magnet

    configure_logging(verbose, quiet)
    given = {
        "arch": arch, "steps": steps, "batch_size": batch_size, "crop": crop, "lr": lr,
        "val_every": val_every, "val_size": val_size, "val_n": val_n, "ckpt_every": ckpt_every,
        "device": device, "precision": precision, "seed": seed, "threads": threads, "workers": workers,
    }
    stored_arch = magnet.checkpoint_arch(out) if resume and arch is None else None
    bar = _Bar(enabled=not quiet)
    if magnet.ARCH in (arch, stored_arch):
        cascade_only = {"--val-size": val_size, "--val-n": val_n, "--precision": precision,
                        "--workers": workers, "--pairs": pairs, "--arch-params": arch_params,
                        "--kinds": kinds, "--perturbations": perturbations}
        extra = {"segmenter": segmenter, "samples": samples, "photos": photos, "portraits": portraits,
                 "init": init}
        result = _train_magnet(out, given, extra, cascade_only, tiny=tiny, resume=resume, bar=bar)
    else:
        if segmenter is not None or samples is not None:
            raise UsageError(f"--segmenter and --samples apply to --arch {magnet.ARCH} only; drop them")
        folders = {"photos": photos, "portraits": portraits, "pairs": pairs}
        mixes = {"kinds": kinds, "perturbations": perturbations}
        result = _train_cascade(out, {**given, "init": init}, arch_params, folders, mixes, tiny=tiny,
                                resume=resume, bar=bar)
    if not quiet:
        _print_summary(err_console, result)
    best = result.out / "best.pt"
    typer.echo(str(best if best.is_file() else result.final_weights))


def _train_magnet(
    out: Path, given: dict[str, Any], extra: dict[str, Any], cascade_only: dict[str, Any], *, tiny: bool,
    resume: bool, bar: _Bar,
) -> TrainResult:
    """``--arch magnet-refinement``: refuse the CascadePSP-only flags, then train MagNet's module.

    Args:
        out: the run's folder.
        given: the shared flags (``None``: not given).
        extra: MagNet's own flags and the data folders.
        cascade_only: ``flag -> value`` of the flags MagNet's recipe has no use for.
        tiny: apply ``--tiny``'s settings first.
        resume: continue the run in ``out``.
        bar: the progress bar, entered around the training.
    """
    from refine_cli.train import magnet

    bad = [flag for flag, value in cascade_only.items() if value is not None]
    if bad:
        raise UsageError(f"{', '.join(bad)} do not apply to --arch {magnet.ARCH}; drop them")
    settings: dict[str, Any] = dict(magnet.TINY) if tiny else {}
    settings.update({k: v for k, v in {**given, **extra}.items() if v is not None and k != "arch"})
    with bar:
        return magnet.train_magnet(magnet.MagnetTrainConfig(out=out, **settings), resume=resume,
                                   overrides=settings, progress=bar)


def _train_cascade(
    out: Path, given: dict[str, Any], arch_params: str | None, folders: dict[str, Path | None],
    mixes: dict[str, str | None], *, tiny: bool, resume: bool, bar: _Bar,
) -> TrainResult:
    """A CascadePSP architecture (or a resumed run of any): build the ``TrainConfig`` and train.

    Args:
        out: the run's folder.
        given: the flags of ``TrainConfig`` fields, ``--init`` included (``None``: not given).
        arch_params: ``--arch-params`` JSON.
        folders: ``--photos``, ``--portraits``, ``--pairs``.
        mixes: ``--kinds`` and ``--perturbations`` text.
        tiny: apply ``--tiny``'s settings first.
        resume: continue the run in ``out``.
        bar: the progress bar, entered around the training.
    """
    from refine_cli.train import dispatch, trainer

    settings: dict[str, Any] = dict(trainer.TINY) if tiny else {}
    settings.update({k: v for k, v in given.items() if v is not None})
    if given.get("init") is not None:
        settings.pop("arch_params", None)  # the weights bring their architecture (--tiny's included)
    if arch_params is not None:
        settings["arch_params"] = trainer.parse_arch_params(arch_params, settings.get("arch_params"))
    data: dict[str, Any] = {k: v for k, v in folders.items() if v is not None}
    if mixes["kinds"] is not None:
        data["kinds"] = trainer.parse_mix(mixes["kinds"], trainer.KINDS, "--kinds")
    if mixes["perturbations"] is not None:
        data["perturbations"] = trainer.parse_mix(mixes["perturbations"], trainer.COARSE_METHODS,
                                                  "--perturbations")
    if data:
        settings["data"] = trainer.DataConfig(**data)
    cfg = trainer.TrainConfig(out=out, **settings)
    # on --resume only the data fields given are compared with the stored run's
    overrides = {**settings, "data": data} if data else settings
    with bar:
        return dispatch.train(cfg, resume=resume, overrides=overrides, progress=bar)


def _print_summary(console: Console, result: TrainResult) -> None:
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
