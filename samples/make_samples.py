"""Regenerate the bundled samples (deterministic; no inputs needed).

Writes, next to this script:

* ``scene.jpg`` — a 1600 x 1200 synthetic photo-like scene (textured shapes with
  thin bars, rings and sharp corners on a textured background);
* ``scene_coarse.png`` — its coarse mask at 1/8 resolution (200 x 150, soft
  uint8), what a cheap low-resolution model would give;
* ``scene_gt.png`` — the exact ground truth (0/255), for ``refine eval``;
* ``ortho.tif`` — the same scene cropped to 768 x 512 as a tiled GeoTIFF in
  UTM zone 33N (0.1 m pixels), and ``ortho_coarse.png`` (1/4 resolution), to
  show that georeferencing is carried to the outputs.

Usage: ``python samples/make_samples.py``
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from refine_cli.devtools.synthetic import random_scene
from refine_cli.tiling.grid import Window

HERE = Path(__file__).resolve().parent


def main() -> None:
    scene = random_scene((1200, 1600), 8, seed=11, size=180)
    win = Window(0, 0, 1200, 1600)
    img = scene.image(win)
    assert cv2.imwrite(str(HERE / "scene.jpg"), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert cv2.imwrite(str(HERE / "scene_coarse.png"), scene.coarse(8))
    assert cv2.imwrite(str(HERE / "scene_gt.png"), scene.gt(win).astype(np.uint8) * 255)

    import rasterio
    from rasterio.transform import from_origin

    crop = Window(300, 400, 512, 768)
    with rasterio.open(HERE / "ortho.tif", "w", driver="GTiff", width=768, height=512, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000.0, 4100000.0, 0.1, 0.1), tiled=True,
                       blockxsize=256, blockysize=256, compress="jpeg", jpeg_quality=90,
                       photometric="ycbcr") as ds:
        ds.write(np.moveaxis(scene.image(crop), -1, 0))
    gt = scene.gt(crop).astype(np.float32)
    coarse = cv2.resize(gt, (192, 128), interpolation=cv2.INTER_AREA)
    assert cv2.imwrite(str(HERE / "ortho_coarse.png"), np.round(coarse * 255).astype(np.uint8))


if __name__ == "__main__":
    main()
