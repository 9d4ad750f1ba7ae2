"""Load MindIE-SD 3.1.0's ``cache_agent`` from the installed wheel, without torch_npu (optional).

For comparisons only (the differential tests in ``tests/test_agent.py`` and
``benchmarks/peers.py``); npu_cache_fx itself never imports it.

``pip install --no-deps mindiesd==3.1.0`` installs the files, but ``import
mindiesd`` needs torch_npu (and CANN). The four ``cache_agent`` modules only
need ``mindiesd.utils.exception`` and ``mindiesd.utils.logs.logging.logger``:
we register minimal stand-ins for those under a private package name and load
the real files from disk. :func:`load` returns ``None`` when the wheel is not
installed::

    from npu_cache_fx.compat import mindie
    M = mindie.load()            # the loaded ``cache_agent`` package, or None
    if M is not None:
        agent = M.CacheAgent(M.CacheConfig("dit_block_cache", 8, 28, 5, 2, 10000, 1, 7))
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Optional

__all__ = ["load"]

_PKG = "_mindiesd_ref"


def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__path__ = []  # a package, so submodules resolve
    sys.modules[name] = mod
    return mod


def load() -> Optional[types.ModuleType]:
    """MindIE-SD's ``cache_agent`` package (``CacheAgent``, ``CacheConfig``, ``ConfigError``), or None."""
    if f"{_PKG}.cache_agent" in sys.modules:
        return sys.modules[f"{_PKG}.cache_agent"]
    try:
        import importlib.metadata as md
        dist = md.distribution("mindiesd")
    except Exception:
        return None
    root = Path(dist.locate_file("mindiesd")) / "cache_agent"
    if not (root / "cache_agent.py").exists():
        return None

    class ConfigError(Exception):
        pass

    class ParametersInvalid(Exception):
        pass

    class ModelExecError(Exception):
        pass

    _stub(_PKG)
    _stub(f"{_PKG}.utils")
    _stub(f"{_PKG}.utils.exception", ConfigError=ConfigError, ParametersInvalid=ParametersInvalid,
          ModelExecError=ModelExecError)
    _stub(f"{_PKG}.utils.logs")
    _stub(f"{_PKG}.utils.logs.logging", logger=logging.getLogger("mindiesd"))
    pkg_name = f"{_PKG}.cache_agent"
    spec = importlib.util.spec_from_file_location(pkg_name, root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[pkg_name] = pkg
    # The sources import "mindiesd.utils..."; point that name at the stand-ins while loading.
    saved = {k: sys.modules.get(k) for k in ("mindiesd", "mindiesd.utils", "mindiesd.utils.exception",
                                             "mindiesd.utils.logs", "mindiesd.utils.logs.logging")}
    try:
        for k in saved:
            sys.modules[k] = sys.modules[k.replace("mindiesd", _PKG, 1)]
        spec.loader.exec_module(pkg)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    pkg.ConfigError = ConfigError
    return pkg
