"""Predicted-error proxy from the recorded reference trajectory.

A READ step ``s`` of a DiT range reuses the delta recorded at its refresh step
``r``; the stream leaving the range is then off by ``e(s) = delta(r) - delta(s)``
(the reference run gives both). Downstream blocks are residual, so this error
reaches the last block's output roughly unchanged, and the output head
(LayerNorm + linear) turns it into a velocity error of about
``g(s) |e(s)|`` with ``g(s) = |v(s)| / |h_last(s)|`` (the model output over the
last block's hidden stream, both recorded). The sampler scales a velocity
error by the step size ``dt(s)``. The proxy is

    P = sum over READ steps s of  (w(s) * dt(s) * g(s) * |e(s)|) ** 2

with the warm-up damping ``w(s) = min(1, (s + 1) / (warmup * N))`` (default
``warmup = 0.2``): an error in the first steps, at high noise, is largely
corrected by the later steps (the reason MindIE keeps ``s0`` warm steps), on
the scale of the final output's MSE; the search fits ``mse ~ c * P**k`` on the
plans it fully evaluates and reports it. Only the primary (image) stream
counts by default (``encoder_weight = 0``): on tiny-flux that ranks best.

Calibration on tiny-flux (28 steps, 85 fully evaluated DiT plans): Spearman
rank correlation with the measured MSE 0.96 over plans of speedup 1.3-3x, 0.93
within the 1.95-2.2x band (0.94 / 0.88 without the warm-up damping). Variants
tried and rejected there: summing the per-step errors linearly (0.92 / 0.86),
no output gain (0.75 / 0.60), extra weight on early steps (<= 0.89 / 0.82),
a plain lateness weight ``1 + s/(N-1)`` (0.94 / 0.87).

Attention caches use the same formula with ``e(s)`` the change of each cached
attention output (summed over the cached calls) times a per-call gain: the part
of the block's own residual that the attention output accounts for, measured
on the reference run as ``|block delta| / (|attention out| + |block delta|)``.

Example::

    >>> proxy = Proxy(recorder, cost_model)                       # doctest: +SKIP
    >>> proxy.score(proxy.dit_matrix(1, 8), actions)              # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import FORECASTS
from ..schedule import Action
from .costs import CostModel
from .signals import Recorder
from .space import BlockSeq

__all__ = ["FORECAST_ORDERS", "Proxy", "StreamPair", "forecast_errors", "forecast_weights", "refresh_history",
           "watch_nodes"]

# CacheConfig.forecast -> extrapolation order (refreshes used): plain reuse is order 1.
FORECAST_ORDERS = FORECASTS  # forecast -> values kept per slot: one meaning, config's


def refresh_history(writes: np.ndarray, depth: int = 3, segments: Sequence[int] = ()) -> np.ndarray:
    """``H[m, s, k]``: the k-th latest WRITE step strictly before ``s`` (newest first), -1 if none.

    ``writes``: (M, N) bool WRITE masks (after :func:`config_actions`'s pruning: exactly the
    refreshes the runtime records in its forecast history). ``segments``: steps at which another
    denoiser takes over; its history starts empty there.
    """
    writes = np.atleast_2d(np.asarray(writes, dtype=bool))
    m, n = writes.shape
    out = np.full((m, n, depth), -1, dtype=np.int64)
    h = np.full((m, depth), -1, dtype=np.int64)
    for s in range(n):
        if s in segments:
            h[:] = -1
        out[:, s, :] = h
        w = writes[:, s]
        if w.any():
            h[w, 1:] = h[w, :-1]
            h[w, 0] = s
    return out


def forecast_weights(timesteps: np.ndarray, hist: np.ndarray, order: int) -> np.ndarray:
    """Vectorised :func:`npu_cache_fx.schedule.forecast_coefficients` for every step of every plan.

    ``hist``: (M, N, >=order) refresh steps, newest first (-1: none). Returns (M, N, order)
    Lagrange weights at ``t_s`` through the newest ``order`` distinct refresh timesteps
    (fewer when fewer refreshes exist; unused slots 0).
    """
    t = np.asarray(timesteps, dtype=np.float64)
    h = hist[..., :order]
    n = t.shape[0]
    ts = np.broadcast_to(t[None, :, None], h.shape)
    tk = t[np.clip(h, 0, n - 1)]
    valid = h >= 0
    for k in range(1, order):  # a repeated timestep counts once (forecast_coefficients' rule)
        for j in range(k):
            valid[..., k] &= ~(valid[..., j] & (tk[..., k] == tk[..., j]))
    c = np.where(valid, 1.0, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(order):
            for j in range(order):
                if j == k:
                    continue
                f = (ts[..., k] - tk[..., j]) / (tk[..., k] - tk[..., j])
                c[..., k] *= np.where(valid[..., j] & valid[..., k], f, 1.0)
    return c


def forecast_errors(terms: Sequence[Tuple[float, np.ndarray]], hist: np.ndarray, coefs: np.ndarray) -> np.ndarray:
    """``E[m, s] = sum_terms w * |x(s) - sum_k c_k x(r_k)|`` from each term's Gram matrix ``G = X X^T``.

    Exact (no projection): ``|x_s - sum c_k x_k|^2 = G_ss - 2 sum c_k G_sk + sum c_j c_k G_jk``.
    """
    order = coefs.shape[-1]
    m, n = coefs.shape[:2]
    h = np.clip(hist[..., :order], 0, None)
    s = np.broadcast_to(np.arange(n)[None, :], (m, n))
    total = np.zeros((m, n))
    for w, G in terms:
        if not w:
            continue
        q = G[s, s] - 2.0 * (coefs * G[s[..., None], h]).sum(-1)
        q = q + np.einsum("msj,msk,msjk->ms", coefs, coefs, G[h[..., :, None], h[..., None, :]])
        total += w * np.sqrt(np.maximum(q, 0.0))
    return total


@dataclass(frozen=True)
class StreamPair:
    role: str
    input: str
    output: str


def _primary_role(role: str) -> bool:
    return role in ("hidden_states", "stream0", "x", "sample")


def watch_nodes(cm_factory, seq: BlockSeq, attention: Optional[str] = None) -> List[str]:
    """Stream boundary nodes of every per-list block range and every attention output."""
    cm = cm_factory
    names: List[str] = []
    for fqn, count in seq.lists:
        for lo in range(count):
            for hi in range(lo + 1, count + 1):
                for s in cm.region(fqn, lo, hi).streams:
                    names += [s.input, s.output]
        try:
            for site in cm.sites(fqn, 0, count, attention):
                names += list(site.outputs)
        except Exception:  # no attention submodule in this list
            pass
    return list(dict.fromkeys(names))


class Proxy:
    """Error proxy of DiT and attention caches on the recorded trajectory (see module doc)."""

    def __init__(self, rec: Recorder, cm: CostModel, *, context: Optional[str] = None, lateness: float = 0.0,
                 encoder_weight: float = 0.0, attention: Optional[str] = None, warmup: float = 0.2,
                 segments: Sequence[int] = ()):
        self.rec = rec
        self.segments = tuple(segments)  # steps at which another denoiser (with a cache of its own) takes over
        self.cm = cm
        self.seq = cm.seq
        self.context = context or rec.contexts()[0]
        self.lateness = lateness
        self.warmup = warmup
        self.encoder_weight = encoder_weight
        self.attention = attention
        self._series: Dict[str, torch.Tensor] = {}
        self._D: Dict[Tuple, np.ndarray] = {}
        calls = [c for c in rec.calls if c["primary"] and c["context"] == self.context]
        self.steps = len(calls)
        ts = [c["timestep"] for c in calls]
        # forecasting extrapolates in timestep: only scored when the reference run saw them
        self.timesteps = (np.array(ts, dtype=np.float64) if all(t is not None for t in ts) and self.steps > 1
                          and len(set(ts)) == len(ts) else None)
        if all(t is not None for t in ts) and self.steps > 1:
            nxt = ts[1:] + [0.0]
            dt = np.abs(np.array(ts, dtype=np.float64) - np.array(nxt, dtype=np.float64))
            dt = dt / max(dt.mean(), 1e-12)
        else:
            dt = np.ones(self.steps)
        self.dt = dt
        last_fqn, last_count = self.seq.lists[-1]
        last = cm.region(last_fqn, last_count - 1, last_count)
        hidden = next((s for s in last.streams if _primary_role(s.role)), last.streams[0])
        h_norm = self._norm(hidden.output)
        v = rec.output_series(self.context).double()
        v_norm = v.norm(dim=1).numpy() * math.sqrt(rec.sketch.scale(_out_numel(rec)))
        self.gain = v_norm / np.maximum(h_norm, 1e-12)  # velocity error per unit stream error
        self.h_norm = h_norm

    # ------------------------------------------------------------------ raw series
    def series(self, name: str) -> torch.Tensor:
        if name not in self._series:
            self._series[name] = self.rec.series(name, self.context).double()
        return self._series[name]

    def _scale(self, name: str) -> float:
        return math.sqrt(self.rec.sketch.scale(self.rec.numel[name]))

    def _norm(self, name: str) -> np.ndarray:
        return self.series(name).norm(dim=1).numpy() * self._scale(name)

    @staticmethod
    def _pairwise(x: torch.Tensor) -> np.ndarray:
        """``D[s, r] = |x[s] - x[r]|`` for rows of ``x``."""
        sq = (x * x).sum(1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
        return d2.clamp_min(0).sqrt().numpy()

    # ------------------------------------------------------------------ dit
    def window_pairs(self, a: int, b: int) -> List[StreamPair]:
        """Streams a global window carries out, each with the window's entry node."""
        parts = self.seq.split(a, b)
        first = self.cm.region(*parts[0])
        last = self.cm.region(*parts[-1])
        entry = {s.role: s.input for s in first.streams}
        return [StreamPair(s.role, entry.get(s.role, s.input), s.output) for s in last.streams]

    def stream_error(self, a: int, b: int) -> np.ndarray:
        """``E[s, r]``: norm of ``delta(r) - delta(s)`` summed over the window's streams (encoder ones weighted)."""
        key = ("dit", a, b)
        if key not in self._D:
            total = None
            for pair in self.window_pairs(a, b):
                delta = self.series(pair.output) - self.series(pair.input)
                d = self._pairwise(delta) * self._scale(pair.output)
                w = 1.0 if _primary_role(pair.role) else self.encoder_weight
                total = w * d if total is None else total + w * d
            self._D[key] = total
        return self._D[key]

    def dit_matrix(self, a: int, b: int) -> np.ndarray:
        """Velocity-error estimate ``M[s, r]`` of reading at ``s`` the delta recorded at ``r``."""
        return self.stream_error(a, b) * self.gain[:, None]

    # ------------------------------------------------------------------ attention
    def site_gain(self, g: int) -> float:
        fqn, i = self.seq.locate(g)
        key = ("gain", g)
        if key not in self._D:
            reg = self.cm.region(fqn, i, i + 1)
            pair = next((s for s in reg.streams if _primary_role(s.role)), reg.streams[0])
            delta = np.median(np.linalg.norm((self.series(pair.output) - self.series(pair.input)).numpy(), axis=1))
            delta *= self._scale(pair.output)
            outs = [o for s in self.cm.sites(fqn, i, i + 1, self.attention) for o in s.outputs]
            a = sum(np.median(self._norm(o)) for o in outs)
            self._D[key] = float(delta / max(a + delta, 1e-12))
        return self._D[key]

    def site_error(self, g: int) -> np.ndarray:
        key = ("attn", g)
        if key not in self._D:
            fqn, i = self.seq.locate(g)
            total = None
            for site in self.cm.sites(fqn, i, i + 1, self.attention):
                for o in site.outputs:
                    d = self._pairwise(self.series(o)) * self._scale(o)
                    total = d if total is None else total + d
            self._D[key] = total * self.site_gain(g)
        return self._D[key]

    def attention_matrix(self, a: int, b: int) -> np.ndarray:
        return sum(self.site_error(g) for g in range(a, b)) * self.gain[:, None]

    # ------------------------------------------------------------------ forecast
    def forecasts(self) -> Tuple[str, ...]:
        """Forecast modes the proxy can score: all of them when the trajectory's timesteps are known."""
        return tuple(FORECAST_ORDERS) if self.timesteps is not None else ("none",)

    def gram_terms(self, method: str, a: int, b: int) -> List[Tuple[float, np.ndarray]]:
        """``(weight, X X^T)`` per cached value of the range, on the same scale as :meth:`dit_matrix`."""
        key = ("gram", method, a, b)
        if key not in self._D:
            terms: List[Tuple[float, np.ndarray]] = []
            if method == "dit_block_cache":
                for pair in self.window_pairs(a, b):
                    w = 1.0 if _primary_role(pair.role) else self.encoder_weight
                    if w:
                        x = self.series(pair.output) - self.series(pair.input)
                        terms.append((w, (x @ x.T).numpy() * self._scale(pair.output) ** 2))
            else:
                for g in range(a, b):
                    fqn, i = self.seq.locate(g)
                    sg = self.site_gain(g)
                    for site in self.cm.sites(fqn, i, i + 1, self.attention):
                        for o in site.outputs:
                            x = self.series(o)
                            terms.append((sg, (x @ x.T).numpy() * self._scale(o) ** 2))
            self._D[key] = terms
        return self._D[key]

    def score_forecast(self, method: str, a: int, b: int, reads: np.ndarray, writes: np.ndarray,
                       forecast: str) -> np.ndarray:
        """Proxy of (M, N) plans of one range whose READ steps extrapolate the last refreshes.

        ``forecast="none"`` equals :meth:`score_many` (plain reuse: order 1).
        """
        order = FORECAST_ORDERS[forecast]
        reads = np.atleast_2d(np.asarray(reads, dtype=bool))
        hist = refresh_history(writes, max(order, 1), self.segments)
        if order == 1 or self.timesteps is None:
            matrix = self.dit_matrix(a, b) if method == "dit_block_cache" else self.attention_matrix(a, b)
            return self.score_many(matrix, reads, hist[..., 0])
        coefs = forecast_weights(self.timesteps, hist, order)
        err = forecast_errors(self.gram_terms(method, a, b), hist, coefs) * self.gain[None, :]
        ok = reads & (hist[..., 0] >= 0)
        return (np.square(err * self.weights()[None, :]) * ok).sum(1)

    # ------------------------------------------------------------------ scoring
    def weights(self) -> np.ndarray:
        n = self.steps
        late = np.arange(n) / max(n - 1, 1)
        ramp = np.minimum(1.0, (np.arange(n) + 1) / max(self.warmup * n, 1e-9)) if self.warmup > 0 else 1.0
        return self.dt * ramp * (1.0 + self.lateness * late)

    def score(self, matrix: np.ndarray, actions: Sequence[Action]) -> float:
        w = self.weights()
        total, ref = 0.0, None
        for s, a in enumerate(actions):
            if a is Action.WRITE:
                ref = s
            elif a is Action.READ and ref is not None:
                total += (w[s] * matrix[s, ref]) ** 2
        return float(total)

    def score_many(self, matrix: np.ndarray, reads: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`score`: ``reads`` (S, N) bool, ``refs`` (S, N) int (any value where not read)."""
        w = self.weights()
        n = self.steps
        vals = matrix[np.arange(n)[None, :], np.clip(refs, 0, n - 1)]
        return (np.square(vals * w[None, :]) * reads).sum(1)

    def to_mse_scale(self, p: float) -> float:
        return p / max(_out_numel(self.rec), 1)


def _out_numel(rec: Recorder) -> int:
    cap = rec.capture
    out = next(n for n in cap.gm.graph.nodes if n.op == "output")
    first = next((a for a in out.args[0] if hasattr(a, "meta") and "val" in a.meta), None)
    return int(first.meta["val"].numel()) if first is not None else 1
