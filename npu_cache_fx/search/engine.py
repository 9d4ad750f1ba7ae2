"""``search()``: our cost-model + proxy search, and MindIE's search as the baseline, on one capture.

Ours (``strategy="ours"``):

1. one uncached generation (reference output), one recorded generation through the
   captured graph (per-step signals), the measured cost model (:mod:`.costs`), a warm
   uncached generation timed;
2. screening of every (range x schedule) plan (:mod:`.screen`): predicted speedup from the
   per-step plan and the measured costs, error proxy from the recorded trajectory;
3. measured re-ranking, within ``max_full_runs`` new full generations per search (default 8; plans
   an earlier search of the session ran are reused at no cost): the proxy's best plans (one family
   each, one slot for a late start) and, for every forecast order, the simple all-blocks periodic
   plan with the best proxy for that order, run in full on the tuning batch; then the other forecast
   orders of the best measured plan. The proxy only proposes; the measured MSE decides;
4. non-uniform refinement (:mod:`.refine`) of the best measured periodic plan at the same cost, run
   only with runs left and when its proxy gain exceeds the proxy's own measured error
   (:func:`refine_gain_needed`);
5. the best measured plan (and a refined one that beat it) timed against the uncached model
   (interleaved repeats); the lowest-MSE plan whose measured speedup is at least
   ``accept * target`` wins.

MindIE (``strategy="mindie"``): :mod:`.mindie`, every candidate a full generation, the
winner timed the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from ..config import FORECASTS, CacheConfig, config_list
from ..metrics import mse as mse_fn
from ..metrics import psnr as psnr_fn
from ..schedule import Action, config_actions, segment_actions
from . import mindie as mi
from .proxy import refresh_history
from .refine import actions_to_reads, hill_climb, reads_to_schedule
from .screen import ScreenTable, pick_diverse, screen
from .costs import time_calls
from .session import SearchSession, as_tensor
from .space import ATTN, DIT, Candidate, Part, Schedule, schedule_actions

__all__ = ["SearchResult", "score_plan", "search", "search_ours", "search_mindie"]

log = logging.getLogger(__name__)
METHODS = ("dit_block_cache", "attention_cache", "auto")


@dataclass
class SearchResult:
    """What a search found and what it cost.

    ``config``: the winning plan as a list of :class:`CacheConfig` (``[]`` if nothing was found);
    ``candidates``: every fully evaluated plan plus the best screened ones;
    ``full_runs``: full generations this search ran for quality (MindIE's cost measure); a plan an
    earlier search of the same session already ran is reused and not counted again;
    ``plans_evaluated``: distinct plans with a measured quality in this result, reused ones included
    (what a search on a fresh session would run: compare strategies on it);
    ``timing_runs``: generations run only to time finalists (uncached included);
    ``reference_runs``: uncached/recorded generations of the setup.
    """

    strategy: str
    method: str
    target_speedup: float
    best: Optional[Candidate]
    candidates: List[Candidate]
    full_runs: int
    timing_runs: int
    reference_runs: int
    seconds: float
    target_met: bool
    accept: float = 0.95
    clock: str = "cpu"
    notes: Dict[str, Any] = field(default_factory=dict)
    screened: Dict[str, Any] = field(default_factory=dict)  # arrays for the Pareto plot
    plans_evaluated: int = 0

    @property
    def config(self) -> List[CacheConfig]:
        return self.best.configs() if self.best is not None else []

    @property
    def evaluated(self) -> List[Candidate]:
        return [c for c in self.candidates if c.evaluated]

    def to_json(self) -> Dict[str, Any]:
        from .report import result_to_json
        return result_to_json(self)

    def write(self, out_dir: str) -> Dict[str, str]:
        from .report import write_report
        return write_report(self, out_dir)

    def summary(self) -> str:
        from .report import summary_line
        return summary_line(self)


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n=1): pass
            def close(self): pass
            def set_postfix_str(self, s): pass
        return _Null()


def _exact(session: SearchSession, cand: Candidate) -> Candidate:
    """Predicted speedup from make_plan's decisions (exact per-step costs) and bytes."""
    pred = session.cost.predict(cand.configs())
    cand.predicted_speedup = pred["predicted_speedup"]
    cand.cache_bytes = session.cost.cache_bytes(cand.configs())
    if math.isnan(cand.proxy):
        cand.proxy = proxy_of(session, cand)
    return cand


def proxy_of(session: SearchSession, cand: Candidate) -> float:
    px, n = session.proxy, session.steps_count
    total = 0.0
    for p in cand.parts:
        acts = schedule_actions(p.method, p.schedule, n, session.segments)
        if p.forecast != "none":
            reads = np.array([[a is Action.READ for a in acts]])
            writes = np.array([[a is Action.WRITE for a in acts]])
            total += float(px.score_forecast(p.method, p.start, p.end, reads, writes, p.forecast)[0])
            continue
        matrix = px.dit_matrix(p.start, p.end) if p.method == DIT else px.attention_matrix(p.start, p.end)
        total += px.score(matrix, acts)
    return total


def _evaluate_all(session: SearchSession, cands: Sequence[Candidate], desc: str, progress: bool) -> None:
    bar = _progress(len(cands), desc, progress)
    for c in cands:
        session.evaluate(c)
        bar.update(1)
        bar.set_postfix_str(f"mse={c.mse:.3g} x{c.measured_speedup:.2f}")
    bar.close()


def _fit(cands: Sequence[Candidate]) -> Optional[Dict[str, float]]:
    """``log mse = log c + k log proxy`` on evaluated plans (``k`` in [0.5, 2])."""
    pts = [(c.proxy, c.mse) for c in cands if c.mse and c.proxy and c.mse > 0 and c.proxy > 0
           and math.isfinite(c.proxy)]
    if len(pts) < 2:
        if len(pts) == 1:
            p, m = pts[0]
            return {"log_c": math.log(m) - math.log(p), "k": 1.0, "n": 1}
        return None
    x = np.log([p for p, _ in pts])
    y = np.log([m for _, m in pts])
    if np.ptp(x) < 1e-9:
        k = 1.0
    else:
        k = float(np.clip(np.polyfit(x, y, 1)[0], 0.5, 2.0))
    log_c = float(np.mean(y - k * x))
    resid = y - (log_c + k * x)
    return {"log_c": log_c, "k": k, "n": len(pts), "rms_log_error": float(np.sqrt(np.mean(resid ** 2)))}


def _predict_mse(fit: Optional[Dict[str, float]], proxy) -> Any:
    if fit is None:
        return None
    proxy = np.asarray(proxy, dtype=float)
    with np.errstate(divide="ignore"):
        return np.exp(fit["log_c"] + fit["k"] * np.log(np.maximum(proxy, 1e-300)))


def _finalize(session: SearchSession, finalists: List[Candidate], target: float, accept: float,
              pool: List[Candidate], repeats: int, progress: bool, extra_rounds: int = 2) -> Optional[Candidate]:
    """Time finalists; the lowest-MSE one with timed speedup >= accept * target wins.

    If none passes, the next best untimed evaluated plans (by MSE, predicted >= target) are
    timed, up to ``extra_rounds`` more; failing that, the fastest timed plan is returned.
    """
    timed: List[Candidate] = []
    todo = [c for c in finalists if c is not None]
    for round_ in range(1 + extra_rounds):
        todo = [c for c in {id(c): c for c in todo}.values() if c.timed_speedup is None]
        if not todo:
            break
        bar = _progress(1, f"timing {len(todo)} plan(s) x{repeats}", progress)
        session.time(todo, repeats=repeats)
        bar.update(1)
        bar.close()
        timed += todo
        ok = [c for c in timed if c.timed_speedup >= accept * target]
        if ok:
            return min(ok, key=lambda c: c.mse)
        rest = sorted((c for c in pool if c.evaluated and c.timed_speedup is None
                       and c.predicted_speedup >= target), key=lambda c: c.mse)
        todo = rest[:1]
    return max(timed, key=lambda c: c.timed_speedup) if timed else None


# ----------------------------------------------------------------------------- ours
def search_ours(session: SearchSession, method: str, target: float, *, max_cache_bytes: Optional[int] = None,
                max_full_runs: int = 8, refine: bool = True, refine_runs: int = 2, repeats: int = 3,
                accept: float = 0.95, intervals: Iterable[int] = range(2, 7), attention: Optional[str] = None,
                progress: bool = True, top_rows: int = 40, margin: float = 1.0,
                adastep_thresholds: Sequence[float] = (0.015, 0.05),
                run_fn_steps: Optional[Callable[[Any, int], Any]] = None) -> SearchResult:
    t0 = time.perf_counter()
    counts0 = session.counts()
    session.prepare()
    n = session.steps_count
    # refinement moves READ steps at equal cost; across a denoiser switch a read may cost a compute
    refine = refine and method in (DIT, "auto") and not session.segments
    refine_runs = min(refine_runs, max(max_full_runs - 2, 0)) if refine else 0
    k_periodic = max(max_full_runs, 1)
    notes: Dict[str, Any] = {"steps_count": n, "blocks": session.seq.describe(), "B": session.seq.total}

    tables: List[ScreenTable] = []
    if method in (DIT, "auto"):
        tables.append(screen(session, DIT, intervals=intervals, max_cache_bytes=max_cache_bytes))
    if method in (ATTN, "auto"):
        tables.append(screen(session, ATTN, intervals=intervals, attention=attention,
                             max_cache_bytes=max_cache_bytes))
    screened = sum(len(t) for t in tables)
    notes["screened_plans"] = screened
    notes["forecast"] = {t.method: {"scored": list(t.forecasts),
                                    "chosen": {f: int((t.forecast == k).sum()) for k, f in enumerate(t.forecasts)}}
                         for t in tables if t.forecast is not None}

    # Candidates predicted to reach the target, best proxy first, across tables.
    pool: List[Candidate] = []
    for t in tables:
        order = t.order(target * margin, max_cache_bytes)
        pool += [t.candidate(i) for i in pick_diverse(t, order, 4 * k_periodic, per_family=2)]
    if method == "auto":
        pool += _combos(session, tables, target * margin, max_cache_bytes, 4 * k_periodic)
    reachable = bool(pool)
    if not pool:  # nothing predicted to reach the target: the fastest plans in budget, best proxy among them
        fits = [(t, np.nonzero(t.nbytes <= max_cache_bytes)[0] if max_cache_bytes is not None
                 else np.arange(len(t))) for t in tables]
        fits = [(t, idx) for t, idx in fits if len(idx)]
        budget = f" within max_cache_bytes={max_cache_bytes}" if max_cache_bytes is not None else ""
        if not fits:
            notes["unreachable"] = f"no {method} plan fits{budget}"
        else:
            best_speed = max(float(t.speedup[idx].max()) for t, idx in fits)
            notes["unreachable"] = (f"no {method} plan{budget} is predicted to reach x{target:g} "
                                    f"(fastest predicted: x{best_speed:.2f})")
            for t, idx in fits:
                close = idx[t.speedup[idx] >= 0.97 * best_speed]
                close = close[np.argsort(t.proxy[close])]
                pool += [t.candidate(i) for i in pick_diverse(t, close, k_periodic, per_family=2)]
        log.warning(notes["unreachable"])
    if not pool:
        counts = {k: v - counts0[k] for k, v in session.counts().items()}
        result = SearchResult("ours", method, target, None, [], counts["full_runs"], counts["timing_runs"],
                              counts["reference_runs"], time.perf_counter() - t0, False, accept,
                              session.clock_name, notes, _screened_arrays(tables, None, max_cache_bytes))
        _common_notes(session, result)
        return result
    pool.sort(key=lambda c: c.proxy)
    # Measured re-ranking: the proxy only proposes. New full runs (plans an earlier search of this session
    # ran are free) go to (1) the proxy's short list, the simple all-blocks periodic plan of every forecast
    # order interleaved after its first plan, (2) the other forecast orders of the best measured plan, (3)
    # refinement, only with runs left and a proxy gain larger than the proxy's measured error.
    spend = _Spender(session, max_full_runs)
    known = _known_plans(session, method, target * margin, max_cache_bytes)
    proxy_list = [_exact(session, c) for c in _with_late_start(pool[:k_periodic], tables, target * margin,
                                                               max_cache_bytes, n)]
    simple = _simple_plans(session, tables, target * margin, max_cache_bytes) if reachable else []
    notes["late_start_slot"] = next((c.label for c in proxy_list if c.source == "late-start"), None)
    late = [c for c in proxy_list if c.source == "late-start"]
    rest = [c for c in proxy_list if c.source != "late-start"]
    first = rest[:1] + simple + late + rest[1:]
    reserve = min(2, max(max_full_runs - 4, 0)) if len(first) > 1 else 0
    short = spend.run(first, max_full_runs - reserve, f"ours {method} x{target:g}", progress)
    measured = _unique(known + short)
    notes["reused_plans"] = [c.label for c in known]
    notes["simple_plans"] = [c.label for c in simple]

    periodic_ok = [c for c in measured if c.predicted_speedup >= target * 0.999] or measured
    best_periodic = min(periodic_ok, key=lambda c: c.mse)
    # the other forecast orders of the best measured plans, best first (a plan whose twins were all
    # measured already passes its turn to the next one)
    twins = [t for c in sorted(periodic_ok, key=lambda c: c.mse)
             for t in _forecast_siblings(session, c, target * margin, max_cache_bytes)]
    siblings = spend.run([t for t in _unique(twins) if t.key not in {c.key for c in measured}], max_full_runs,
                         "forecast order", progress)
    if siblings:
        notes["forecast_siblings"] = {"of": best_periodic.label, "plans": [c.label for c in siblings]}
        measured = _unique(measured + siblings)
        periodic_ok = [c for c in measured if c.predicted_speedup >= target * 0.999] or measured
        best_periodic = min(periodic_ok, key=lambda c: c.mse)
    fit = _fit(measured)

    refined: List[Candidate] = []
    if (refine and refine_runs and spend.left() and best_periodic.parts and best_periodic.parts[0].method == DIT
            and len(best_periodic.parts) == 1 and not best_periodic.extra):
        proposed = _refine(session, best_periodic, tables[0], refine_runs)
        needed = refine_gain_needed(fit)
        worth = [c for c in proposed if c.proxy <= needed * best_periodic.proxy]
        notes["refine"] = {"from": best_periodic.label, "proposed": [(c.label, c.proxy) for c in proposed],
                           "proxy_factor_needed": needed, "plans": [c.label for c in worth]}
        refined = spend.run(worth, min(spend.used + refine_runs, max_full_runs), "refine", progress)
        fit = _fit(measured + refined)

    finalists = [best_periodic]
    ok_refined = [c for c in refined if c.predicted_speedup >= min(target, best_periodic.predicted_speedup) * 0.999]
    best_refined = min(ok_refined, key=lambda c: c.mse) if ok_refined else None
    if best_refined is not None and best_refined.mse < best_periodic.mse:
        finalists.append(best_refined)
    else:
        best_refined = None
    best = _finalize(session, finalists, target, accept, measured + refined, repeats, progress)
    baselines: List[Candidate] = []
    if method == "auto":
        best, baselines = _baselines(session, best, target, accept, repeats, adastep_thresholds, run_fn_steps,
                                     progress, notes)
    choice = choice_margin(best, measured + refined + baselines, target) if best is not None else None
    if choice is not None:
        notes["choice"] = choice
        if not choice["separated"]:
            log.warning("x%g: the tuning batch (%d samples) does not tell the chosen plan %s from %s (paired "
                        "per-sample log-MSE t = %s, > -2): another batch may prefer the other; tune on more "
                        "samples (docs/search.md: 8-16)", target, choice["samples"], best.label,
                        choice["runner_up"], "-" if choice["t"] is None else f"{choice['t']:.1f}")
    if best_refined is not None and best_refined.timed_speedup is not None:
        notes["refine"].update({
            "best_periodic": {"label": best_periodic.label, "mse": best_periodic.mse,
                              "timed_speedup": best_periodic.timed_speedup,
                              "predicted_speedup": best_periodic.predicted_speedup},
            "best_refined": {"label": best_refined.label, "mse": best_refined.mse,
                             "timed_speedup": best_refined.timed_speedup,
                             "predicted_speedup": best_refined.predicted_speedup},
            "refined_beats_periodic": bool(best_refined.mse < best_periodic.mse
                                           and best_refined.timed_speedup >= accept * target),
        })

    evaluated = _unique(measured + refined + baselines)
    for c in evaluated:
        mse_hat = _predict_mse(fit, c.proxy)
        c.predicted_mse = float(mse_hat) if mse_hat is not None else None
    notes["proxy_fit"] = fit
    rows = _top_rows(tables, target, max_cache_bytes, top_rows, fit, exclude={c.key for c in evaluated})
    counts = {k: v - counts0[k] for k, v in session.counts().items()}
    result = SearchResult(
        "ours", method, target, best, evaluated + rows, counts["full_runs"], counts["timing_runs"],
        counts["reference_runs"], time.perf_counter() - t0,
        bool(best is not None and best.timed_speedup is not None and best.timed_speedup >= accept * target),
        accept, session.clock_name, notes, _screened_arrays(tables, fit, max_cache_bytes),
        plans_evaluated=len({c.key for c in evaluated}))
    result.notes["target_predicted_reachable"] = reachable
    _common_notes(session, result)
    return result


class _Spender:
    """Full runs of one search: at most ``limit`` new generations; plans the session already ran are free."""

    def __init__(self, session: SearchSession, limit: int):
        self.session, self.limit, self.used = session, limit, 0

    def left(self) -> int:
        return max(self.limit - self.used, 0)

    def run(self, cands: Sequence[Candidate], upto: int, desc: str, progress: bool) -> List[Candidate]:
        """Evaluate ``cands`` in order while new runs stay within ``upto`` (in all, this search); skip the rest."""
        out: List[Candidate] = []
        bar = _progress(len(cands), desc, progress)
        for c in _unique(cands):
            new = not self.session.has_run(c)
            if new and self.used >= min(upto, self.limit):
                continue
            self.session.evaluate(c)
            self.used += int(new)
            out.append(c)
            bar.update(1)
            bar.set_postfix_str(f"mse={c.mse:.3g}")
        bar.close()
        return out


def _unique(cands: Iterable[Candidate]) -> List[Candidate]:
    seen, out = set(), []
    for c in cands:
        if c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


def _known_plans(session: SearchSession, method: str, target: float, max_cache_bytes: Optional[int]) -> List[Candidate]:
    """Cache plans this session already ran (an earlier search, another target) predicted to reach ``target``:
    measured quality at no cost. Fresh candidates (copies), so this result's timing and notes are its own."""
    out = []
    for done in session.evaluated_plans():
        if done.extra or done.sampler_steps is not None or not done.parts or done.source.startswith("mindie"):
            continue  # MindIE's own candidates stay MindIE's: strategies are compared on their own runs
        if method != "auto" and any(p.method != method for p in done.parts):
            continue
        if math.isnan(done.predicted_speedup) or done.predicted_speedup < target * 0.999:
            continue
        if max_cache_bytes is not None and done.cache_bytes > max_cache_bytes:
            continue
        c = Candidate(done.parts, done.steps_count, done.seq, done.predicted_speedup, done.proxy,
                      cache_bytes=done.cache_bytes, source=done.source)
        out.append(session.evaluate(c))  # copies the measured values, no run
    return out


def _simple_plans(session: SearchSession, tables: List[ScreenTable], target: float,
                  max_cache_bytes: Optional[int]) -> List[Candidate]:
    """Per table and forecast order, the all-blocks periodic plan starting at step >= 1 with the best proxy
    *for that order* among those predicted to reach ``target``: the hand-written plans (all blocks, start 1, interval 3, linear)
    that beat proxy-chosen ones on trained models, and the forecast the proxy would not have chosen."""
    out: List[Candidate] = []
    B = session.seq.total
    for t in tables:
        if (0, B) not in t.ranges or not len(t):
            continue
        idx = np.nonzero((t.rng == t.ranges.index((0, B))) & (t.speedup >= target))[0]
        # start >= 1: step 1, the noisiest read, reading step 0's refresh is where the proxy's warm-up
        # damping is most optimistic (the start-0 plan stays in reach of the proxy's own short list)
        late = idx[np.array([t.schedules[t.sch[i]].step_start >= 1 for i in idx], dtype=bool)]
        idx = late if len(late) else idx
        if not len(idx):
            continue
        pbf = t.proxy_by_forecast if t.proxy_by_forecast is not None and len(t.proxy_by_forecast) else t.proxy[None]
        for k, f in enumerate(t.forecasts[:len(pbf)]):
            j = int(idx[np.lexsort((-t.speedup[idx], pbf[k, idx]))[0]])
            part = effective_forecast(session, dataclasses.replace(t.part(j), forecast=f))
            c = Candidate((part,), session.steps_count, session.seq, source="simple")
            c.proxy = float(pbf[k, j])
            _exact(session, c)
            if max_cache_bytes is None or c.cache_bytes <= max_cache_bytes:
                out.append(c)
    return _unique(out)


def effective_forecast(session: SearchSession, part: Part) -> Part:
    """``part`` with the lowest forecast order that runs the same plan.

    A read extrapolates through at most as many refreshes as its history holds (a denoiser that takes
    over starts with none), so an order above what any read can use changes nothing but the memory:
    running it in full would measure the plain plan again.
    """
    order = FORECASTS[part.forecast]
    if order == 1:
        return part
    acts = schedule_actions(part.method, part.schedule, session.steps_count, session.segments)
    reads = np.array([a is Action.READ for a in acts])
    writes = np.array([[a is Action.WRITE for a in acts]])
    held = (refresh_history(writes, order, session.segments)[0] >= 0).sum(1)
    usable = max(int(held[reads].max()) if reads.any() else 1, 1)
    if usable >= order:
        return part
    return dataclasses.replace(part, forecast=next(f for f, k in FORECASTS.items() if k == usable))


def _forecast_siblings(session: SearchSession, cand: Candidate, target: float,
                       max_cache_bytes: Optional[int]) -> List[Candidate]:
    """``cand`` with each other forecast order (same range and schedule: same speed, more memory)."""
    if len(cand.parts) != 1 or cand.extra or cand.sampler_steps is not None:
        return []
    out = []
    own = effective_forecast(session, cand.parts[0])
    for f in session.proxy.forecasts():
        part = effective_forecast(session, dataclasses.replace(cand.parts[0], forecast=f))
        if part == own:
            continue
        c = Candidate((part,), cand.steps_count, cand.seq, source="forecast")
        _exact(session, c)
        if c.predicted_speedup >= min(target, cand.predicted_speedup) * 0.999 and (
                max_cache_bytes is None or c.cache_bytes <= max_cache_bytes):
            out.append(c)
    return sorted(_unique(out), key=lambda c: c.proxy)


REFINE_MIN_GAIN = 0.5  # a refined plan is run only if its proxy is below this x the periodic plan's ...
REFINE_ERROR_SIGMAS = 2.0  # ... or below exp(-2 rms log error of the proxy fit), whichever is lower


def refine_gain_needed(fit: Optional[Dict[str, float]]) -> float:
    """Proxy ratio (refined / periodic) a refined plan must reach to be worth a full run.

    The refinement only moves READ steps under the same cost, so it pays off only when the proxy
    gain exceeds the proxy's own error on this model: ``exp(-2 * rms_log_error)`` of the fit on the
    measured plans (at least a halving); without a fit with >= 3 plans, a halving.
    """
    need = REFINE_MIN_GAIN
    if fit is not None and fit.get("n", 0) >= 3 and fit.get("rms_log_error") is not None:
        need = min(need, math.exp(-REFINE_ERROR_SIGMAS * fit["rms_log_error"]))
    return need


LATE_START = 0.15  # of the steps: MindIE's warm-up (s0 = 5 of 28) and its attention search's lower bound


def _with_late_start(short: List[Candidate], tables: List[ScreenTable], target: float,
                     max_cache_bytes: Optional[int], n: int) -> List[Candidate]:
    """The short list, its last slot given to the best-proxy plan that computes the first ~15 % of the
    steps, when no plan in it does (and it has at least 3 slots).

    The proxy damps errors of the first steps (a trained model corrects them later); on a model where
    that does not hold, a short list of early-start plans alone never finds out. One slot of the
    same budget measures the other regime, and the refinement starts from whichever wins.
    """
    late = max(1, math.ceil(LATE_START * n))
    if len(short) < 3 or any(min(p.schedule.step_start for p in c.parts) >= late for c in short):
        return short
    best = None
    for t in tables:
        for i in t.order(target, max_cache_bytes):
            if t.part(int(i)).schedule.step_start >= late:
                if best is None or t.proxy[i] < best.proxy:
                    best = t.candidate(int(i), source="late-start")
                break
    return short if best is None else short[:-1] + [best]


def choice_margin(best: Candidate, measured: Sequence[Candidate], target: float,
                  separated_t: float = -2.0) -> Optional[Dict[str, Any]]:
    """How clearly the tuning batch prefers ``best`` to the next-best measured plan predicted to reach
    ``target``: per sample, the log of the ratio of the two plans' MSE (paired: the same samples and
    noise); ``t`` is its mean over its standard error. ``separated``: ``t <= separated_t``, ``best`` is better
    on the batch beyond its sample-to-sample spread. None without a rival or per-sample errors (a batch of
    one). Tuned on 4 samples, the x2 choice on tiny-flux-deep lost 3.5 dB to a rival on a held-out batch,
    a choice 8 samples got right (docs/search.md, held-out check)."""
    mine = best.notes.get("sample_mse")
    rivals = [c for c in measured if c.key != best.key and c.mse is not None and c.notes.get("sample_mse")
              and c.predicted_speedup is not None and c.predicted_speedup >= target * 0.999]
    if not mine or len(mine) < 2 or not rivals:
        return None
    runner = min(rivals, key=lambda c: c.mse)
    theirs = runner.notes["sample_mse"]
    if len(theirs) != len(mine):
        return None
    d = np.log(np.maximum(mine, 1e-30)) - np.log(np.maximum(theirs, 1e-30))
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    mean = float(d.mean())
    t = mean / se if se > 0 else None  # None: every sample differs by the same ratio
    return {"runner_up": runner.label, "samples": len(d), "mean_log_mse_ratio": mean, "t": t,
            "separated": bool(t <= separated_t) if t is not None else mean < 0}


def _meets(c: Candidate, target: float, accept: float) -> bool:
    return c.speedup is not None and c.speedup >= accept * target


def _baselines(session: SearchSession, best: Optional[Candidate], target: float, accept: float, repeats: int,
               thresholds: Sequence[float], run_fn_steps, progress: bool, notes: Dict[str, Any]):
    """``method="auto"``: AdaStep (runtime whole-model skips) and fewer sampler steps, each run in full.

    AdaStep rows that reach the target in their full run are timed like the finalists; the
    lowest-MSE plan meeting the target wins. Fewer steps (``fewer_steps_for(target, N)``, needs
    ``run_fn_steps(transformer, steps)``) wins only if nothing else meets the target with a lower
    MSE; otherwise it is reported as the baseline (``notes["fewer_steps"]``).
    """
    from ..timestep import fewer_steps_for
    n = session.steps_count
    rows: List[Candidate] = []
    ada = [Candidate((), n, session.seq, source="adastep",
                     extra=(CacheConfig(method="adastep", steps_count=n, threshold=float(th)),))
           for th in thresholds]
    for c in ada:
        try:
            session.evaluate(c)
            rows.append(c)
        except Exception as err:  # an AdaStep plan the runtime refuses is reported, not fatal
            log.warning("adastep threshold %s failed: %s", c.extra[0].threshold, err)
            notes.setdefault("adastep_errors", []).append(f"{c.label}: {err}")
    fast = [c for c in rows if c.measured_speedup is not None and c.measured_speedup >= accept * target]
    if fast:
        session.time(fast, repeats=repeats)
    fewer = None
    k = fewer_steps_for(target, n)
    if run_fn_steps is not None and k < n:
        fewer = Candidate((), n, session.seq, source="fewer_steps", sampler_steps=k)
        fewer = session.evaluate_steps(fewer, run_fn_steps)
        if fewer.measured_speedup is not None and fewer.measured_speedup >= accept * target:
            # it could win: accepted on interleaved medians like every plan, never on its single run
            session.time([fewer], repeats=repeats)
        rows.append(fewer)
    pool = ([best] if best is not None else []) + rows
    ok = [c for c in pool if _meets(c, target, accept) and c.mse is not None]
    if ok:
        best = min(ok, key=lambda c: c.mse)  # fewer steps only when nothing meeting the target is better
    if fewer is not None:
        notes["fewer_steps"] = {"label": fewer.label, "steps": fewer.sampler_steps, "mse": fewer.mse,
                                "psnr": fewer.psnr, "measured_speedup": fewer.measured_speedup,
                                "timed_speedup": fewer.timed_speedup, "is_best": best is fewer}
    notes["adastep"] = [{"label": c.label, "threshold": c.extra[0].threshold, "mse": c.mse,
                         "measured_speedup": c.measured_speedup, "timed_speedup": c.timed_speedup}
                        for c in rows if c.extra]
    return best, rows


def _refine(session: SearchSession, base: Candidate, table: ScreenTable, k: int) -> List[Candidate]:
    """Hill-climb the READ steps of ``base``'s range from the best periodic starts; k best new plans."""
    px, n = session.proxy, session.steps_count
    part = base.parts[0]
    matrix = px.dit_matrix(part.start, part.end)
    w = px.weights()
    base_reads = actions_to_reads(schedule_actions(DIT, part.schedule, n))
    target_reads = int(base_reads.sum())
    # starts: the base plan, and the best-proxy periodic schedules of this range with as many reads
    starts = [base_reads]
    ri = table.ranges.index((part.start, part.end)) if (part.start, part.end) in table.ranges else None
    if ri is not None:
        idx = np.nonzero(table.rng == ri)[0]
        idx = idx[np.argsort(table.proxy[idx])]
        for i in idx:
            reads = actions_to_reads(table.actions[table.sch[i]])
            if int(reads.sum()) == target_reads:
                starts.append(reads)
            if len(starts) >= 4:
                break
    found: Dict[tuple, float] = {}
    base_key = tuple(base_reads)
    for s in starts:
        reads, score = hill_climb(matrix, w, s)
        key = tuple(reads)
        if key != base_key and math.isfinite(score):
            found[key] = min(score, found.get(key, math.inf))
    out = []
    for key, score in sorted(found.items(), key=lambda kv: kv[1])[:k]:
        sched = reads_to_schedule(np.array(key))
        c = Candidate((Part(DIT, part.start, part.end, sched, forecast=part.forecast),), n, session.seq,
                      source="refine")
        # hill climbing scores plain reuse; a forecasting plan is rescored with its forecast
        c.proxy = score if part.forecast == "none" else proxy_of(session, c)
        _exact(session, c)
        c.notes["periodic_proxy"] = base.proxy
        out.append(c)
    return out


def _combos(session: SearchSession, tables: List[ScreenTable], target: float, max_cache_bytes: Optional[int],
            k: int) -> List[Candidate]:
    """DiT plans below the target completed by an attention cache on the blocks the DiT range leaves out."""
    dit = next((t for t in tables if t.method == DIT), None)
    att = next((t for t in tables if t.method == ATTN), None)
    if dit is None or att is None or not len(dit) or not len(att):
        return []
    cm = session.cost
    B = session.seq.total
    # DiT bases: the best proxy per predicted-speedup bin below the target
    bins = np.floor(dit.speedup / 0.05)
    bases = []
    for b in np.unique(bins[(dit.speedup < target) & (dit.speedup >= 1.1)]):
        idx = np.nonzero(bins == b)[0]
        bases.append(int(idx[np.argmin(dit.proxy[idx])]))
    plain = cm.plain_seconds()
    out: List[Candidate] = []
    for i in bases:
        a, b = dit.ranges[dit.rng[i]]
        comp = [(lo, hi) for lo, hi in ((0, a), (b, B)) if hi > lo]
        for lo, hi in comp:
            if (lo, hi) not in att.ranges:
                continue
            ri = att.ranges.index((lo, hi))
            idx = np.nonzero(att.rng == ri)[0]
            # seconds of both = DiT plan + what the attention plan saves over an all-compute run
            base_sec = cm.calls * (cm.t_graph + cm.t_outside)
            combined = dit.seconds[i] + (att.seconds[idx] - base_sec)
            speed = plain / np.maximum(combined, 1e-12)
            ok = idx[speed >= target]
            if max_cache_bytes is not None:
                ok = ok[dit.nbytes[i] + att.nbytes[ok] <= max_cache_bytes]
            if not len(ok):
                continue
            j = ok[np.argmin(att.proxy[ok])]
            c = Candidate((dit.part(i), att.part(j)), session.steps_count, session.seq)
            c.proxy = float(dit.proxy[i] + att.proxy[j])
            c.predicted_speedup = float(plain / (dit.seconds[i] + att.seconds[j] - base_sec))
            out.append(c)
    out.sort(key=lambda c: c.proxy)
    return out[:k]


def _top_rows(tables: List[ScreenTable], target: float, max_cache_bytes, n: int, fit, exclude) -> List[Candidate]:
    rows: List[Candidate] = []
    for t in tables:
        for i in t.order(target, max_cache_bytes)[: 3 * n]:
            c = t.candidate(int(i))
            if c.key in exclude:
                continue
            mse_hat = _predict_mse(fit, c.proxy)
            c.predicted_mse = float(mse_hat) if mse_hat is not None else None
            rows.append(c)
    rows.sort(key=lambda c: c.proxy)
    return rows[:n]


def _screened_arrays(tables: List[ScreenTable], fit, max_cache_bytes) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for t in tables:
        front = t.pareto(max_cache_bytes)
        out[t.method] = {
            "count": len(t),
            "speedup": t.speedup, "proxy": t.proxy,
            "predicted_mse": _predict_mse(fit, t.proxy),
            "pareto": front,
        }
    return out


def _common_notes(session: SearchSession, result: SearchResult) -> None:
    result.notes.setdefault("cost_model", session.cost.summary())
    result.notes.setdefault("prepare_seconds", session.prepare_seconds)
    result.notes.setdefault("reference_check_mse", session.reference_check_mse)
    result.notes.setdefault("clock", session.clock_name)
    if session.segments:
        result.notes["denoisers"] = {"names": list(session.denoisers), "segments": list(session.segments)}
    result.notes["plain_seconds"] = list(session.plain_seconds)
    result.notes["plain_wall_seconds"] = list(session.plain_wall)
    cands = [c for c in result.candidates if c.evaluated]
    result.notes["predicted_vs_measured"] = [
        {"label": c.label, "predicted_speedup": c.predicted_speedup, "measured_speedup": c.measured_speedup,
         "timed_speedup": c.timed_speedup, "mse": c.mse, "psnr": c.psnr} for c in cands]


# ----------------------------------------------------------------------------- MindIE
def search_mindie(session: SearchSession, method: str, target: float, *, interval: Optional[int] = None,
                  repeats: int = 3, accept: float = 0.95, attention: Optional[str] = None,
                  progress: bool = True) -> SearchResult:
    t0 = time.perf_counter()
    counts0 = session.counts()
    session.prepare()
    n, B = session.steps_count, session.seq.total
    notes: Dict[str, Any] = {"steps_count": n, "blocks": session.seq.describe(), "B": B, "s0": mi.S0}
    evaluated: List[Candidate] = []

    def make(a: int, b: int, sched: Schedule, src: str, m: str = DIT) -> Candidate:
        c = Candidate((Part(m, a, b, sched, attention if m == ATTN else None),), n, session.seq, source=src)
        _exact(session, c)
        acts = schedule_actions(m, sched, n)
        reads = sum(a_ is Action.READ for a_ in acts)
        if m == DIT:
            c.notes["mindie_predicted_speedup"] = mi.equal_cost_speedup(B, n, reads, b - a)
        return c

    best: Optional[Candidate] = None
    if method in (DIT, "auto"):
        if interval is None:
            I, L, reachable = mi.mindie_interval(B, n, target)
        else:
            I, raw = interval, mi.mindie_lmin(B, n, target, interval)
            L, reachable = min(max(raw, 1), B - 1), 1 <= raw <= B - 1
        notes.update({"interval": I, "L_min": L, "L_min_raw": mi.mindie_lmin(B, n, target, I),
                      "reachable": reachable})
        stage1 = [make(a, b, Schedule(mi.S0, I), "mindie-stage1") for a, b in mi.stage1_windows(B, L)]
        _evaluate_all(session, stage1, f"mindie stage 1 x{target:g}", progress)
        top3 = sorted(stage1, key=lambda c: c.mse)[:3]
        starts = [c.parts[0].start for c in top3]
        seen = {c.key: c for c in stage1}
        stage2 = []
        for a, b, ss in mi.stage2_candidates(starts, B, L):
            c = make(a, b, Schedule(ss, I), "mindie-stage2")
            stage2.append(seen.get(c.key, c))
        _evaluate_all(session, [c for c in stage2 if not c.evaluated], "mindie stage 2", progress)
        evaluated += stage1 + [c for c in stage2 if c.key not in {s.key for s in stage1}]
        best = min(stage2, key=lambda c: c.mse) if stage2 else min(stage1, key=lambda c: c.mse)
        notes["stage1"] = [c.label for c in stage1]
        notes["stage1_top3_starts"] = starts
        notes["stage2"] = [c.label for c in stage2]
    if method in (ATTN, "auto"):
        specs = mi.attention_candidates(n, target)
        notes["attention_candidates"] = specs
        att = [make(0, B, Schedule(s["step_start"], s["step_interval"], s["step_end"]), "mindie-attn", ATTN)
               for s in specs]
        _evaluate_all(session, att, f"mindie attention x{target:g}", progress)
        evaluated += att
        best_att = min(att, key=lambda c: c.mse) if att else None
        if method == ATTN or best is None:
            best = best_att
        elif best_att is not None:
            # MindIE has no combined search: of its two plans, the lower-MSE one among those its
            # own estimates say reach the target.
            ok = [c for c, r in ((best, notes.get("reachable")),
                                 (best_att, any(s["reachable"] for s in specs))) if r]
            best = min(ok or [best], key=lambda c: c.mse)
    if best is not None:
        session.time([best], repeats=repeats)
    counts = {k: v - counts0[k] for k, v in session.counts().items()}
    result = SearchResult(
        "mindie", method, target, best, evaluated, counts["full_runs"], counts["timing_runs"],
        counts["reference_runs"], time.perf_counter() - t0,
        bool(best is not None and best.timed_speedup is not None and best.timed_speedup >= accept * target),
        accept, session.clock_name, notes, plans_evaluated=len({c.key for c in evaluated}))
    _common_notes(session, result)
    return result


def _check_session_arguments(session: SearchSession, **given: Any) -> None:
    """A session fixes what its reference run was made with: an argument of ``search`` that says otherwise
    would be silently ignored, so it is an error (leave it out, or make a new SearchSession)."""
    defaults = {"steps_count": None, "blocks": None, "clock": "auto", "backend": None, "backend_options": None}
    own = {"run_fn": session.run_fn, "steps_count": session.steps_count, "blocks": session.blocks,
           "clock": session.clock_kind, "backend": session.backend, "backend_options": session.backend_options}
    for name, value in given.items():
        if name != "run_fn" and value == defaults[name]:
            continue
        same = value is own[name] if name == "run_fn" else value == own[name]
        if not same:
            raise ValueError(f"search(session=...): {name}={value!r} differs from the session's {own[name]!r}; "
                             f"the session's reference run was made with its own {name}: leave {name} out, or "
                             f"build a SearchSession(..., {name}=...) for it")


def score_plan(session: SearchSession, configs, *, measure: bool = False, repeats: int = 3) -> Dict[str, Any]:
    """What the search knows of any plan, written by hand or not, on ``session``'s model and reference run.

    Returns ``predicted_speedup`` (the cost model over the plan's per-step decisions), ``proxy`` (the
    search's error proxy, comparable across plans of this session), ``cache_bytes`` and ``reuse_steps``.
    With ``measure=True`` also one full generation (``mse`` / ``psnr`` vs the uncached reference) and
    ``timed_speedup``: the median of ``repeats`` interleaved rounds of the uncached model and the plan
    (``session.clock``). Configs written for another step count are scaled to the session's
    (:meth:`CacheConfig.scaled`), as a generation of that length would run them.

    Example::

        >>> session = SearchSession(model, run_fn).prepare()                                   # doctest: +SKIP
        >>> score_plan(session, [CacheConfig(steps_count=28, step_start=1, step_interval=3,
        ...                                  forecast="linear")], measure=True)                # doctest: +SKIP
    """
    session.prepare()
    n = session.steps_count
    plan = [c.scaled(n) if c.steps_count is not None and c.steps_count != n else c
            for c in session.cost.resolve(config_list(configs, "score_plan"))]
    cache = [c for c in plan if c.method != "adastep"]
    if not cache:
        raise ValueError("score_plan: the plan has no block or attention cache to score")
    px, seq = session.proxy, session.seq
    proxy = 0.0
    for c in cache:
        if c.bypass:
            continue
        a, b = seq.index(c.blocks, c.block_start), seq.index(c.blocks, c.block_end - 1) + 1
        acts = segment_actions(config_actions(c), session.segments)
        if c.forecast != "none":
            reads = np.array([[x is Action.READ for x in acts]])
            writes = np.array([[x is Action.WRITE for x in acts]])
            proxy += float(px.score_forecast(c.method, a, b, reads, writes, c.forecast)[0])
        else:
            proxy += px.score(px.dit_matrix(a, b) if c.method == DIT else px.attention_matrix(a, b), acts)
    pred = session.cost.predict(cache)
    out: Dict[str, Any] = {"configs": plan, "predicted_speedup": pred["predicted_speedup"], "proxy": proxy,
                           "cache_bytes": session.cost.cache_bytes(cache), "reuse_steps": pred["reuse_steps"]}
    if measure:
        opt = session.optimized(plan)
        with torch.no_grad():
            result = as_tensor(session.run_fn(opt))
        out["mse"], out["psnr"] = mse_fn(result, session.reference), psnr_fn(result, session.reference)
        times = time_calls({"uncached": lambda: session.run_fn(session.given), "plan": lambda: session.run_fn(opt)},
                           repeats=repeats, warmup=0, clock=session.clock)
        out["timed_speedup"] = times["uncached"] / max(times["plan"], 1e-12)
    return out


# ----------------------------------------------------------------------------- public entry
def search(model, run_fn: Callable[[Any], Any], method: str = "dit_block_cache", target_speedup: float = 2.0,
           max_cache_bytes: Optional[int] = None, steps_count: Optional[int] = None, strategy: str = "ours", *,
           session: Optional[SearchSession] = None, max_full_runs: int = 8, refine: bool = True,
           repeats: int = 3, accept: float = 0.95, intervals: Iterable[int] = range(2, 7),
           attention: Optional[str] = None, blocks: Optional[Sequence[str]] = None,
           mindie_interval: Optional[int] = None, progress: bool = True, clock: str = "auto",
           backend=None, backend_options: Optional[Dict[str, Any]] = None, margin: float = 1.0,
           run_fn_steps: Optional[Callable[[Any, int], Any]] = None,
           adastep_thresholds: Sequence[float] = (0.015, 0.05)) -> SearchResult:
    """Search a cache plan for ``model`` that reaches ``target_speedup`` with the least error.

    Args:
        model: the DiT (e.g. ``pipe.transformer``); never modified. Denoisers that split the steps of
            a generation (Wan 2.2: ``{"transformer": pipe.transformer, "transformer_2":
            pipe.transformer_2}``) are searched together for one plan (see :class:`SearchSession`).
        run_fn: ``run_fn(transformer) -> output``: one full, deterministic generation (same seed
            every call) with the given transformer (the plain model or an optimized one); a dict of
            them, by name, when ``model`` is a dict.
        method: ``"dit_block_cache"``, ``"attention_cache"`` or ``"auto"`` (both, and DiT plans
            completed by an attention cache on the other blocks).
        target_speedup: wanted speedup of the whole generation over the uncached model.
        max_cache_bytes: cache memory budget per cache context; plans over it are never run.
        steps_count: denoising steps per generation (default: counted in the reference run).
        strategy: ``"ours"`` (cost model + proxy, few full runs) or ``"mindie"`` (the baseline).
        session: a :class:`SearchSession` to share the reference and capture between searches.
        max_full_runs: full generations ours may spend on candidates (refinement included).
        refine: also try non-uniform refresh steps (``CacheConfig(refresh_steps=...)``).
        repeats: interleaved timing rounds for finalists; ``accept``: a plan "meets" the target
            when its measured speedup is at least ``accept * target_speedup``.
        intervals: periodic refresh intervals screened (ours).
        margin: ours short-lists plans predicted to reach ``margin * target_speedup`` (headroom for
            timing noise; 1.0 by default).
        mindie_interval: MindIE's refresh interval (default: the smallest that can reach the target).
        clock: ``"auto"`` | ``"cpu"`` | ``"wall"`` (see :class:`SearchSession`).
        run_fn_steps: ``run_fn_steps(transformer, steps) -> output`` (same seed, ``steps`` sampler
            steps); with ``method="auto"`` the fewer-steps baseline (``fewer_steps_for(target, N)``)
            is run in full and reported (it wins only if nothing else meets the target with a lower MSE).
        adastep_thresholds: ``method="auto"`` also runs AdaStep with these thresholds in full.

    Returns:
        :class:`SearchResult`; ``result.config`` is the plan (list of CacheConfig).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if strategy not in ("ours", "mindie"):
        raise ValueError(f"strategy must be 'ours' or 'mindie', got {strategy!r}")
    if not target_speedup > 1.0:
        raise ValueError(f"target_speedup must be > 1, got {target_speedup!r}")
    for name, value in (("max_full_runs", max_full_runs), ("repeats", repeats)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if session is None:
        session = SearchSession(model, run_fn, steps_count=steps_count, blocks=blocks, attention=attention,
                                progress=progress, clock=clock, backend=backend, backend_options=backend_options)
    elif session.given is not model:
        raise ValueError("session= belongs to another model")
    else:
        _check_session_arguments(session, run_fn=run_fn, steps_count=steps_count, blocks=blocks, clock=clock,
                                 backend=backend, backend_options=backend_options)
    if strategy == "mindie":
        return search_mindie(session, method, target_speedup, interval=mindie_interval, repeats=repeats,
                             accept=accept, attention=attention, progress=progress)
    return search_ours(session, method, target_speedup, max_cache_bytes=max_cache_bytes,
                       max_full_runs=max_full_runs, refine=refine, repeats=repeats, accept=accept,
                       intervals=intervals, attention=attention, progress=progress, margin=margin,
                       adastep_thresholds=adastep_thresholds, run_fn_steps=run_fn_steps)
