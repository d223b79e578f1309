"""Network definitions only (``nn.Module``s): no downloads, no files, no numpy pipelines."""
