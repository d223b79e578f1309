"""refine: refine segmentation masks on very large images, tile by tile, with bounded memory."""

__version__ = "0.1.0"
