"""Deterministic "fill" weights and inputs for the MagNet networks.

The golden outputs of the official code were produced with these weights, so a model
loaded with them must reproduce the golden arrays. Rule, per manifest entry ``N`` of
shape ``S``, independent of every other entry::

    g = torch.Generator("cpu").manual_seed(CRC32(utf8(N)))      (zlib CRC-32, unsigned)
    z = torch.randn(S, generator=g, dtype=float32)               (one draw; none for counters)

    *.num_batches_tracked                   int64 0
    *.running_mean                          0.1 * z
    *.running_var                           1 + 0.1 * |z|
    *.weight of a BN layer                  1 + 0.1 * z           (BN: "<parent>.running_mean" exists)
    *.bias of a BN layer                    0.1 * z
    *.weight with len(S) >= 2               z * c,  c = float32(1 / sqrt(fan_in)) (computed in float64),
                                                    fan_in = S[1] * S[2] * ...
    other *.bias                            0.01 * z

All arithmetic is float32: the constant is rounded to float32 first, then one
float32 multiply, then (where written) one float32 add of 1.

Inputs: :func:`golden_image` regenerates the backbone test images from their tags
(the same per-tag generator), and :func:`golden_probabilities` the probability maps
given to the refinement module. Run ``python -m refine_cli.devtools.fill_magnet MANIFEST OUT`` to
write a fill checkpoint (optionally with the ``model.`` prefix of released backbones).
"""

from __future__ import annotations

import argparse
import logging
import math
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from refine_cli.devtools.manifest import ManifestEntry, read_manifest

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def module_entries(module: nn.Module) -> list[ManifestEntry]:
    """A module's state_dict as manifest entries (to compare with :func:`read_manifest`)."""
    return [
        ManifestEntry(k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in module.state_dict().items()
    ]


def crc32_seed(text: str) -> int:
    """CRC-32 (zlib/PNG) of ``text`` encoded as UTF-8, as an unsigned 32-bit integer."""
    return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF


def generator_for(tag: str) -> torch.Generator:
    """A fresh CPU generator seeded with :func:`crc32_seed` of ``tag``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(crc32_seed(tag))
    return g


def _f32(value: float) -> torch.Tensor:
    """A 0-d float32 tensor holding ``value`` rounded (to nearest) to float32."""
    return torch.tensor(value, dtype=torch.float32)


def fill_entry(entry: ManifestEntry, is_norm: bool) -> torch.Tensor:
    """The fill value of one entry (see the module docstring for the rules).

    Args:
        entry: name, shape, dtype.
        is_norm: the entry's parent is a BatchNorm layer (the manifest holds
            ``<parent>.running_mean``).

    Returns:
        A CPU tensor of ``entry.shape``: int64 0 for BN counters, float32 otherwise.
    """
    leaf = entry.name.rpartition(".")[2]
    if leaf == "num_batches_tracked":
        return torch.zeros(entry.shape, dtype=torch.int64)
    if entry.dtype != "float32":
        raise ValueError(f"no fill rule for {entry.name!r} of dtype {entry.dtype}")
    z = torch.randn(entry.shape, generator=generator_for(entry.name), dtype=torch.float32)
    tenth = _f32(0.1)
    if leaf == "running_mean":
        return z * tenth
    if leaf == "running_var":
        return (z.abs() * tenth) + 1
    if leaf == "weight" and is_norm:
        return (z * tenth) + 1
    if leaf == "bias" and is_norm:
        return z * tenth
    if leaf == "weight" and len(entry.shape) >= 2:
        fan_in = math.prod(entry.shape[1:])
        return z * _f32(1.0 / math.sqrt(fan_in))
    if leaf == "bias":
        return z * _f32(0.01)
    raise ValueError(f"no fill rule for state_dict entry {entry.name!r} with shape {entry.shape}")


def fill_state_dict(entries: Sequence[ManifestEntry] | str | Path) -> OrderedDict[str, torch.Tensor]:
    """The deterministic fill of a whole state_dict (the rule in the module docstring).

    Args:
        entries: manifest entries, or the path of a manifest TSV.

    Returns:
        Name -> CPU tensor, in manifest order (names as in the manifest, no prefix).
    """
    if isinstance(entries, (str, Path)):
        entries = read_manifest(entries)
    names = {e.name for e in entries}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for e in entries:
        parent = e.name.rpartition(".")[0]
        value = fill_entry(e, f"{parent}.running_mean" in names)
        if value.dtype != _DTYPES[e.dtype]:
            raise ValueError(f"fill of {e.name!r} has dtype {value.dtype}, manifest says {e.dtype}")
        out[e.name] = value
    return out


def param_checksums(state_dict: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """Sum and sum of squares of all float32 entries, accumulated in float64.

    Returns:
        ``(sum, sumsq)``, comparable with ``c19_param_sum`` etc. in the golden files.
    """
    total, total_sq = 0.0, 0.0
    for v in state_dict.values():
        if v.dtype == torch.float32:
            d = v.detach().to(torch.float64)
            total += float(d.sum())
            total_sq += float((d * d).sum())
    return total, total_sq


def golden_image(tag: str, height: int, width: int) -> torch.Tensor:
    """The RGB test image of a tag.

    ``clamp(round(z * 64 + 128), 0, 255)`` with ``z = randn((H, W, 3))`` from the
    tag's generator, float32 arithmetic, round half to even.

    Returns:
        ``(H, W, 3)`` uint8 RGB (HWC).
    """
    z = torch.randn((height, width, 3), generator=generator_for(tag), dtype=torch.float32)
    return torch.clamp(torch.round(z * 64 + 128), 0, 255).to(torch.uint8)


def golden_probabilities(tag: str, shape: Sequence[int], scale: float) -> torch.Tensor:
    """``softmax_over_dim1(scale * randn(shape))`` from the tag's generator.

    The golden refinement inputs (``scale`` 4) and point-selection inputs (``scale`` 3) are
    made this way.

    Returns:
        float32 tensor of ``shape`` (``(N, C, H, W)``), probabilities over dim 1.
    """
    z = torch.randn(tuple(shape), generator=generator_for(tag), dtype=torch.float32)
    return torch.softmax(z * scale, dim=1)


def save_fill_checkpoint(manifest: str | Path, path: str | Path, prefix: str = "") -> Path:
    """Write the fill state_dict of a manifest to a checkpoint file.

    Args:
        manifest: the manifest TSV.
        path: output file (overwritten).
        prefix: prepended to every key (``"model."`` mimics a released backbone file).

    Returns:
        The path written.
    """
    path = Path(path)
    sd = OrderedDict((prefix + k, v) for k, v in fill_state_dict(manifest).items())
    torch.save(sd, path)
    logger.info("wrote %d entries to %s", len(sd), path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m refine_cli.devtools.fill_magnet MANIFEST OUT [--prefix model.]``."""
    parser = argparse.ArgumentParser(
        description="Write the deterministic MagNet fill checkpoint of a manifest."
    )
    parser.add_argument("manifest", type=Path, help="state_dict manifest TSV")
    parser.add_argument("out", type=Path, help="output checkpoint file")
    parser.add_argument("--prefix", default="", help="key prefix, e.g. 'model.' like the released backbones")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    save_fill_checkpoint(args.manifest, args.out, prefix=args.prefix)


if __name__ == "__main__":
    main()
