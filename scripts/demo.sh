#!/usr/bin/env bash
# Create or reuse .venv, install the package, run the main job on the shipped tiny model:
# digits generated uncached, with a cache plan and with fewer steps; outputs in demo_out/.
# Usage: bash scripts/demo.sh [demo args...]   (see: .venv/bin/npu-cache-fx demo --help)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e ".[models]"
npu-cache-fx --threads 1 demo "$@"
