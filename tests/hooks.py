"""By-hand :class:`~npu_cache_fx.CacheAgent` hooks: the eager reference the graph rewrites are tested against.

``agent_on_blocks`` wraps every block's ``forward`` in ``agent.apply`` (MindIE's
DiT cache usage); ``agent_on_attention`` wraps one attention submodule per
block (MindIE's attention cache usage). Both restore the model on exit.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterable

import torch

from npu_cache_fx import CacheAgent
from npu_cache_fx.schedule import Action, config_actions

__all__ = ["ByHand", "RangeByHand", "agent_on_attention", "agent_on_blocks"]


def _keyword_call(orig):
    """``orig`` callable as ``fn(hidden[, encoder], **kw)``, the way CacheAgent calls a block.

    Blocks whose second parameter is not ``encoder_hidden_states`` (PixArt's
    ``BasicTransformerBlock(hidden_states, attention_mask, encoder_hidden_states)``)
    then still get every input under its own name.
    """
    def call(hidden, *rest, **kwargs):
        if rest:
            (kwargs["encoder_hidden_states"],) = rest
        return orig(hidden_states=hidden, **kwargs)
    return call


@contextlib.contextmanager
def agent_on_blocks(blocks: Iterable[torch.nn.Module], agent: CacheAgent):
    """Apply ``agent`` around every block's forward, as MindIE's docs do by hand."""
    originals = []
    blocks = list(blocks)
    for block in blocks:
        orig = block.forward
        sig = inspect.signature(orig)

        def forward(*args, _orig=orig, _sig=sig, **kwargs):
            bound = dict(_sig.bind(*args, **kwargs).arguments)
            for name, param in _sig.parameters.items():
                if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
                    bound.update(bound.pop(name))
            hidden = bound.pop("hidden_states")
            return agent.apply(_keyword_call(_orig), hidden_states=hidden, **bound)

        originals.append(block.__dict__.get("forward"))
        block.forward = forward
    try:
        yield agent
    finally:
        for block, orig in zip(blocks, originals):
            _restore_forward(block, orig)


@contextlib.contextmanager
def agent_on_attention(blocks: Iterable[torch.nn.Module], agent: CacheAgent, name: str):
    """Apply ``agent`` around submodule ``name`` (e.g. ``"attn"``) of every block."""
    saved = []
    for block in blocks:
        attn = getattr(block, name)
        orig = attn.forward
        saved.append((attn, attn.__dict__.get("forward")))
        attn.forward = lambda *a, _o=orig, **k: agent.apply(_o, *a, **k)
    try:
        yield agent
    finally:
        for attn, orig in saved:
            _restore_forward(attn, orig)


def _restore_forward(module: torch.nn.Module, own) -> None:
    """Put back the module's own ``forward`` attribute, or none (the class's), as it was."""
    if own is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = own


class _Reference(torch.nn.Module):
    """A model under a plan applied by hand; other attributes (config, dtype, device...) are the model's."""

    def __init__(self, model, configs):
        super().__init__()
        self.model = model
        self.configs = configs

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


class ByHand(_Reference):
    """A pipeline's transformer with one CacheAgent per config applied by hand: the reference."""

    def __init__(self, model, configs, order):
        super().__init__(model, configs)
        self.agents = [CacheAgent(c, output_order=order) for c in configs]

    @contextlib.contextmanager
    def cache_context(self, name, **kwargs):
        with contextlib.ExitStack() as stack:
            for agent in self.agents:
                stack.enter_context(agent.cache_context(name))
            yield

    def forward(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            for cfg, agent in zip(self.configs, self.agents):
                stack.enter_context(agent_on_blocks(self.model.get_submodule(cfg.blocks), agent))
            return self.model(*args, **kwargs)


class RangeByHand(_Reference):
    """The spec's block-range semantics by hand, for a model with code between the blocks of a range (ControlNet
    residuals, VACE hints): a refresh records ``delta = out(end - 1) - in(start)`` per stream; at a reuse step the
    model runs as is and the last block's output is replaced by ``in + delta``, so whatever the range's blocks
    and the code between them computed is discarded, as the graph rewrite removes it. Blocks return their
    hidden stream, or ``(encoder, hidden)`` (diffusers' Flux).

    ``ByHand`` (MindIE's usage) differs there: its blocks after the first pass their input through, and the
    model's code between them runs again on top of a delta that already holds what it added."""

    def __init__(self, model, configs):
        super().__init__(model, configs)
        self.actions = [config_actions(c) for c in configs]
        self.step = 0
        self.deltas = [None] * len(configs)

    def forward(self, *args, **kwargs):
        handles = []
        for k, (cfg, actions) in enumerate(zip(self.configs, self.actions)):
            action = actions[self.step % cfg.steps_count]
            if action is Action.COMPUTE:
                continue
            blocks = self.model.get_submodule(cfg.blocks)
            entered = {}

            def pre(mod, a, kw, entered=entered):
                hidden = kw["hidden_states"] if "hidden_states" in kw else a[0]
                encoder = kw["encoder_hidden_states"] if "encoder_hidden_states" in kw else a[1]
                entered["in"] = (encoder, hidden)

            def post(mod, a, kw, out, k=k, action=action, entered=entered):
                pair = isinstance(out, tuple)
                outs, ins = (out, entered["in"]) if pair else ((out,), entered["in"][1:])
                if action is Action.WRITE:
                    self.deltas[k] = tuple(o - i for o, i in zip(outs, ins))
                    return None
                new = tuple(i + d for i, d in zip(ins, self.deltas[k]))
                return new if pair else new[0]
            handles.append(blocks[cfg.block_start].register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(blocks[cfg.block_end - 1].register_forward_hook(post, with_kwargs=True))
        try:
            return self.model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            self.step += 1
