#!/usr/bin/env bash
# Create or reuse .venv, install the package, run the main job on the shipped tiny-flux-deep (Flux-dev's
# 19 + 38 blocks): captioned scenes generated uncached, with a cache plan, with fewer steps at the same
# measured speed and with AdaStep; outputs in demo_out/ (--model tiny-flux: the digit model, ~40 s).
# Usage: bash scripts/demo.sh [demo args...]   (see: .venv/bin/npu-cache-fx demo --help)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0 -e ".[models]"
npu-cache-fx --threads 1 demo "$@"
