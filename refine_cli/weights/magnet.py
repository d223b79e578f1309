"""Weights-registry records for MagNet-Fast: the official MagNet checkpoints and the person segmenter.

Records only (no IO); ``refine_cli.weights`` holds the registry, cache and loaders and
includes :func:`magnet_records` (also importable as the list ``MAGNET_RECORDS``). Record
names double as segmenter names (``refine_cli.segmenters``) and as the checkpoint names of
the MagNet presets (``refine_cli.refiners.magnet``).

**Official MagNet files.** The original host
``https://public.vinai.io/magnet_cvpr2021/<file>`` no longer resolves (MagNet issue #30,
Nov 2024); the README now links Google Drive file ids, used here through Drive's direct
download endpoint (``confirm=t`` skips the "cannot scan for viruses" page that Drive shows
for files over ~100 MB, i.e. the 112 MB FPN). Sizes and hashes were never published and
the files could not be downloaded while writing this, so ``size``, ``md5`` and ``sha256``
are unknown: the cache sidecar records the sha256 on first fetch or import. Licence:
the code is AGPL-3.0 (HRNet parts MIT); the weights carry no stated licence and were
trained on Cityscapes (non-commercial terms) and DeepGlobe (challenge terms).

**magnet-binary-refine** (``--preset binary``): the 2-class refinement module this project
trained for the selfie segmenter (``refine_cli.train.magnet``), shipped in the repository's
``weights/`` folder (record field ``bundled``) with its training sidecar; sha256 pinned below.

**MediaPipe Selfie Segmentation** (general model, ``selfie_segmentation.tflite``,
249 505 bytes, sha256 ``9ee168ec...``, Apache-2.0). These are the bytes of the
mediapipe 0.10.21 wheel. MediaPipe's own build pins the same bytes in
``third_party/external_files.bzl`` (entry ``com_google_mediapipe_selfie_segmentation_tflite``,
same sha256) at ``https://storage.googleapis.com/mediapipe-assets/selfie_segmentation.tflite``
with ``?generation=1683332563830600``: a Google Cloud Storage object-generation pin, so
that URL keeps serving these bytes even if the unpinned name is overwritten (it was
before: earlier MediaPipe revisions pin generation 1661875931201364, sha256 ``8d13b7...``,
a different build). mediapipe >= 0.10.30 wheels no longer ship the file, and the npm
package ships byte-different builds, so the pinned GCS URL is the most stable official source.
"""

from __future__ import annotations

import functools
from typing import Any

from refine_cli.weights.records import Normalization, WeightsRecord

MAGNET_LICENSE = (
    "AGPL-3.0 code (VinAIResearch/MagNet; HRNet parts MIT); weights: no stated license; trained on "
    "Cityscapes (non-commercial terms) / DeepGlobe (challenge terms)"
)
"""What is known about the official MagNet files' licensing."""

BINARY_REFINE = "magnet-binary-refine"
"""Registry name of the project-trained 2-class refinement module (``--preset binary``)."""

BINARY_REFINE_FILE = "magnet-binary-refine-v1.pt"
"""Its file in the repository's ``weights/`` folder (and in the cache, when imported)."""

BINARY_REFINE_SHA256: str | None = "96c55ca9a048b00f3c77acfd0b31f851a9efcbe480ea2a3a5524fb481ed98e66"
"""sha256 of the shipped file (also in its sidecar ``weights/magnet-binary-refine-v1.json``)."""

BINARY_REFINE_SIZE: int | None = 351_911
"""Its size in bytes."""

_DRIVE = "https://drive.usercontent.google.com/download?id={}&export=download&confirm=t"
_ORIGINAL_HOST = "https://public.vinai.io/magnet_cvpr2021/"

SELFIE_URL = (
    "https://storage.googleapis.com/mediapipe-assets/selfie_segmentation.tflite?generation=1683332563830600"
)
"""The selfie model's official, generation-pinned URL (see the module docstring)."""

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "not an input (image-only segmenter)")
"""Input contract of the official backbones: RGB / 255, ImageNet mean/std (``Normalization`` fields)."""

_REFINEMENT = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
               "no image input: two C-class softmax maps, O (segmenter on the patch) first, then the Y crop")
"""Input contract of MagNet's refinement module."""

_UNIT_RGB = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "not an input (image-only segmenter)")
"""RGB / 255, no further normalisation."""

# (name, architecture, file name, Drive id, approximate bytes, what it is, key prefixes stripped by name)
_OFFICIAL = (
    ("magnet-cityscapes-hrnet", "hrnet18_ocr_c19", "cityscapes_hrnet.pth",
     "1FQghomK8Ssc0zHKrvhEMIJQrbVXiWa8H", 25_600_000,
     "Cityscapes backbone, HRNetV2-W18-Small-v2+OCR, 19 classes, input 256x128; keys carry the "
     "trainer's 'model.' prefix (stripped by name) and maybe 'loss.*' buffers (dropped)",
     ("module.", "model.")),
    ("magnet-cityscapes-refine-512", "magnet_refinement_c19", "cityscapes_refinement_512.pth",
     "1B6NJgi2ujpW7K460vugRhWesK73LJKsb", 420_000, "Cityscapes refinement module for the 512x256 stage", ()),
    ("magnet-cityscapes-refine-1024", "magnet_refinement_c19", "cityscapes_refinement_1024.pth",
     "1AShNe-1I8wPP_5kHK4G_wO8pSg_d1LKQ", 420_000, "Cityscapes refinement module for the 1024x512 stage", ()),
    ("magnet-cityscapes-refine-2048", "magnet_refinement_c19", "cityscapes_refinement_2048.pth",
     "1XhVlMN2uzJ3qsrdJ19JvymeYDpvwMD82", 420_000, "Cityscapes refinement module for the 2048x1024 stage",
     ()),
    ("magnet-deepglobe-fpn", "resnet50_fpn_c7", "deepglobe_fpn.pth", "1EFj3qNR7Xlp9DqOlKZAsyzkPUSFEY6OP",
     112_500_000, "DeepGlobe backbone, ResNet-50 FPN, 7 classes, input 508x508; keys carry the trainer's "
     "'model.' prefix (stripped by name)", ("module.", "model.")),
    ("magnet-deepglobe-refine", "magnet_refinement_c7", "deepglobe_refinement.pth",
     "1hybFYyMTCpdojzYPksrw5DdDL9yUH3L-", 360_000, "DeepGlobe refinement module (all stages)", ()),
)


@functools.cache
def magnet_records() -> list[WeightsRecord]:
    """The records to add to ``refine_cli.weights._REGISTRY`` (built once, on first call)."""
    imagenet, refinement, unit_rgb = (Normalization(*n) for n in (_IMAGENET, _REFINEMENT, _UNIT_RGB))
    records = [
        WeightsRecord(
            name=name, architecture=arch, url=_DRIVE.format(drive_id), filename=filename, size=None,
            approx_size=approx, md5=None, sha256=None, license=MAGNET_LICENSE,
            normalization=refinement if arch.startswith("magnet_refinement") else imagenet,
            notes=f"Official MagNet {what} (CVPR 2021). Google Drive id {drive_id}; originally "
            f"{_ORIGINAL_HOST}{filename} (host gone, MagNet issue #30). Size and hashes unpublished "
            "(approx_size estimated from the parameter count); sha256 recorded in the cache sidecar on first "
            "fetch/import. If Drive answers with an HTML page, download the file in a browser and run "
            f"`refine weights import {name} FILE`.",
            strip_prefixes=strip, trust_on_first_use=True,
        )
        for name, arch, filename, drive_id, approx, what, strip in _OFFICIAL
    ]
    records.append(WeightsRecord(
        name=BINARY_REFINE, architecture="magnet_refinement_c2", url=None,
        filename=BINARY_REFINE_FILE, size=BINARY_REFINE_SIZE, approx_size=BINARY_REFINE_SIZE or 350_000,
        md5=None, sha256=BINARY_REFINE_SHA256,
        license="MIT (this project: trained by `refine train --arch magnet-refinement`); made for the "
        "MediaPipe selfie segmenter (Apache-2.0); training composites of P3M portraits (MIT) on the photos "
        "listed in weights/README.md",
        normalization=refinement,
        notes="2-class (background/person) MagNet refinement module for --preset binary, trained by this "
        "project on the mediapipe-selfie segmenter's outputs (model card: weights/README.md, section "
        "magnet-binary-refine-v1). Shipped in the repository's weights/ folder with its .json sidecar "
        "(refine train export: arch, recipe, sha256); 81 672 parameters, 60 state_dict entries.",
        strip_prefixes=(), bundled=BINARY_REFINE_FILE,
    ))
    records.append(WeightsRecord(
        name="mediapipe-selfie", architecture="mediapipe_selfie_tflite",
        url=SELFIE_URL,
        filename="selfie_segmentation.tflite", size=249_505, approx_size=249_505, md5=None,
        sha256="9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
        license="Apache-2.0 (MediaPipe)", normalization=unit_rgb,
        notes="MediaPipe legacy Selfie Segmentation, general model: TFLite, input [1,256,256,3] float32 "
        "RGB in [0,1], output [1,256,256,1] person probability. Same bytes as mediapipe 0.10.21's "
        "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite; URL and sha256 as pinned in "
        "MediaPipe's third_party/external_files.bzl. Runs with ai-edge-litert (a dependency of refine).",
        strip_prefixes=(),
    ))
    return records


def __getattr__(name: str) -> Any:
    """``MAGNET_RECORDS``: the list from :func:`magnet_records`, resolved lazily (PEP 562)."""
    if name == "MAGNET_RECORDS":
        return magnet_records()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
