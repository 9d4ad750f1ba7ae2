#!/usr/bin/env python
"""List which aten ops torchair (GE graph mode) can convert, from torch_npu's sources.

torchair lowers every FX node of the AOT forward graph through a per-op "GE
converter".  Converters live in the torch_npu wheel under

    torch_npu/dynamo/torchair/_ge_concrete_graph/ge_converter/

and are registered with ``@register_fx_node_ge_converter(torch.ops.aten.xxx.overload)``.
Many registered converters are stubs whose body only raises, e.g.::

    raise NotImplementedError("torch.ops.aten.index_put.default ge_converter is not implemented!")
    raise RuntimeError("torch.ops.aten.xxx.out ge_converter is not supported!")
    raise RuntimeError("torch.ops.aten.xxx.out is redundant before pytorch 2.1.0, ...")

In GE mode (``max-autotune``) an op with no converter, or whose converter
raises, makes the whole compile fail.

This script downloads the wheel (``pip download --no-deps``) unless ``--wheel``
is given, reads the converter files straight out of the zip, PARSES them with
``ast`` (nothing from the wheel is imported or executed) and writes::

    {"torch_npu_version": ..., "source": ..., "implemented": [...],
     "unimplemented": [...], "notes": {...}, "counts": {...}}

Heuristic ("implemented" or not), applied to the body of the decorated
function with its docstring and bare ``pass``/``...`` statements removed:

* NOT implemented when every control-flow path of the body ends in ``raise``
  and the body contains no ``return`` (outside nested functions).  This catches
  the one-line stubs and also stubs that first validate arguments and then
  raise unconditionally.
* implemented otherwise -- including converters that raise only for some
  inputs/dtypes (``if complex: raise NotImplementedError(...)``): those work in
  the common case and are counted as implemented.

Registration semantics reproduced from ``fx2ge_converter.py``:
``Converter.__call__`` stores the converter as ``op._ge_converter``, so a later
registration of the same overload overrides an earlier one.  Files are taken in
torchair's import order (``ge_converter/__init__.py``: prim, higher_order,
quantized, rngprims, c10d_functional, builtin_converters, then every module of
prims/ and aten/ in ``pkgutil.iter_modules`` (sorted) order; custom/ is
imported lazily by ``_get_converter``).  ``lite/`` (only in lite export mode),
``experimental/`` (hcom collectives, imported by torchair's distributed patches)
and ``mkldnn/`` are not imported by the converter package, so their
registrations are reported separately and not counted.

Only the ``aten`` namespace goes into implemented/unimplemented (that is what a
functionalized AOT graph contains besides our own custom ops); the other
namespaces are counted in ``counts``.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter, OrderedDict

CONVERTER_DIR = "torch_npu/dynamo/torchair/_ge_concrete_graph/ge_converter/"
DECORATOR = "register_fx_node_ge_converter"

# Import order of ge_converter/__init__.py (torch_npu 2.14.0).
_EAGER_PACKAGES = ["prim", "higher_order", "quantized", "rngprims", "c10d_functional"]
_EAGER_MODULES = ["builtin_converters"]
_ITER_PACKAGES = ["prims", "aten"]
_LAZY_PACKAGES = ["custom"]  # imported by fx2ge_converter._get_converter on a miss
_NOT_IMPORTED = ["lite", "experimental", "mkldnn"]

GETATTR_MARK = "?"  # prefix of names registered through getattr(packet, "overload", None)

GELU_NOTE = (
    "torchair's aten.gelu.default converter ignores the `approximate` argument and always "
    "emits GE Gelu (the tanh approximation). A graph calling gelu(approximate='none') "
    "(exact erf GELU) compiles but computes the tanh form; use npu_cache_fx.opcheck.gelu_erf_nodes "
    "to find such nodes."
)


# --------------------------------------------------------------------------- wheel
def download_wheel(version: str, dest: str) -> str:
    """``pip download --no-deps`` the linux x86_64 cp311 torch-npu wheel into *dest*.

    torch-npu 2.14.0 ships ``torch_npu-2.14.0-cp311-cp311-manylinux_2_28_x86_64.whl``
    (what a plain ``pip download`` picks on this machine); the platform/ABI flags make
    the choice independent of the host, older releases used manylinux2014/2_17 tags.
    The converter sources are pure Python and identical across platform wheels."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
        "--platform", "manylinux2014_x86_64", "--python-version", "3.11",
        "--implementation", "cp", "--abi", "cp311",
        f"torch-npu=={version}", "-d", dest,
    ]
    subprocess.run(cmd, check=True)
    wheels = sorted(glob.glob(os.path.join(dest, f"torch_npu-{version}-*.whl")))
    if not wheels:
        raise SystemExit(f"pip download produced no torch_npu-{version} wheel in {dest}")
    return wheels[0]


def wheel_version(zf: zipfile.ZipFile, fallback: str | None) -> str:
    for name in zf.namelist():
        if re.match(r"torch_npu-[^/]+\.dist-info/METADATA$", name):
            for line in zf.read(name).decode("utf-8", "replace").splitlines():
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    return fallback or "unknown"


# --------------------------------------------------------------------------- ast helpers
def dotted(node: ast.AST) -> str | None:
    """``torch.ops.aten.add.Tensor`` -> "torch.ops.aten.add.Tensor"; None if not a dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def op_name(expr: ast.AST) -> str | None:
    """Name of a registered target in "aten.add.Tensor" style (``torch.ops.`` stripped).

    ``getattr(torch.ops.aten.mean, "names_dim", None)`` (88 registrations in 2.14.0, all
    named-tensor overloads) gives "aten.mean.names_dim"; when the overload does not exist
    torchair registers nothing (``register_fx_node_ge_converter(None)``)."""
    if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "getattr"
            and len(expr.args) >= 2 and isinstance(expr.args[1], ast.Constant)):
        base = op_name(expr.args[0])
        return None if base is None else f"{GETATTR_MARK}{base}.{expr.args[1].value}"
    name = dotted(expr)
    if name is None:
        return None
    if name.startswith("torch.ops."):
        # "torch.ops.aten.sym_size" is an OpOverloadPacket (kept as "aten.sym_size"): the
        # converter is set as an attribute of the packet object, which FX nodes (targeting
        # OpOverloads such as aten.sym_size.int) never look up.  Higher-order ops
        # ("torch.ops.higher_order.run_with_rng_state") have no overload either.
        name = name[len("torch.ops."):]
    return name


def decorator_target(dec: ast.AST) -> ast.AST | None:
    if isinstance(dec, ast.Call) and (dotted(dec.func) or "").split(".")[-1] == DECORATOR and dec.args:
        return dec.args[0]
    return None


def _strip(body):
    out = []
    for i, stmt in enumerate(body):
        if i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                and isinstance(stmt.value.value, str):
            continue  # docstring
        if isinstance(stmt, ast.Pass):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis:
            continue
        out.append(stmt)
    return out


def always_raises(stmts) -> bool:
    """True when every path through *stmts* ends in ``raise``."""
    for stmt in stmts:
        if isinstance(stmt, ast.Raise):
            return True
        if isinstance(stmt, ast.Return):
            return False
        if isinstance(stmt, ast.If) and always_raises(stmt.body) and always_raises(stmt.orelse):
            return True
    return False


def has_return(stmts) -> bool:
    class V(ast.NodeVisitor):
        found = False

        def visit_Return(self, node):
            self.found = True

        def visit_FunctionDef(self, node):  # nested defs do not count
            pass

        visit_AsyncFunctionDef = visit_FunctionDef
        visit_Lambda = visit_FunctionDef

    v = V()
    for s in stmts:
        v.visit(s)
    return v.found


def raise_message(stmts) -> str:
    for node in stmts:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Raise) and sub.exc is not None:
                exc = sub.exc
                kind = dotted(exc.func) if isinstance(exc, ast.Call) else dotted(exc)
                msg = ""
                if isinstance(exc, ast.Call) and exc.args:
                    try:
                        msg = ast.unparse(exc.args[0])
                    except Exception:  # pragma: no cover
                        msg = ""
                return f"{kind}: {msg}"[:200]
    return ""


def classify(func: ast.FunctionDef) -> tuple[bool, str]:
    """(implemented, reason)."""
    body = _strip(func.body)
    if not body:
        return False, "empty body"
    if always_raises(body) and not has_return(body):
        return False, raise_message(body)
    return True, ""


def registrations(tree: ast.Module):
    """Yield (target_name, FunctionDef, lineno) in source order, for decorators at any
    nesting level (torchair wraps some in ``if op is not None:``) and for the call form
    ``register_fx_node_ge_converter(op)(fn)``."""
    funcs = {}
    events = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            funcs.setdefault(node.name, node)
            # decorators apply bottom-up, all at def time: same line for ordering
            for dec in node.decorator_list:
                tgt = decorator_target(dec)
                if tgt is not None:
                    events.append((node.lineno, op_name(tgt), node))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Call):
            tgt = decorator_target(node.func)
            if tgt is not None and node.args and isinstance(node.args[0], ast.Name):
                fn = funcs.get(node.args[0].id)
                if fn is not None:
                    events.append((node.lineno, op_name(tgt), fn))
    events.sort(key=lambda e: e[0])
    for lineno, name, fn in events:
        if name is not None:
            yield name, fn, lineno


# --------------------------------------------------------------------------- scan
def ordered_files(names):
    """Converter files of the wheel, in torchair's import order."""
    pyfiles = sorted(n for n in names if n.startswith(CONVERTER_DIR) and n.endswith(".py"))

    def pkg_modules(pkg):
        prefix = CONVERTER_DIR + pkg + "/"
        init = prefix + "__init__.py"
        mods = sorted(n for n in pyfiles if n.startswith(prefix) and n.count("/") == prefix.count("/")
                      and n != init)
        return ([init] if init in pyfiles else []) + mods

    imported, lazy, skipped = [], [], []
    for pkg in _EAGER_PACKAGES:
        imported += pkg_modules(pkg)
    for mod in _EAGER_MODULES:
        if CONVERTER_DIR + mod + ".py" in pyfiles:
            imported.append(CONVERTER_DIR + mod + ".py")
    for pkg in _ITER_PACKAGES:
        imported += pkg_modules(pkg)
    for pkg in _LAZY_PACKAGES:
        lazy += pkg_modules(pkg)
    seen = set(imported) | set(lazy)
    for n in pyfiles:
        if n not in seen:
            skipped.append(n)
    return imported, lazy, skipped


def scan(zf: zipfile.ZipFile):
    imported, lazy, skipped = ordered_files(zf.namelist())
    table = OrderedDict()  # op -> (implemented, reason, file)
    overridden = []
    for path in imported + lazy:
        tree = ast.parse(zf.read(path).decode("utf-8"), filename=path)
        for name, fn, lineno in registrations(tree):
            impl, reason = classify(fn)
            rel = path[len(CONVERTER_DIR):]
            if name in table and path in lazy:
                continue  # lazy package only fills misses (fx2ge_converter._get_converter)
            if name in table and table[name][0] != impl:
                overridden.append(f"{name}: {table[name][2]} ({table[name][0]}) -> {rel}:{lineno} ({impl})")
            table[name] = (impl, reason, f"{rel}:{lineno}")
    not_imported = []
    for path in skipped:
        tree = ast.parse(zf.read(path).decode("utf-8"), filename=path)
        for name, fn, lineno in registrations(tree):
            not_imported.append(f"{name} ({path[len(CONVERTER_DIR):]}:{lineno})")
    return table, overridden, not_imported


def unresolvable(names):
    """Names that the locally installed torch (if any) does not know.  torchair's
    try_import_submodule() swallows the AttributeError such a name raises at import, which
    drops that registration and every later one in the same file."""
    try:
        import torch
    except Exception:  # pragma: no cover - torch not installed
        return "torch not importable here: not checked"
    missing = []
    for n in names:
        obj = torch.ops
        try:
            for part in n.split("."):
                obj = getattr(obj, part)
        except Exception:
            missing.append(n)
    return {"torch_version": torch.__version__, "missing": missing}


def build(wheel: str, version_hint: str | None, source: str) -> dict:
    with zipfile.ZipFile(wheel) as zf:
        version = wheel_version(zf, version_hint)
        table, overridden, not_imported = scan(zf)
    conditional = {k[len(GETATTR_MARK):]: v for k, v in table.items() if k.startswith(GETATTR_MARK)}
    table = OrderedDict((k, v) for k, v in table.items() if not k.startswith(GETATTR_MARK))
    ns = Counter(name.split(".", 1)[0] for name in table)
    # OpOverloads only; OpOverloadPacket registrations ("aten.sym_size") are listed apart.
    packets = sorted(k for k in table if k.startswith("aten.") and k.count(".") == 1)
    aten = {k: v for k, v in table.items() if k.startswith("aten.") and k.count(".") >= 2}
    implemented = sorted(k for k, v in aten.items() if v[0])
    unimplemented = sorted(k for k, v in aten.items() if not v[0])
    reasons = Counter(re.sub(r"torch\.ops\.[\w.]+", "OP", v[1]).split(":")[0] + ": "
                      + re.sub(r"torch\.ops\.[\w.]+", "OP", v[1]).split(":", 1)[-1][:70]
                      for v in aten.values() if not v[0])
    return {
        "torch_npu_version": version,
        "source": source,
        "converter_dir": CONVERTER_DIR,
        "heuristic": "unimplemented = converter body (minus docstring) raises on every path and has no return",
        "counts": {
            "registered_all_namespaces": len(table),
            "registered_by_namespace": dict(sorted(ns.items())),
            "registered_aten": len(aten) + len(packets),
            "registered_aten_overloads": len(aten),
            "registered_aten_packets": len(packets),
            "implemented_aten": len(implemented),
            "unimplemented_aten": len(unimplemented),
            "implemented_other": sum(1 for k, v in table.items() if v[0] and not k.startswith("aten.")),
        },
        "notes": {
            "aten.gelu.default": GELU_NOTE,
            "aten_packet_registrations": (
                "converters registered on OpOverloadPackets (set as packet._ge_converter); FX nodes "
                "target OpOverloads, so these are not in implemented/unimplemented: "
                + ", ".join(f"{p} ({'implemented' if table[p][0] else 'stub'})" for p in packets)),
            "unresolvable_in_local_torch": unresolvable(list(aten)),
            "conditional_registrations": {
                "what": "registered via getattr(torch.ops.aten.X, 'overload', None): a no-op when the "
                        "overload does not exist; not counted above (named-tensor overloads, never in "
                        "AOT graphs)",
                "implemented": sorted(k for k, v in conditional.items() if v[0]),
                "unimplemented_count": sum(1 for v in conditional.values() if not v[0]),
                "unresolvable_in_local_torch": unresolvable(sorted(conditional)),
            },
            "overridden_registrations": overridden,
            "registrations_outside_converter_package": {
                "what": "files not imported by ge_converter/__init__.py: experimental/ (hcom patches, "
                        "imported by torchair's distributed patching), lite/ (lite export mode only), "
                        "mkldnn/; not counted above",
                "names": not_imported,
            },
            "unimplemented_reasons": dict(reasons.most_common()),
        },
        "implemented": implemented,
        "unimplemented": unimplemented,
        "implemented_other_namespaces": sorted(k for k, v in table.items()
                                               if v[0] and not k.startswith("aten.")),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--wheel", help="path to a torch_npu-*.whl (otherwise it is downloaded)")
    g.add_argument("--version", default="2.14.0", help="torch-npu version to download (default %(default)s)")
    ap.add_argument("--out", default="npu_cache_fx/data/torchair_ge_ops.json", help="output JSON path")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the unimplemented-reason histogram")
    args = ap.parse_args(argv)

    if args.wheel:
        wheel, source = args.wheel, os.path.basename(args.wheel)
        data = build(wheel, None, source)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            wheel = download_wheel(args.version, tmp)
            data = build(wheel, args.version, os.path.basename(wheel))

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    c = data["counts"]
    print(f"torch_npu {data['torch_npu_version']}: {c['registered_all_namespaces']} converters registered "
          f"({c['registered_by_namespace']}); aten: {c['registered_aten']} registered "
          f"({c['registered_aten_packets']} on packets), {c['implemented_aten']} overloads implemented, {c['unimplemented_aten']} not -> {args.out}")
    if args.verbose:
        for k, v in data["notes"]["unimplemented_reasons"].items():
            print(f"{v:5d}  {k}")
        for line in data["notes"]["overridden_registrations"]:
            print("override:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
