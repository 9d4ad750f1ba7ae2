import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

# Tiny models run fastest single-threaded on the 2-core CI machine. Expensive fixtures are session-scoped:
# under xdist a worker interleaves modules, which tears module-scoped fixtures down and builds them again.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))


@contextlib.contextmanager
def once_per_run(tmp_path_factory, name: str) -> Iterator[tuple]:
    """``(folder, done)`` for work every xdist worker needs but one should do: the folder is shared by the
    workers of this run and the block runs under a file lock, so the first worker builds it (``done`` is
    False) and the others find it built (``done`` True). The worker that builds it must create
    ``folder / "done"`` last. (xdist_group cannot pin a module to one worker: under pytest 9 xdist's
    group suffix on the node id has no effect.)"""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = Path(root) / name
    with FileLock(str(folder) + ".lock"):
        folder.mkdir(exist_ok=True)
        yield folder, (folder / "done").exists()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A test may skip only for a reason listed here: optional peers and workflow extras, hardware this
# machine lacks. A skip for anything else (diffusers or transformers failing to import, say) fails the
# run: a broken import must not pass as "skipped".
ALLOWED_SKIPS = ("mindiesd", "cache_dit", "cache-dit", "peft", "accelerate", "torchao", "torch_npu", "GPU", "CUDA",
                 "cuda", "torch.distributed", "npu_cache_fx.ops", "registers the op", "xfail")
_unexpected = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if not any(word in reason for word in ALLOWED_SKIPS):
            _unexpected.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report):
    pytest_runtest_logreport(report)


def pytest_terminal_summary(terminalreporter):
    if _unexpected:
        terminalreporter.section("unexpected skips (fail the run)")
        for line in _unexpected:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    if _unexpected and exitstatus == 0:
        session.exitstatus = 1
