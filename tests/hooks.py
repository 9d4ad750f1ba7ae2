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

__all__ = ["agent_on_attention", "agent_on_blocks"]


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

        originals.append(orig)
        block.forward = forward
    try:
        yield agent
    finally:
        for block, orig in zip(blocks, originals):
            block.forward = orig


@contextlib.contextmanager
def agent_on_attention(blocks: Iterable[torch.nn.Module], agent: CacheAgent, name: str):
    """Apply ``agent`` around submodule ``name`` (e.g. ``"attn"``) of every block."""
    saved = []
    for block in blocks:
        attn = getattr(block, name)
        orig = attn.forward
        attn.forward = lambda *a, _o=orig, **k: agent.apply(_o, *a, **k)
        saved.append((attn, orig))
    try:
        yield agent
    finally:
        for attn, orig in saved:
            attn.forward = orig
