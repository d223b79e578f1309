"""GDAL creation options of the TIFF outputs (``--co KEY=VAL``): defaults, checks, profiles.

The user's options are merged over the defaults of :data:`GTIFF_DEFAULTS` (plain tiled TIFF) or
:data:`COG_DEFAULTS` (``--cog``) and checked against the creation-option list that the GDAL
library inside rasterio declares for the driver (its ``DMD_CREATIONOPTIONLIST`` metadata, read
through the C API because rasterio has no Python call for it): an unknown key, a value outside a
``string-select`` list, a non-integer for an ``int`` option are one :class:`UsageError` naming
what is valid. Combinations that only GDAL can judge (``BLOCKXSIZE`` not a multiple of 16,
``PREDICTOR=3`` on integers, ``COMPRESS=JPEG`` on float32 ...) are found by :func:`probe`, which
creates and writes a small in-memory file with the same options before any work is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import logging
import os
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from refine_cli.errors import UsageError

log = logging.getLogger(__name__)

TILE = 512

GTIFF_DEFAULTS: dict[str, str] = {
    "TILED": "YES", "BLOCKXSIZE": str(TILE), "BLOCKYSIZE": str(TILE), "COMPRESS": "DEFLATE", "ZLEVEL": "6",
    "BIGTIFF": "YES", "INTERLEAVE": "PIXEL",
}
"""Creation options of a plain TIFF output that the user did not give (``PREDICTOR`` follows the
sample type: 2 for integers, 3 for floats, unless the compression is not DEFLATE/LZW/ZSTD)."""

COG_DEFAULTS: dict[str, str] = {
    "COMPRESS": "DEFLATE", "PREDICTOR": "YES", "BLOCKSIZE": str(TILE), "BIGTIFF": "YES", "NUM_THREADS": "1",
}
"""Creation options of a ``--cog`` output that the user did not give (``OVERVIEW_RESAMPLING`` is
``NEAREST`` for masks and ``AVERAGE`` for soft maps)."""

OWNED = {"GTiff": {"COPY_SRC_OVERVIEWS"}, "COG": {"OVERVIEWS"}}
"""Options the writer sets itself (refused with a reason)."""

_BOOL = {"YES", "NO", "TRUE", "FALSE", "ON", "OFF", "1", "0"}


@dataclass(frozen=True)
class OptionSpec:
    """One entry of a driver's creation-option list.

    Attributes:
        name: upper-case key.
        kind: GDAL's type: ``string-select``, ``int``, ``float``, ``boolean`` or ``string``.
        values: the accepted values of a ``string-select`` (upper-case, aliases included).
    """

    name: str
    kind: str
    values: tuple[str, ...] = ()


def _gdal_library() -> ctypes.CDLL | None:
    """The GDAL shared library that rasterio uses (already loaded in this process), or ``None``."""
    import rasterio

    candidates = sorted(glob.glob(os.path.join(os.path.dirname(rasterio.__file__) + ".libs", "libgdal*")))
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:  # a rasterio built against a system GDAL
            candidates += sorted({line.split()[-1] for line in fh if "libgdal" in line.split()[-1]})
    except OSError:
        pass
    found = ctypes.util.find_library("gdal")
    candidates += [found] if found else []
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            lib.GDALGetDriverByName.restype = ctypes.c_void_p
            lib.GDALGetDriverByName.argtypes = [ctypes.c_char_p]
            lib.GDALGetMetadataItem.restype = ctypes.c_char_p
            lib.GDALGetMetadataItem.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
            return lib
        except (OSError, AttributeError):
            continue
    return None


@functools.cache
def driver_options(driver: str) -> dict[str, OptionSpec] | None:
    """The creation options GDAL declares for ``driver`` (``GTiff`` or ``COG``), by upper-case name.

    Returns:
        ``None`` when the list cannot be read (no GDAL library found): only :func:`probe` checks then.
    """
    from rasterio.env import Env

    lib = _gdal_library()
    if lib is None:
        return None
    with Env():  # registers the drivers
        handle = lib.GDALGetDriverByName(driver.encode())
        text = lib.GDALGetMetadataItem(handle, b"DMD_CREATIONOPTIONLIST", None) if handle else None
    if not text:
        return None
    specs: dict[str, OptionSpec] = {}
    for opt in ET.fromstring(text.decode("utf-8", "replace")).iter("Option"):
        name = opt.get("name", "").upper()
        values = [(v.text or "").strip().upper() for v in opt.iter("Value")]
        values += [(v.get("alias") or "").upper() for v in opt.iter("Value") if v.get("alias")]
        specs[name] = OptionSpec(name, opt.get("type", "string"), tuple(values))
    return specs


def check_options(options: Mapping[str, str], driver: str) -> None:
    """Refuse a key ``driver`` does not declare, or a value its type does not allow.

    Args:
        options: ``{KEY: value}``, keys upper-case.
        driver: ``GTiff`` or ``COG``.

    Raises:
        UsageError: one line naming the valid keys (or the valid values of the key).
    """
    specs = driver_options(driver)
    for key, value in options.items():
        if key in OWNED.get(driver, set()):
            raise UsageError(f"--co {key}: refine sets {key} itself for {driver} outputs; leave it out")
        if specs is None:
            continue
        spec = specs.get(key)
        if spec is None:
            hint = " (with --cog use the COG driver's names, e.g. BLOCKSIZE, LEVEL)" if driver == "COG" else \
                " (without --cog use the GTiff driver's names, e.g. BLOCKXSIZE, ZLEVEL)"
            raise UsageError(f"--co {key}={value}: the {driver} driver has no creation option {key}{hint}; "
                             f"valid keys: {', '.join(sorted(set(specs) - OWNED.get(driver, set())))}")
        _check_value(spec, value, driver)


def _check_value(spec: OptionSpec, value: str, driver: str) -> None:
    v = value.strip().upper()
    bad = ""
    if spec.kind == "string-select" and spec.values and v not in spec.values:
        bad = f"use one of {', '.join(dict.fromkeys(spec.values))}"
    elif spec.kind == "int" and not _is_int(v):
        bad = "give an integer"
    elif spec.kind == "float" and not _is_float(v):
        bad = "give a number"
    elif spec.kind == "boolean" and v not in _BOOL:
        bad = "give YES or NO"
    if bad:
        raise UsageError(f"--co {spec.name}={value}: not a valid value of {driver}'s {spec.name}; {bad}")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def merged(user: Mapping[str, str], dtype: np.dtype, cog: bool, resampling: str) -> dict[str, str]:
    """The creation options of one output: the defaults, with the user's options over them.

    Args:
        user: ``{KEY: value}`` of ``--co`` (keys upper-case).
        dtype: sample type of the output.
        cog: the COG driver's options (else GTiff's).
        resampling: default overview resampling of a COG (``nearest`` | ``average``).
    """
    if cog:
        out = {**COG_DEFAULTS, "OVERVIEW_RESAMPLING": resampling.upper()}
    else:
        out = dict(GTIFF_DEFAULTS)
        compress = user.get("COMPRESS", out["COMPRESS"]).upper()
        if compress in ("DEFLATE", "LZW", "ZSTD", "ADOBE_DEFLATE"):
            out["PREDICTOR"] = "3" if np.dtype(dtype).kind == "f" else "2"
        if "COMPRESS" in user and compress != "DEFLATE":
            out.pop("ZLEVEL", None)
    out.update({k.upper(): str(v) for k, v in user.items()})
    return out


def block_rows(options: Mapping[str, str]) -> int:
    """Rows written at a time: a multiple of ``BLOCKYSIZE`` (or ``BLOCKSIZE``) of at least 512.

    Every write then covers whole blocks (no block is compressed twice).
    """
    try:
        by = int(options.get("BLOCKYSIZE", options.get("BLOCKSIZE", TILE)))
    except ValueError:
        by = TILE
    by = max(1, by)
    return by * max(1, -(-TILE // by))


@contextmanager
def _gdal_warnings() -> Iterator[list[str]]:
    """Collect GDAL's warnings (rasterio's ``rasterio._env`` logger) during the block."""
    seen: list[str] = []

    class _Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    logger = logging.getLogger("rasterio._env")
    handler = _Catch()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # whatever -q/-v set: these become the error
    logger.propagate = False
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def probe(options: Mapping[str, str], dtype: np.dtype, bands: int, nodata: float | None, where: str,
          cog: bool = False, given: Mapping[str, str] | None = None) -> None:
    """Write a small in-memory file with ``options`` and the output's layout: GDAL's own refusals, early.

    Args:
        options: creation options (as :func:`merged` gives them).
        dtype: sample type.
        bands: samples per pixel.
        nodata: the nodata tag, or ``None``.
        where: the output the options are for (named in the error).
        cog: the options are the COG driver's (the probe copies a small GeoTIFF into a COG).
        given: the options the user gave (named in the error; default ``options``).

    Raises:
        UsageError: GDAL refused the options or warned about them (one line, GDAL's words).
    """
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.shutil import copy as rio_copy
    from rasterio.shutil import delete

    base = f"/vsimem/refine-probe-{uuid.uuid4().hex}"
    size = 64
    gtiff = {"TILED": "YES", "BLOCKXSIZE": "16", "BLOCKYSIZE": "16"} if cog else dict(options)
    try:
        with warnings.catch_warnings(), rasterio.Env(), _gdal_warnings() as seen:
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(f"{base}.tif", "w", driver="GTiff", width=size, height=size, count=bands,
                               dtype=np.dtype(dtype).name, nodata=nodata, **gtiff) as ds:
                ds.write(np.zeros((bands, size, size), dtype))
            if cog:
                rio_copy(f"{base}.tif", f"{base}.cog.tif", driver="COG", **options)
    except Exception as exc:  # noqa: BLE001 - any GDAL refusal is the user's option
        from refine_cli.io.readers import gdal_message

        text = _unprobed(gdal_message(exc), base)
        raise UsageError(f"--co {_shown(given or options)} for {where}: GDAL refused it ({text}); "
                         "change the option") from None
    finally:
        with rasterio.Env():
            for path in (f"{base}.tif", f"{base}.cog.tif"):
                try:
                    delete(path, driver="GTiff")
                except Exception:  # noqa: BLE001 - nothing to remove
                    pass
    real = [m for m in seen if "georeferenc" not in m.lower()]
    if real:
        raise UsageError(f"--co {_shown(given or options)} for {where}: GDAL did not accept it "
                         f"({_unprobed(real[0], base)}); change the option")


def _unprobed(text: str, base: str) -> str:
    """GDAL's message without the probe's file name."""
    for name in (f"{base}.cog.tif", f"{base}.tif", os.path.basename(base) + ".cog.tif",
                 os.path.basename(base) + ".tif"):
        text = text.replace(f"{name}: ", "").replace(name, "")
    return text.replace("_TIFFVSetField:", "").replace("CPLE_IllegalArg in ", "").strip()


def _shown(options: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


NOT_STREAMED = ("TILING_SCHEME", "TARGET_SRS", "RES", "EXTENT", "ZOOM_LEVEL", "ZOOM_LEVEL_STRATEGY",
                "OVERVIEW_COUNT", "ALIGNED_LEVELS", "ADD_ALPHA")
"""COG options that reproject, re-grid or change the levels: GDAL builds those COGs itself at commit."""


def streamable(cog_options: Mapping[str, str]) -> bool:
    """Whether a COG with these options gets the overviews streamed by ``io.overviews``."""
    from refine_cli.io.overviews import STREAMED

    return cog_options.get("OVERVIEW_RESAMPLING", "NEAREST").lower() in STREAMED and \
        not any(k in cog_options for k in NOT_STREAMED)


@functools.cache
def fast_codec() -> dict[str, str]:
    """Fast lossless compression for temporary files: ZSTD level 1 where GDAL has it, else DEFLATE level 1."""
    specs = driver_options("GTiff") or {}
    values = specs["COMPRESS"].values if "COMPRESS" in specs else ()
    if "ZSTD" in values:
        return {"COMPRESS": "ZSTD", "ZSTD_LEVEL": "1"}
    return {"COMPRESS": "DEFLATE", "ZLEVEL": "1"}


def intermediate_options(cog_options: Mapping[str, str], dtype: np.dtype) -> dict[str, str]:
    """GTiff options of the temporary files a COG is copied from.

    Tiles of the COG's ``BLOCKSIZE``, fast lossless compression (ZSTD level 1, else DEFLATE level 1)
    and the predictor of the sample type.
    """
    block = cog_options.get("BLOCKSIZE", str(TILE))
    return {"TILED": "YES", "BLOCKXSIZE": block, "BLOCKYSIZE": block, **fast_codec(),
            "PREDICTOR": "3" if np.dtype(dtype).kind == "f" else "2", "BIGTIFF": "YES", "INTERLEAVE": "PIXEL"}


def tiff_encoding(path: str) -> dict[str, Any]:
    """How a (Geo)TIFF is encoded, for ``refine info``: compression, predictor, blocks, nodata, overviews.

    Returns:
        ``{"compression", "predictor", "block", "nodata", "layout", "overviews"}`` (``block`` is
        ``[height, width]``, ``overviews`` the decimation factors; ``layout`` is ``COG`` for a
        Cloud-Optimised GeoTIFF as GDAL reads it, else ``None``), or ``{}`` when GDAL cannot open it.
    """
    import warnings

    import rasterio

    try:
        with warnings.catch_warnings(), rasterio.Env():
            warnings.simplefilter("ignore")
            with rasterio.open(path) as ds:
                tags = ds.tags(ns="IMAGE_STRUCTURE")
                return {
                    "compression": (tags.get("COMPRESSION") or "NONE").upper(),
                    "predictor": int(tags.get("PREDICTOR", 1)),
                    "block": list(ds.block_shapes[0]),
                    "nodata": ds.nodata,
                    "layout": tags.get("LAYOUT"),
                    "overviews": ds.overviews(1),
                }
    except Exception:  # noqa: BLE001 - not a file GDAL reads: no encoding facts
        return {}
