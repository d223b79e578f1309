"""Weights registry, cache, download, verification and safe loading. No inference.

Each checkpoint the project knows is one frozen :class:`WeightsRecord` in ``_REGISTRY``
(an explicit dict: add a record there). Downloaded or imported files live in the cache::

    $REFINE_HOME/weights/<record.filename>          the checkpoint (default REFINE_HOME: ~/.cache/refine)
    $REFINE_HOME/weights/<record.filename>.json     sidecar: size, md5, sha256, source, time
    $REFINE_HOME/weights/<record.filename>.part     an interrupted download (resumed with HTTP Range)

A file enters the cache only after its size / md5 / sha256 match what the record knows,
and always by an atomic rename. The sidecar records the sha256 on first fetch or import,
so :func:`verify` detects later corruption even where the record has no sha256.

Records are plain data (:mod:`refine_cli.weights.records`; MagNet's and the segmenters' in
:mod:`refine_cli.weights.magnet`); every checkpoint read and write, ``torch.load`` included,
is in :mod:`refine_cli.weights.files` (:func:`load_state_dict` is re-exported here).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refine_cli.errors import InputError, UsageError, WeightsError
from refine_cli.hashing import Digests, file_digests
from refine_cli.weights.files import load_state_dict as load_state_dict
from refine_cli.weights.files import one_line
from refine_cli.weights.magnet import magnet_records
from refine_cli.weights.records import IMAGENET as IMAGENET
from refine_cli.weights.records import Normalization as Normalization
from refine_cli.weights.records import WeightsRecord

logger = logging.getLogger(__name__)

ENV_HOME = "REFINE_HOME"
"""Environment variable naming the cache root (default ``~/.cache/refine``)."""

DEFAULT_CASCADEPSP = "cascadepsp"
"""Registry name of the default CascadePSP checkpoint."""


ProgressFn = Callable[[int, int | None], None]
"""``progress(bytes_done, bytes_total_or_None)``."""


CASCADEPSP = WeightsRecord(
    name=DEFAULT_CASCADEPSP,
    architecture="cascadepsp_official",
    url="https://github.com/hkchengrex/CascadePSP/releases/download/v1.0/model",
    filename="cascadepsp_v1.0_model.pth",
    size=None,
    approx_size=271_000_000,  # "259MB" in the upstream docs is MiB (the fp32 state is 258.4 MiB)
    md5="7478d4a9c42ab52beb6d7e9683402fe0",
    sha256=None,
    license="code MIT (hkchengrex/CascadePSP); no separate licence stated for the weights; "
    "trained on MSRA-10K, DUTS, ECSSD, FSS-1000 (their own terms)",
    normalization=IMAGENET,
    notes="Official CascadePSP refinement module (segmentation-refinement 0.6 download), "
    "a DataParallel state_dict with 'module.' keys; likely the paper model (not verified). "
    "md5 from the package's download check; sha256 recorded in the cache sidecar on first fetch/import.",
)

def _lite_record(version: str, size: int, sha256: str, notes: str) -> WeightsRecord:
    """A self-trained CascadePSP-lite checkpoint shipped in ``weights/`` (model card: weights/README.md)."""
    name = f"cascadepsp-lite-{version}"
    return WeightsRecord(
        name=name,
        architecture="cascadepsp-lite",
        url=None,
        filename=f"{name}.pt",
        size=size,
        approx_size=size,
        md5=None,
        sha256=sha256,
        license="MIT (this project); trained by `refine train` on composites of the photos listed in "
        "weights/README.md (CC-BY/CC-BY-SA/CC0/GPL-2+ sources, see there)",
        normalization=IMAGENET,
        notes=notes,
        strip_prefixes=(),
        bundled=f"{name}.pt",
    )


DEFAULT_CASCADEPSP_LITE = "cascadepsp-lite-v2"

CASCADEPSP_LITE = _lite_record(
    "v2", 2_172_006, "90014e5764208a5d9fb5ecf5f69b21c7d3b937bc5cb8bf05cdbe60f0a864b86d",
    "Self-trained CascadePSP-lite (20 400 steps on one GPU) shipped in weights/; the default "
    "--method cascade weights when the official checkpoint is not in the cache.",
)

CASCADEPSP_LITE_V1 = _lite_record(
    "v1", 2_174_940, "66c97d062a677d94e83eeb147278503de3a551137858a3caea9e12defcf22b45",
    "The first self-trained CascadePSP-lite (2 000 steps on 2 CPU cores), kept for comparison; same "
    "architecture as v2, lower quality (weights/README.md).",
)

CASCADEPSP_LITE_V3 = _lite_record(
    "v3", 2_172_211, "248503d8e18ba474c4ffaee08f37deff0e1f662a5f78e892223f1eccc18f7f61",
    "CascadePSP-lite fine-tuned from v2 (1 750 steps on 2 CPU cores) on photos and the aerial, cells "
    "and thin scene families; same architecture; `--weights cascadepsp-lite-v3` "
    "(weights/README.md: where it beats v2).",
)

_REGISTRY: dict[str, WeightsRecord] = {
    r.name: r for r in (CASCADEPSP, CASCADEPSP_LITE, CASCADEPSP_LITE_V3, CASCADEPSP_LITE_V1)
}


BUNDLED_PACKAGE = "refine_cli._bundled"
"""The package that holds the checkpoints shipped with refine.

``pyproject.toml`` maps it onto the repository's top-level ``weights/`` folder (setuptools
``package-dir``) and ships its ``*.pt`` / ``*.json`` / ``*.md`` as package data, so the same name
resolves in a wheel install (``site-packages/refine_cli/_bundled/``) and in an editable install
(setuptools' editable finder maps it to the checkout's ``weights/``, which needs its ``__init__.py``).
"""


def bundled_dir() -> Path:
    """The folder of the checkpoints shipped with refine (package :data:`BUNDLED_PACKAGE`).

    The one place that locates them: found through the import system, never relative to this
    file, so it works for wheel and editable installs alike.

    Raises:
        WeightsError: the package is missing (an editable install made before the mapping
            existed: reinstall with ``pip install -e .``) or not on the file system (zip import).
    """
    import importlib.resources

    try:
        root = importlib.resources.files(BUNDLED_PACKAGE)
    except ModuleNotFoundError as exc:
        raise WeightsError(
            f"the weights shipped with refine are missing: package {BUNDLED_PACKAGE} is not installed "
            "(an old editable install? rerun `pip install -e .` in the checkout, or reinstall refine)"
        ) from exc
    if not isinstance(root, Path):
        raise WeightsError(f"the weights shipped with refine ({BUNDLED_PACKAGE}) are not on the file system "
                           f"({root}); install refine as a regular (unzipped) package")
    return root


def bundled_path(record: WeightsRecord) -> Path | None:
    """The shipped copy of a self-trained checkpoint (in :func:`bundled_dir`), ``None`` if it has none."""
    if record.bundled is None:
        return None
    return bundled_dir() / record.bundled


# --------------------------------------------------------------------------------------------
# registry and cache paths


def list_records() -> list[WeightsRecord]:
    """All known checkpoints, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_record(name: str) -> WeightsRecord:
    """The record called ``name``.

    Raises:
        UsageError: unknown name (the message lists the valid ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown weights {name!r}: use one of {', '.join(sorted(_REGISTRY))}") from None


def refine_home() -> Path:
    """The cache root: ``$REFINE_HOME`` or ``~/.cache/refine``."""
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refine"


def cache_path(name: str) -> Path:
    """Where the checkpoint ``name`` lives in the cache (whether present or not)."""
    return refine_home() / "weights" / get_record(name).filename


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_sidecar(name: str) -> dict[str, Any]:
    """The cache sidecar of ``name`` (``{}`` when absent or unreadable)."""
    try:
        return dict(json.loads(_sidecar_path(cache_path(name)).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------------
# digests and verification


def _mismatch(record: WeightsRecord, digests: Digests, sha256: str | None) -> str | None:
    """The first field that differs from what is known, as ``'md5 X, expected Y'``, or ``None``."""
    checks = (
        ("size", record.size, digests.size),
        ("md5", record.md5, digests.md5),
        ("sha256", sha256, digests.sha256),
    )
    for field, want, got in checks:
        if want is not None and str(want).lower() != str(got).lower():
            return f"{field} {got}, expected {want}"
    return None


def _write_sidecar(record: WeightsRecord, path: Path, digests: Digests, source: str) -> None:
    meta = {
        "name": record.name,
        "filename": record.filename,
        "size": digests.size,
        "md5": digests.md5,
        "sha256": digests.sha256,
        "source": source,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    side = _sidecar_path(path)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, side)


def local_file(name: str) -> tuple[Path, str] | None:
    """Where a registry checkpoint is on this machine: ``(path, "cache" | "bundled")``, or ``None``.

    The cache wins over the copy shipped in the repository's ``weights/`` folder, as in
    :func:`resolve_weights`.
    """
    record = get_record(name)
    cached = cache_path(name)
    if cached.is_file():
        return cached, "cache"
    shipped = bundled_path(record)
    if shipped is not None and shipped.is_file():
        return shipped, "bundled"
    return None


def verify(name: str) -> Digests:
    """Check the checkpoint (cached, else the bundled copy) against the record and its sidecar.

    The record gives size, md5 and sha256; the sidecar its sha256.

    Records the sha256 in the cache sidecar when it was missing.

    Returns:
        The file's digests.

    Raises:
        WeightsError: not on this machine, or a checksum differs (the message says how to fix it).
    """
    record = get_record(name)
    found = local_file(name)
    if found is not None and found[1] == "bundled":
        digests = file_digests(found[0])
        problem = _mismatch(record, digests, record.sha256)
        if problem:
            raise WeightsError(f"checksum mismatch for the bundled {name} at {found[0]} ({problem}); "
                               f"restore it with `git checkout -- {found[0].name}` in weights/ "
                               "or reinstall refine")
        return digests
    path = cache_path(name)
    if not path.is_file():
        raise WeightsError(missing_message(record, path))
    digests = file_digests(path)
    side = read_sidecar(name)
    problem = _mismatch(record, digests, record.sha256 or side.get("sha256"))
    if problem:
        raise WeightsError(
            f"checksum mismatch for {name} at {path} ({problem}); run `refine weights fetch {name}` "
            f"or `refine weights import {name} FILE` to replace it"
        )
    if not side.get("sha256"):
        _write_sidecar(record, path, digests, side.get("source", "verified in cache"))
    return digests


# --------------------------------------------------------------------------------------------
# fetch and import


def short_license(text: str) -> str:
    """A licence text's first clause (up to a ``;`` outside brackets): ``Apache-2.0 (MediaPipe)``."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == ";" and depth == 0:
            return text[:i].strip()
    return text.strip()


def missing_message(record: WeightsRecord, dest: Path) -> str:
    """One line for weights that are not on this machine: the fetch command, size and licence, the import."""
    size = record.size or record.approx_size
    text = f"{size / 1e6:.0f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
    licence = short_license(record.license)
    about = "" if record.size else "~"
    return (f"weights {record.name!r} are not on this machine yet (looked in {dest}): run `refine weights "
            f"fetch {record.name}` once ({about}{text}, licence {licence}; later runs are "
            f"offline), or `refine weights import {record.name} FILE` with a copy")


def _offline_message(record: WeightsRecord, dest: Path, reason: object) -> str:
    return (
        f"cannot download {record.name!r} from {record.url} ({one_line(reason)}); download that URL "
        f"on a machine with network access and run `refine weights import {record.name} FILE` "
        f"(or copy the file to {dest})"
    )


def _download(record: WeightsRecord, part: Path, progress: ProgressFn | None, timeout: float) -> None:
    """Download ``record.url`` into ``part``, resuming from its current size with HTTP Range."""
    assert record.url is not None
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(record.url, headers={"User-Agent": "refine-cli"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the .part is complete
            return
        raise
    with resp:
        if offset and getattr(resp, "status", 200) != 206:
            logger.info("server ignored the Range request; downloading %s from the start", record.name)
            offset = 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length else record.size
        done = offset
        with open(part, "ab" if offset else "wb") as f:
            while block := resp.read(1024 * 1024):
                f.write(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)


def fetch(
    name: str, *, progress: ProgressFn | None = None, force: bool = False, timeout: float = 60.0
) -> Path:
    """Download a registry checkpoint into the cache (resumable), verify it, and return its path.

    A cached copy that verifies is returned without downloading (unless ``force``).

    Args:
        name: registry name.
        progress: ``progress(bytes_done, bytes_total_or_None)`` during the download.
        force: download again even when a verified copy is cached.
        timeout: socket timeout in seconds.

    Returns:
        The cached file.

    Raises:
        WeightsError: no network (one line saying where to put the file by hand and which
            ``refine weights import`` command to run), or the download fails verification.
    """
    record = get_record(name)
    dest = cache_path(name)
    if dest.is_file() and not force:
        try:
            verify(name)
            return dest
        except WeightsError as exc:
            logger.warning("%s; downloading it again", exc)
    if record.url is None:
        raise WeightsError(f"{name!r} has no download URL; run `refine weights import {name} FILE`")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    logger.info("downloading %s from %s", name, record.url)
    try:
        _download(record, part, progress, timeout)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
        raise WeightsError(_offline_message(record, dest, getattr(exc, "reason", exc))) from exc
    digests = file_digests(part)
    problem = _mismatch(record, digests, record.sha256)
    if problem:
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"the download of {name} from {record.url} is corrupt ({problem}); "
            f"run `refine weights fetch {name}` again"
        )
    os.replace(part, dest)
    _write_sidecar(record, dest, digests, record.url)
    logger.info("saved %s to %s (sha256 %s)", name, dest, digests.sha256)
    _warn_first_use(record, digests)
    return dest


def _warn_first_use(record: WeightsRecord, digests: Digests) -> None:
    """Say so when a file could not be checked against a published checksum."""
    if record.trust_on_first_use and not (record.md5 or record.sha256):
        logger.warning("%s has no published checksum: recorded sha256 %s on first use "
                       "(`refine weights verify %s` checks the file against it later)",
                       record.name, digests.sha256, record.name)


def import_file(name: str, file: str | Path) -> Path:
    """Copy a checkpoint obtained by hand into the cache, after verifying it against the record.

    Args:
        name: registry name.
        file: the downloaded checkpoint.

    Returns:
        The cached file (its sha256 is recorded in the sidecar).

    Raises:
        InputError: ``file`` does not exist.
        WeightsError: ``file`` is not the checkpoint the record describes.
    """
    record = get_record(name)
    src = Path(file).expanduser()
    if not src.is_file():
        raise InputError(f"{src} is not a file; give the path of the downloaded {name} checkpoint")
    digests = file_digests(src)
    problem = _mismatch(record, digests, record.sha256)
    if problem:
        where = f"download {record.url} again" if record.url else "check the file"
        raise WeightsError(f"{src} is not the {name} checkpoint ({problem}); {where}")
    dest = cache_path(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".import", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp_name)
        os.replace(tmp_name, dest)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    _write_sidecar(record, dest, digests, str(src.resolve()))
    _warn_first_use(record, digests)
    logger.info("imported %s into %s (sha256 %s)", src, dest, digests.sha256)
    return dest


# --------------------------------------------------------------------------------------------
# resolving and loading


@dataclass(frozen=True)
class ResolvedWeights:
    """A checkpoint file ready to load.

    Attributes:
        path: the file.
        name: registry name, or ``None`` for a plain file path.
        sha256: known sha256 (record or cache sidecar), or ``None``.
    """

    path: Path
    name: str | None
    sha256: str | None


def resolve_weights(spec: str | os.PathLike[str], *, download: bool = False) -> ResolvedWeights:
    """Turn ``--weights`` (a file path or a registry name) into a file.

    A registry checkpoint must be in the cache (or ``download=True`` fetches it); its size
    is compared with the sidecar (a full hash check is :func:`verify`).

    Raises:
        WeightsError: a registry checkpoint is not cached / was changed, or a path does not exist.
        UsageError: neither an existing file nor a registry name.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return ResolvedWeights(path, None, None)
    text = str(spec)
    if text in _REGISTRY:
        dest = cache_path(text)
        shipped = bundled_path(_REGISTRY[text])
        if not dest.is_file() and shipped is not None and shipped.is_file():
            return ResolvedWeights(shipped, text, _REGISTRY[text].sha256)
        if not dest.is_file():
            if not download:
                raise WeightsError(missing_message(_REGISTRY[text], dest))
            fetch(text)
        side = read_sidecar(text)
        if side.get("size") is not None and dest.stat().st_size != side["size"]:
            raise WeightsError(
                f"cached {text} at {dest} has {dest.stat().st_size} bytes, expected {side['size']}; "
                f"run `refine weights fetch {text} --force`"
            )
        return ResolvedWeights(dest, text, _REGISTRY[text].sha256 or side.get("sha256"))
    if os.sep in text or "/" in text or path.suffix in {".pth", ".pt", ".ckpt", ".bin"}:
        raise WeightsError(f"weights file {text} not found; check the path or use a registry name")
    raise UsageError(
        f"unknown weights {text!r}: give a checkpoint file or one of {', '.join(sorted(_REGISTRY))}"
    )


_REGISTRY.update({r.name: r for r in magnet_records()})
