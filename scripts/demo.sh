#!/usr/bin/env bash
# Create or reuse .venv, install the package, run the main job on the shipped tiny model.
# Usage: bash scripts/demo.sh [demo args...]   (outputs in demo_out/)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e ".[models]"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python examples/quickstart.py "$@"
