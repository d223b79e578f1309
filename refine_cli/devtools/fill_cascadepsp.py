"""Deterministic "fill" weights for the CascadePSP module.

The golden outputs of the official code were produced with these weights, so a model
loaded with them must reproduce the golden arrays. Every value comes from integer
arithmetic, scaled by exact binary fractions and rounded once to float32::

    seed   = CRC32(utf8(name))                                   (zlib CRC-32, unsigned)
    z      = seed + (i + 1) * 0x9E3779B97F4A7C15                 (mod 2**64, i = flat C-order index)
    z      = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z      = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z      =  z ^ (z >> 31)
    k      = z >> 40                                             (0 <= k < 2**24)
    r      = (2k + 1 - 2**24) / 2**24                            (in (-1, 1))

    BN counter (*.num_batches_tracked)        int64 0
    BN running mean / BN bias                 r / 8             (a BN bias: <prefix>.running_mean exists)
    BN running var                            1 + |r| / 4
    BN weight (1-D *.weight)                  1 + r / 8
    conv weight (4-D *.weight)                r * g * 2**-e     (fan_in = n / S[0],
                                                                 e = max{e: 4**e <= fan_in},
                                                                 g = 6 if S[0] == 1 else 3/2)
    conv bias (other *.bias)                  r / 64, + 2 when the shape is exactly (1,)

The streams are computed with numpy ``uint64`` arrays (wrap-around arithmetic), so the
67.7 M elements take a few seconds. Run ``python -m refine_cli.devtools.fill_cascadepsp OUT``
to write a checkpoint laid out like the official file (``module.``-prefixed keys).
"""

from __future__ import annotations

import argparse
import logging
import math
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from refine_cli.devtools.manifest import ManifestEntry

logger = logging.getLogger(__name__)

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def official_entries() -> list[ManifestEntry]:
    """Names, shapes and dtypes of :func:`~refine_cli.models.cascadepsp.cascadepsp_official`'s state_dict.

    The model is built on the ``meta`` device, so this allocates nothing.
    """
    from refine_cli.models.cascadepsp import cascadepsp_official

    with torch.device("meta"):
        model = cascadepsp_official()
    return [
        ManifestEntry(k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    ]


def splitmix_top24(seed: int, n: int) -> np.ndarray:
    """Top 24 bits of the SplitMix64 outputs ``1 .. n`` for a 32-bit seed.

    Args:
        seed: stream seed, ``0 <= seed < 2**64``.
        n: number of values.

    Returns:
        ``(n,)`` uint64 array of ``k_i`` in ``[0, 2**24)``.
    """
    z = np.arange(1, n + 1, dtype=np.uint64)
    z *= _GAMMA
    z += np.uint64(seed)
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    z >>= np.uint64(40)
    return z


def base_values(name: str, n: int) -> np.ndarray:
    """The base stream ``r_i = (2 k_i + 1 - 2**24) / 2**24`` of an entry.

    Returns:
        ``(n,)`` float64, odd multiples of ``2**-24`` in (-1, 1) (exact).
    """
    k = splitmix_top24(zlib.crc32(name.encode("utf-8")) & 0xFFFFFFFF, n).view(np.int64)
    r = (k * 2 + (1 - 2**24)).astype(np.float64)
    r *= 2.0**-24
    return r


def fill_entry(entry: ManifestEntry, has_running_mean: bool) -> torch.Tensor:
    """The fill value of one entry (see the module docstring for the categories).

    Args:
        entry: name, shape, dtype.
        has_running_mean: the manifest contains ``<prefix>.running_mean`` for this
            entry's prefix (marks a ``.bias`` as a BN bias).

    Returns:
        A CPU tensor of ``entry.shape``: int64 zero for BN counters, float32 otherwise.
    """
    name, shape = entry.name, entry.shape
    if name.endswith(".num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    n = math.prod(shape)
    r = base_values(name, n)
    if name.endswith(".running_mean"):
        v = r / 8
    elif name.endswith(".running_var"):
        v = 1 + np.abs(r) / 4
    elif name.endswith(".weight") and len(shape) == 4:
        fan_in = n // shape[0]
        e = 0
        while 4 ** (e + 1) <= fan_in:
            e += 1
        gain = 6.0 if shape[0] == 1 else 1.5
        v = r * (gain * 2.0**-e)
    elif name.endswith(".weight") and len(shape) == 1:
        v = 1 + r / 8
    elif name.endswith(".bias") and has_running_mean:
        v = r / 8
    elif name.endswith(".bias"):
        v = r / 64 + (2.0 if shape == (1,) else 0.0)
    else:
        raise ValueError(f"no fill rule for state_dict entry {name!r} with shape {shape}")
    # every v above is exact in float64; one rounding to float32 (ties to even)
    return torch.from_numpy(v.astype(np.float32).reshape(shape))


def fill_state_dict(entries: Sequence[ManifestEntry] | None = None) -> OrderedDict[str, torch.Tensor]:
    """The deterministic fill of a whole state_dict.

    Args:
        entries: manifest entries (:func:`read_manifest`); ``None`` uses the official
            model's (:func:`official_entries`).

    Returns:
        Name -> CPU tensor, in manifest order (keys without ``module.``).
    """
    entries = official_entries() if entries is None else list(entries)
    names = {e.name for e in entries}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for e in entries:
        prefix = e.name.rpartition(".")[0]
        out[e.name] = fill_entry(e, f"{prefix}.running_mean" in names)
    return out


def save_fill_checkpoint(path: str | Path, module_prefix: bool = True) -> Path:
    """Write the fill state_dict like the official file (a ``DataParallel`` state_dict).

    Args:
        path: output file (overwritten).
        module_prefix: prefix every key with ``module.`` as the official checkpoint does.

    Returns:
        The path written.
    """
    path = Path(path)
    sd = fill_state_dict()
    if module_prefix:
        sd = OrderedDict(("module." + k, v) for k, v in sd.items())
    torch.save(sd, path)
    logger.info("wrote %d entries to %s", len(sd), path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m refine_cli.devtools.fill_cascadepsp OUT [--no-module-prefix]``."""
    parser = argparse.ArgumentParser(description="Write the deterministic CascadePSP fill checkpoint.")
    parser.add_argument("out", type=Path, help="output checkpoint file")
    parser.add_argument("--no-module-prefix", action="store_true", help="keys without the 'module.' prefix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    save_fill_checkpoint(args.out, module_prefix=not args.no_module_prefix)


if __name__ == "__main__":
    main()
