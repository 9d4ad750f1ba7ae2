"""Forward patterns of every DiT in the coverage set, derived from the captured graph.

    python scripts/forward_patterns.py [--out docs/forward_patterns.md] [MODEL ...]

For each model of ``tests/coverage_models.py`` and each of its block lists:
capture the model (``npu_cache_fx.capture.capture``), take a one-block region
of every block (``block_region``) and report what the block carries:

* streams: the block inputs its outputs continue (``Region.streams``; roles
  are the block's parameter names from ``Capture.signatures``);
* return order: where each stream sits in the block's return value (the
  export's module-call signature, ``Capture.meta["block_outputs"]``), e.g.
  ``(encoder, hidden)``; ``None`` entries are returned constants, ``=x`` an
  input handed back unchanged;
* side inputs: how many other graph values the block reads (temb, rotary
  embeddings, masks, the context of cross-attention, long skips, ...).

Blocks of one list that differ (SD3's last block, HunyuanDiT's skip blocks)
get one row per pattern.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from npu_cache_fx.capture import _ALIASING, Capture, block_region, capture, walk_back  # noqa: E402
from npu_cache_fx.config import ConfigError  # noqa: E402

SHORT = {"hidden_states": "hidden", "encoder_hidden_states": "encoder"}


def short(role: str) -> str:
    return SHORT.get(role, role)


def cache_dit_pattern(takes_encoder: bool, ret: List[str]) -> str:
    """cache-dit's ForwardPattern naming, from what the block takes and the order it returns."""
    ret = [r for r in ret if r not in ("None",)]
    if ret == ["hidden", "encoder"]:
        return "Pattern_0" if takes_encoder else "Pattern_4"
    if ret == ["encoder", "hidden"]:
        return "Pattern_1" if takes_encoder else "Pattern_5"
    if ret == ["hidden"]:
        return "Pattern_2" if takes_encoder else "Pattern_3"
    return "-"


def _root(node):
    """Follow no-op casts (export's rebinding of ``x.float()``) back to the value they alias."""
    while node.op == "call_function" and node.target in _ALIASING and node.args and hasattr(node.args[0], "meta"):
        a, b = node.meta.get("val"), node.args[0].meta.get("val")
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype):
            break
        node = node.args[0]
    return node


def block_pattern(cap: Capture, fqn: str, i: int) -> Dict[str, object]:
    sig = cap.signatures.get(f"{fqn}.{i}", {})
    try:
        region = block_region(cap, fqn, i, i + 1)
    except ConfigError as err:
        return {"error": str(err).split(":", 1)[-1].strip()[:160]}
    nodes = cap.nodes()
    role_of = lambda name: short(sig.get(name) or sig.get(_root(nodes[name]).name) or name)  # noqa: E731
    by_output = {s.output: s for s in region.streams}
    inputs = frozenset([s.input for s in region.streams] + list(region.side_inputs))
    returns = cap.meta.get("block_outputs", {}).get(f"{fqn}.{i}")
    order: List[str] = []
    streams = [role_of(s.input) for s in region.streams]
    dropped: List[str] = []
    dropped_inputs = set()
    for name in returns or [s.output for s in region.streams]:
        if name is None:
            order.append("None")
        elif name in by_output:
            order.append(role_of(by_output[name].input))
        elif name in inputs:
            order.append(f"={role_of(name)}")  # an input handed back unchanged
        else:  # computed, but nothing after the block reads it (the last block's other stream)
            src = walk_back(nodes[name], None, region.nodes, inputs)
            role = role_of(src.name) if src is not None else "?"
            order.append(role)
            streams.append(role)
            dropped.append(role)
            if src is not None:
                dropped_inputs.add(src.name)
    takes_encoder = "encoder_hidden_states" in sig.values()
    carried = {_root(nodes[s.input]).name for s in region.streams} | {_root(nodes[n]).name for n in dropped_inputs}
    side: Dict[str, Optional[str]] = {}  # distinct side values (by the value a cast aliases) -> parameter name
    for n in region.side_inputs:
        root = _root(nodes[n]).name
        if root not in carried and n not in dropped_inputs:
            name = sig.get(n) or sig.get(root)
            side[root] = side.get(root) or (short(name) if name else None)
    named = [v for v in side.values() if v]
    streams = sorted(streams, key=lambda r: (r != "hidden", r))
    return {
        "streams": ", ".join(streams),
        "returns": order[0] if len(order) == 1 else f"({', '.join(order)})",
        "single_dual": "dual" if len(streams) > 1 else "single",
        "side": len(side),
        "side_named": ", ".join(dict.fromkeys(named)),
        "pattern": cache_dit_pattern(takes_encoder, order),
        "dropped": ", ".join(dropped),
    }


def ranges(idx: List[int]) -> str:
    out, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def model_rows(name: str) -> Tuple[List[Dict[str, object]], float]:
    from coverage_models import MODELS
    m = MODELS[name]
    model = m.build()
    lists = list(m.lists)
    try:
        with torch.no_grad():
            cap = capture(model, m.inputs(1.0, seed=0), lists)
    except Exception as err:  # noqa: BLE001 -- reported in the table
        return [{"model": name, "cls": m.cls, "list": "-", "error": f"capture fails: {type(err).__name__}: "
                 f"{str(err).splitlines()[0][:100]}"}], 0.0
    rows = []
    for fqn in lists:
        block = model.get_submodule(fqn)
        groups: Dict[Tuple, List[int]] = {}
        pats, notes = {}, {}
        for i in range(len(block)):
            p = block_pattern(cap, fqn, i)
            key = tuple(sorted((k, str(v)) for k, v in p.items() if k not in ("dropped", "side")))
            groups.setdefault(key, []).append(i)
            pats.setdefault(key, p)
            if p.get("dropped"):
                notes.setdefault(key, []).append(f"block {i}: its {p['dropped']} output is unused by the model")
        for key, idx in groups.items():
            rows.append({"model": name, "cls": m.cls, "list": fqn, "block_class": type(block[0]).__name__,
                         "count": len(block), "blocks": ranges(idx), **pats[key], "notes": "; ".join(notes.get(key, []))})
    return rows, cap.seconds


def markdown(rows: List[Dict[str, object]]) -> str:
    head = ["model", "block list", "block class", "#blocks", "blocks", "streams", "stream kind",
            "returns", "cache-dit", "side inputs", "side inputs (named)", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r and "streams" not in r:
            cells = [f"{r['model']} (`{r['cls']}`)", f"`{r['list']}`", r.get("block_class", "-"),
                     str(r.get("count", "-")), r.get("blocks", "-"), "-", "-", "-", "-", "-", "-",
                     f"**{r['error']}**"]
        else:
            cells = [f"{r['model']} (`{r['cls']}`)", f"`{r['list']}`", f"`{r['block_class']}`", str(r["count"]),
                     r["blocks"], r["streams"], r["single_dual"], f"`{r['returns']}`", r["pattern"], str(r["side"]),
                     r["side_named"] or "-", r.get("notes") or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


HEADER = """# Forward patterns of the DiT block lists

Generated by `python scripts/forward_patterns.py` from the captured graph of
each tiny model in `tests/coverage_models.py` (diffusers {diffusers}, torch
{torch}); do not edit by hand.

* **streams**: the block inputs that its outputs continue along a residual
  path (`Region.streams` of a one-block `block_region`; names are the block's
  parameter names from `Capture.signatures`: `hidden` = `hidden_states`,
  `encoder` = `encoder_hidden_states`). **dual**: two streams (the DiT cache
  records one delta per stream); **single**: one.
* **returns**: the block's return value in order, from the export's module
  call signature (`Capture.meta["block_outputs"]`). `None`: a constant `None`
  (SD3's last block, `context_pre_only`); `=encoder`: an input handed back
  unchanged. This is the `output_order` a by-hand `CacheAgent` needs
  (`encoder_first` when `encoder` comes first).
* **cache-dit**: the equivalent cache-dit `ForwardPattern`: Pattern_0 takes
  `(hidden, encoder)` and returns `(hidden, encoder)`; Pattern_1 returns
  `(encoder, hidden)`; Pattern_2 takes both and returns `hidden`; Pattern_3
  takes and returns `hidden` only (no `encoder_hidden_states` parameter);
  Pattern_4 / Pattern_5 take no encoder but return `(hidden, encoder)` /
  `(encoder, hidden)`.
* **side inputs**: other values the block reads (count of distinct values;
  named where the block signature names them: temb, rotary embeddings,
  masks, the cross-attention context, long skips). A cross-attention
  context (`encoder` as a side input, not a stream) is read, not carried.
  Rotary embeddings and other tuple arguments are counted but not named.
* **notes**: the last block of a list often returns a stream nothing reads
  afterwards (Flux's single blocks return `(encoder, hidden)`, the model
  keeps `hidden`): a range ending there carries one stream fewer.
* **blocks**: blocks of the list with this pattern (lists whose blocks differ
  get one row each).

"""


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model names of tests/coverage_models.py (default: all)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "forward_patterns.md"),
                        help="Markdown file to write ('' to only print)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import logging
    logging.disable(logging.WARNING)
    import warnings
    warnings.filterwarnings("ignore")
    import diffusers
    from coverage_models import MODELS
    rows: List[Dict[str, object]] = []
    for name in args.models or list(MODELS):
        t0 = time.perf_counter()
        r, secs = model_rows(name)
        rows += r
        print(f"{name}: {len(r)} row(s), capture {secs:.1f}s, total {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    text = HEADER.format(diffusers=diffusers.__version__, torch=torch.__version__.split("+")[0]) + markdown(rows) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
