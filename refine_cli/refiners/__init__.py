"""refiners."""
