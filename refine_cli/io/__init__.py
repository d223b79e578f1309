"""Raster input and output: readers, masks, image normalisation, atomic writers. No torch here.

Process-wide library settings are made here, before OpenCV or GDAL start:
OpenCV's own pixel cap is lifted (``refine`` applies its own ``--max-pixels``
before decoding) and GDAL's block cache is kept small (64 MiB) so windowed
reads and writes stay within the memory budget. Users can override both
through the same environment variables.
"""

import os

os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 40))
os.environ.setdefault("GDAL_CACHEMAX", "64")
os.environ.setdefault("GDAL_NUM_THREADS", "1")
