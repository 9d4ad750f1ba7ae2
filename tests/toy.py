"""Toy DiTs whose every value is predictable: each block adds ``gain * timestep``.

With integer inputs, power-of-two gains and integer timesteps all arithmetic
is exact in float32, so tests compare with ``==``.
"""

from __future__ import annotations

import torch
from torch import nn


class _Gain(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.norm = nn.Identity()  # blocks are composite modules, like real DiT blocks
        self.gain = nn.Parameter(torch.tensor(float(value)), requires_grad=False)


class SingleBlock(_Gain):
    """Wan-like: hidden stream + side inputs (context, temb); returns hidden only."""

    def forward(self, hidden_states, encoder_hidden_states, temb):
        return self.norm(hidden_states) + self.gain * temb + 0 * encoder_hidden_states.sum()


class DualBlock(nn.Module):
    """Flux double-block-like: returns ``(encoder, hidden)`` -- encoder first."""

    def __init__(self, gain_h: float, gain_e: float):
        super().__init__()
        self.h = _Gain(gain_h)
        self.e = _Gain(gain_e)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        return encoder_hidden_states + self.e.gain * temb, hidden_states + self.h.gain * temb


class JointBlock(_Gain):
    """Flux single-block-like: concatenates the streams, adds, splits them back."""

    def forward(self, hidden_states, encoder_hidden_states, temb):
        n = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        joint = joint + self.gain * temb
        return joint[:, :n], joint[:, n:]


class ToyDiT(nn.Module):
    """``dual`` DualBlocks then ``joint`` JointBlocks (Flux-like), or ``single`` SingleBlocks (Wan-like)."""

    def __init__(self, dual: int = 0, joint: int = 0, single: int = 0, time_power: int = 1):
        super().__init__()
        self.time_power = time_power  # blocks add gain * t**time_power
        self.transformer_blocks = nn.ModuleList(DualBlock(2.0 ** i, 2.0 ** (i + 8)) for i in range(dual))
        self.single_transformer_blocks = nn.ModuleList(JointBlock(2.0 ** (i + 2)) for i in range(joint))
        self.blocks = nn.ModuleList(SingleBlock(2.0 ** i) for i in range(single))
        self.proj_out = nn.Linear(1, 1, bias=False)
        nn.init.ones_(self.proj_out.weight)
        self.agents = {}  # block list name -> CacheAgent applied by hand (the eager reference)
        self.calls = 0

    def _run(self, name, blocks, hidden, encoder, temb, two_streams):
        agent = self.agents.get(name)
        for blk in blocks:
            if agent is not None:
                out = agent.apply(blk, hidden_states=hidden, encoder_hidden_states=encoder, temb=temb)
            else:
                out = blk(hidden, encoder, temb)
            if two_streams:
                encoder, hidden = out
            else:
                hidden = out
        return hidden, encoder

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, return_dict: bool = False):
        self.calls += 1
        temb = timestep.reshape(-1, 1, 1) ** self.time_power
        hidden, encoder = hidden_states, encoder_hidden_states
        hidden, encoder = self._run("transformer_blocks", self.transformer_blocks, hidden, encoder, temb, True)
        hidden, encoder = self._run("single_transformer_blocks", self.single_transformer_blocks, hidden,
                                    encoder, temb, True)
        hidden, encoder = self._run("blocks", self.blocks, hidden, encoder, temb, False)
        out = hidden * self.proj_out.weight.reshape(())
        return {"sample": out} if return_dict else (out,)


def toy_inputs(timestep: float, batch: int = 1, tokens: int = 4, text: int = 4, dim: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randint(-8, 8, (batch, tokens, dim), generator=g).float(),
        encoder_hidden_states=torch.randint(-8, 8, (batch, text, dim), generator=g).float(),
        timestep=torch.full((batch,), float(timestep)),
    )


class ToyAttention(nn.Module):
    """Dummy attention: returns ``gain * temb`` (broadcast), so cached values are predictable."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(gain)), requires_grad=False)
        self.to_q = nn.Identity()

    def forward(self, hidden_states, temb):
        return self.to_q(self.gain * temb + 0 * hidden_states)


class AttnBlock(nn.Module):
    """``h + attn(h, temb) + ff`` with a dummy attention; ff adds ``temb`` so blocks differ per step."""

    def __init__(self, i: int):
        super().__init__()
        self.norm1 = nn.Identity()
        self.attn = ToyAttention(2.0 ** i)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        return hidden_states + self.attn(self.norm1(hidden_states), temb) + temb


class _BlocksDiT(nn.Module):
    """Runs ``self.blocks`` in order on (hidden, context, temb); returns ``(hidden,)``."""

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, return_dict: bool = False):
        temb = timestep.reshape(-1, 1, 1)
        h = hidden_states
        for blk in self.blocks:
            h = blk(h, encoder_hidden_states, temb)
        return (h,)


class AttnDiT(_BlocksDiT):
    def __init__(self, n: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(AttnBlock(i) for i in range(n))


class QKVAttention(nn.Module):
    """A real self-attention with Q/K/V projections and SDPA."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class QKVBlock(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = QKVAttention(dim)
        self.ff = nn.Linear(dim, dim)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        h = hidden_states + self.attn(self.norm1(hidden_states))
        return h + self.ff(h) * temb


class QKVDiT(_BlocksDiT):
    def __init__(self, n: int = 3, dim: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList(QKVBlock(dim) for _ in range(n))


class UnexportableDiT(ToyDiT):
    """Branches on a tensor value in forward (like mask-length code in some DiTs): torch.export fails."""

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, return_dict: bool = False):
        lengths = (encoder_hidden_states.abs().sum(-1) >= 0).sum(-1).tolist()
        if lengths[0] > 1000:  # never true; export cannot know that
            hidden_states = hidden_states * 0
        return super().forward(hidden_states, encoder_hidden_states, timestep, return_dict)


class UnexportableAttnDiT(AttnDiT):
    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, return_dict: bool = False):
        if (hidden_states.abs().sum(-1) >= 0).sum(-1).tolist()[0] > 1000:
            hidden_states = hidden_states * 0
        return super().forward(hidden_states, encoder_hidden_states, timestep, return_dict)
