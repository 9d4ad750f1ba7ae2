"""Optional loaders for third-party cache implementations, used only for side-by-side comparisons.

Nothing in :mod:`npu_cache_fx` depends on this subpackage. It exists so that tests and
benchmarks can run the *real* code of the systems npu_cache_fx is compared with:

* :func:`npu_cache_fx.compat.mindie.load` loads MindIE-SD 3.1.0's ``cache_agent`` modules
  from the installed ``mindiesd`` wheel (``pip install --no-deps mindiesd==3.1.0``) without
  ``torch_npu``; it returns ``None`` when the wheel is absent, so callers skip cleanly.
"""

__all__ = ["mindie"]
