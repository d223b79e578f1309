"""The checkpoints shipped with refine, installed as the package ``refine_cli._bundled``.

``pyproject.toml`` maps that package onto this folder (setuptools ``package-dir``): a wheel carries
the ``*.pt`` / ``*.json`` / ``*.md`` files as package data, and an editable install resolves the
name here. This file makes the folder a regular package, which the editable finder needs.
Locate the files with :func:`refine_cli.weights.bundled_dir`, not by path arithmetic.
"""
