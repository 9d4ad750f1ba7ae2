"""Notice when a wrapped model changes in a way its captured graphs would not see.

A capture freezes the model's *code path*: which submodules run, which hooks
fire, which LoRA adapters are active and at what scale (peft keeps the scale a
Python float, so export bakes it in), which attention processor each attention
module calls and which attention backend it dispatches to. Parameters are
different: the captured graph reads the model's own ``Parameter`` objects, so
in-place updates (``load_state_dict``, ``param.data = ...``, fusing a LoRA into
the weights) reach it without a recapture -- but *replacing* a parameter does not.

:class:`ModelWatch` takes a fingerprint of everything a capture depends on and
answers, per call, "did any of it change?" cheaply:

* structural changes (a submodule, parameter or buffer assigned or registered
  anywhere, a hook registered anywhere, a hook added to or removed from a
  diffusers ``HookRegistry``: ``enable_layerwise_casting``, ``enable_cache``...)
  bump process-wide counters, fed by torch's global registration hooks,
  ``RemovableHandle``'s id counter and the registry's wrapped methods: one
  comparison of two ints per call; when they moved, the fingerprint is
  recomputed and compared;
* state that changes without any registration (a hook removed, a LoRA adapter
  switched, disabled, re-scaled or merged, an attention processor swapped or given
  another backend (diffusers' ``set_attention_backend``, ``attention_backend(...)``), a
  ``forward`` replaced by an accelerate or diffusers hook, ``train()``/``eval()``)
  is read from the few objects that hold it, recorded with the fingerprint.

Example::

    >>> watch = ModelWatch(model)                  # doctest: +SKIP
    >>> model.load_lora_adapter(...)               # doctest: +SKIP
    >>> watch.changed()                            # doctest: +SKIP
    ['modules', 'parameters', 'adapters']
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["ModelWatch", "fingerprint", "offload_hooks", "stateful_hooks"]

_registrations = 0
_installed = False
_install_lock = threading.Lock()


def _bump(*_: Any) -> None:
    global _registrations
    _registrations += 1
    return None


def _install() -> None:
    """Count every submodule/parameter/buffer registration in the process (once), and every hook added to or
    removed from a diffusers ``HookRegistry`` once diffusers is imported."""
    global _installed
    with _install_lock:
        if not _installed:
            from torch.nn.modules import module as M
            M.register_module_module_registration_hook(_bump)
            M.register_module_parameter_registration_hook(_bump)
            M.register_module_buffer_registration_hook(_bump)
            _installed = True
        _count_diffusers_hooks()


def _counted(method: Callable) -> Callable:
    @functools.wraps(method)
    def counted(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        finally:
            _bump()
    counted._npu_cache_fx_counted = True  # type: ignore[attr-defined]
    return counted


def _count_diffusers_hooks() -> None:
    """diffusers' hooks (``enable_layerwise_casting``, ``enable_group_offload``, ``enable_cache``...) replace a
    module's ``forward`` and set plain attributes: no torch registration hook sees them. Their registry's
    ``register_hook`` / ``remove_hook`` bump the registration counter instead (wrapped once per process)."""
    if "diffusers" not in sys.modules:
        return
    try:
        registry = importlib.import_module("diffusers.hooks.hooks").HookRegistry
    except (ImportError, AttributeError):  # a diffusers without hooks
        return
    for name in ("register_hook", "remove_hook"):
        method = registry.__dict__.get(name)
        if callable(method) and not getattr(method, "_npu_cache_fx_counted", False):
            setattr(registry, name, _counted(method))


def _counters() -> Tuple[int, int]:
    return _registrations, RemovableHandle.next_id


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _global_hook_dicts() -> List[dict]:
    from torch.nn.modules import module as M
    return [getattr(M, name) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")
            if isinstance(getattr(M, name, None), dict)]


def _adapter_state(mod: torch.nn.Module) -> Optional[Tuple[Any, ...]]:
    """A peft tuner layer's adapter state (active set, disabled, merged, scales), else None."""
    d = mod.__dict__
    if "_active_adapter" not in d or "merged_adapters" not in d:
        return None
    scaling = d.get("scaling")
    active = d["_active_adapter"]
    return (tuple(active) if isinstance(active, list) else active, d.get("_disable_adapters"),
            tuple(d["merged_adapters"]), tuple(scaling.items()) if isinstance(scaling, dict) else None)


def _registry(mod: torch.nn.Module) -> Dict[str, Any]:
    """The hooks (by name) in diffusers' HookRegistry on ``mod`` (group offloading, casting, caches...), if any."""
    hooks = getattr(mod.__dict__.get("_diffusers_hook"), "hooks", None)
    return hooks if isinstance(hooks, dict) else {}


def _registry_hooks(mod: torch.nn.Module) -> Tuple[str, ...]:
    """Names of the hooks in diffusers' HookRegistry on ``mod``, if any."""
    return tuple(_registry(mod))


def _processor_state(d: Dict[str, Any]) -> Tuple[int, Any]:
    """A diffusers attention module's processor (from the module's ``__dict__``) and the attention backend it
    dispatches to (``set_attention_backend`` sets ``processor._attention_backend``; None: the registry's active
    backend)."""
    processor = d.get("processor")
    return id(processor), getattr(processor, "_attention_backend", None)


def _attention_registry() -> Any:
    """diffusers' attention backend registry (``attention_backend(...)`` and ``set_attention_backend`` set its
    active backend), if diffusers has one and it is imported."""
    dispatch = sys.modules.get("diffusers.models.attention_dispatch")
    return getattr(dispatch, "_AttentionBackendRegistry", None)


def fingerprint(model: torch.nn.Module) -> Tuple[Dict[str, Any], List[Tuple[Callable[[], Any], Any]]]:
    """What a capture of ``model`` depends on, by section, and the probes that re-read its mutable part:
    what can change without a registration (a hook removed, an adapter switched, a processor swapped, a
    forward replaced, ``train()``)."""
    modules, params, hooks, adapters, processors, forwards = [], [], [], [], [], []
    probes: List[Tuple[Callable[[], Any], Any]] = []
    for name, mod in model.named_modules(remove_duplicate=False):
        d = mod.__dict__
        modules.append((name, id(mod)))
        params.append((name, tuple((k, id(v)) for k, v in mod._parameters.items()),
                       tuple((k, id(v)) for k, v in mod._buffers.items())))
        hooked = [h for h in _HOOK_DICTS if d.get(h)]
        if hooked:
            hooks.append((name, tuple((h, tuple(d[h])) for h in hooked)))
            probes += [(d[h].__len__, len(d[h])) for h in hooked]  # removing a hook registers nothing
        state = _adapter_state(mod)
        if state is not None:
            adapters.append((name, state))
            probes.append((lambda m=mod: _adapter_state(m), state))
        if "processor" in d:  # diffusers Attention: set_processor() swaps a plain object, set_attention_backend()
            state = _processor_state(d)  # sets an attribute on it
            processors.append((name, state))
            probes.append((lambda d=d: _processor_state(d), state))
        own, accelerate, registered = d.get("forward"), d.get("_hf_hook"), _registry_hooks(mod)
        if own is not None or accelerate is not None or registered:
            forwards.append((name, id(own), id(accelerate), registered))
            probes.append((lambda m=mod: id(m.__dict__.get("forward")), id(own)))
    for hooks_dict in _global_hook_dicts():
        hooks.append(("<global>", tuple(hooks_dict)))
        probes.append((hooks_dict.__len__, len(hooks_dict)))
    probes.append((lambda: model.training, model.training))
    registry = _attention_registry() if processors else None
    active = getattr(registry, "_active_backend", None)
    if registry is not None:  # what processors without a backend of their own dispatch to
        probes.append((lambda: registry._active_backend, active))
    sections = {"modules": tuple(modules), "parameters": tuple(params), "hooks": tuple(hooks),
                "adapters": tuple(adapters), "attention processors": tuple(processors),
                "attention backend": active, "forward overrides": tuple(forwards), "training": model.training}
    return sections, probes


def stateful_hooks(model: torch.nn.Module) -> List[str]:
    """``"module: hook"`` for each stateful hook in diffusers' hook registries on ``model`` (its step caches:
    FirstBlockCache, FasterCache, PyramidAttentionBroadcast, TaylorSeer, MagCache...; its text KV cache). Their
    state changes from call to call in Python: a captured graph would freeze one call's branch."""
    return [f"{name or '<model>'}: {h}" for name, mod in model.named_modules()
            for h, hook in _registry(mod).items() if getattr(hook, "_is_stateful", False)]


def offload_hooks(model: torch.nn.Module) -> List[str]:
    """Submodules whose forward moves weights between devices (accelerate's offload hooks,
    diffusers' group offloading): a captured graph would run without them."""
    found = []
    for name, mod in model.named_modules():
        if not name:
            continue
        if "_hf_hook" in mod.__dict__ or any("offload" in h for h in _registry_hooks(mod)):
            found.append(name)
    return found


class ModelWatch:
    """Per-call check that ``model`` is still the model its captures were taken from."""

    def __init__(self, model: torch.nn.Module) -> None:
        _install()
        self.model = model
        self.refresh()

    def refresh(self) -> None:
        """Take the model as it is now as the reference."""
        self._counters = _counters()
        self._sections, self._probes = fingerprint(self.model)

    def _quiet(self) -> bool:
        """Nothing registered and no probed state moved since the reference: the model is unchanged (cheap)."""
        return self._counters == _counters() and all(read() == value for read, value in self._probes)

    def unchanged(self) -> bool:
        """Whether the model is still as at :meth:`refresh` (like ``not changed()``, without taking the model
        as it is now as the new reference)."""
        return self._quiet() or fingerprint(self.model)[0] == self._sections

    def changed(self) -> List[str]:
        """The sections that changed since :meth:`refresh` (empty: nothing did)."""
        if self._quiet():
            return []
        sections, probes = fingerprint(self.model)
        self._counters = _counters()
        changed = [k for k, v in sections.items() if self._sections.get(k) != v]
        self._sections, self._probes = sections, probes
        return changed
