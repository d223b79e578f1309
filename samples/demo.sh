#!/usr/bin/env bash
# Set up refine on a fresh machine and refine the bundled sample.
# Creates .venv (if absent), installs the CPU build of torch from its pinned wheel, then refine itself.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0          # CPU wheel; a bare `pip install torch` pulls a multi-GB CUDA build
python -m pip install -q -e ".[test]"
mkdir -p samples/out
refine run samples/scene.jpg --mask samples/scene_coarse.png -o samples/out/scene.refined.tif \
    --uncertainty samples/out/scene.uncertainty.png --report samples/out/scene.report.json --overwrite
