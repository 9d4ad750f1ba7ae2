"""Run a ``benchmarks/<script>.py`` end to end inside the test process.

The smoke tests used to start each script in a subprocess: ~5 s of imports (torch, diffusers, npu_cache_fx)
every time, which the test worker has already paid. :func:`run_benchmark` loads the script as a module and
calls its ``main(argv)`` with ``sys.argv`` as the command line would set it, capturing what it prints. The
scripts that need a fresh process (compile.py's compile-cost probes: an empty inductor cache) still start
one themselves.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
from typing import List, Tuple
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def run_benchmark(script: str, *argv: str) -> Tuple[int, str]:
    """``python benchmarks/<script>.py *argv`` in this process: (exit status, stdout)."""
    path = os.path.join(BENCH, f"{script}.py")
    spec = importlib.util.spec_from_file_location(f"benchmark_{script}", path)
    module = importlib.util.module_from_spec(spec)
    out = io.StringIO()
    threads = torch.get_num_threads()
    args: List[str] = [str(a) for a in argv]
    # sys.path[0] as for `python benchmarks/<script>.py`: the scripts import tinybench / common top-level
    # os.environ restored after: compile.py / peers.py point TORCHINDUCTOR_CACHE_DIR at a temporary folder
    with mock.patch.object(sys, "argv", [path, *args]), mock.patch.object(sys, "path", [BENCH, *sys.path]), \
            mock.patch.dict(os.environ), contextlib.redirect_stdout(out):
        sys.modules[spec.name] = module  # dataclasses look their module up while the script is loaded
        try:
            spec.loader.exec_module(module)
            result = module.main(args)
            rc = result if isinstance(result, int) else 0
        except SystemExit as err:  # as the interpreter exits: a message is printed and means status 1
            if isinstance(err.code, str):
                print(err.code)
            rc = 1 if isinstance(err.code, str) else (err.code or 0)
        finally:
            sys.modules.pop(spec.name, None)
            torch.set_num_threads(threads)
            torch._dynamo.reset()
    return rc, out.getvalue()
