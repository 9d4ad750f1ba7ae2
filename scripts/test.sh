#!/usr/bin/env bash
# Create or reuse .venv, install the package with its test extras, run the test suite on 2 workers.
# Usage: bash scripts/test.sh [pytest args...]     e.g. bash scripts/test.sh -m "not slow"  (the quick tier)
#        PYTEST_WORKERS=0 bash scripts/test.sh ...  (one process, no xdist)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# The CPU build of torch 2.13.0 is on this machine's disk; an unpinned torch pulls a CUDA build.
# One pip run with the LoRA (peft), offload (accelerate) and quantization (torchao) workflow extras (one
# resolver pass: ~5 s less than one per extra); they are optional: without them their tests skip with a reason.
if ! pip install -q --disable-pip-version-check torch==2.13.0 -e ".[dev,workflows]"; then
  echo "note: peft/accelerate/torchao unavailable; the LoRA, offload and quantization workflow tests will be skipped"
  pip install -q --disable-pip-version-check torch==2.13.0 -e ".[dev]"
fi
# MindIE-SD's cache agent, for the optional differential tests (installed without its torch_npu
# dependency, which breaks `import torch` without CANN). The tests skip when it is missing.
if ! pip show -q mindiesd >/dev/null 2>&1; then
  pip install -q --disable-pip-version-check --no-deps mindiesd==3.1.0 \
    || echo "note: mindiesd==3.1.0 unavailable; MindIE differential tests will be skipped"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
WORKERS="${PYTEST_WORKERS:-2}"
XDIST=()
if [ "$WORKERS" != "0" ]; then
  # expensive fixtures shared by the workers: tests/conftest.py once_per_run; worksteal: a worker that runs
  # out of tests takes some of the other's (the heavy tests are uneven: 0.1 to 30 s)
  XDIST=(-n "$WORKERS" --dist worksteal)
fi
set +e
python -m pytest -q "${XDIST[@]}" "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
