"""Developer tools: deterministic test checkpoints and other helpers for tests and benchmarks.

Nothing here is needed at run time; modules may use numpy freely.
"""
