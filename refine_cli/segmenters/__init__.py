"""segmenters."""
