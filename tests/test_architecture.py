"""The package's shape, as docs/architecture.md states it: every module in one layer, imports only
downward or sideways, no import loops (top-level or inside functions), no private names across
modules, and no library code that finds files through the source checkout."""
import ast
import gc
import re

from conftest import REPO

PKG = REPO / "biomedlm_jax"


def modules() -> dict:
    """{module name (without the package prefix): parsed file}."""
    out = {}
    # With the garbage collector off while parsing: a finalizer run by a collection inside ast.parse
    # can parse too (on Python 3.11 a logged traceback does, e.g. an asyncio task's "exception was never
    # retrieved" left by an earlier test in this process), and CPython 3.11.7 then fails the outer parse
    # with "SystemError: AST constructor recursion depth mismatch".
    gc.collect()
    gc.disable()
    try:
        for f in sorted(PKG.rglob("*.py")):
            name = ".".join(f.relative_to(PKG).with_suffix("").parts)
            out[name.removesuffix(".__init__") if name != "__init__" else ""] = ast.parse(f.read_text(encoding="utf-8"))
    finally:
        gc.enable()
    return out


def imports(tree) -> set:
    """The package modules a file imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "biomedlm_jax":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("biomedlm_jax."):
            found.add(node.module.removeprefix("biomedlm_jax."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("biomedlm_jax.") for a in node.names if a.name.startswith("biomedlm_jax.")}
    return found


def layers() -> dict:
    """{module: layer number} from the table in docs/architecture.md."""
    out = {}
    for line in (REPO / "docs" / "architecture.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| (\d) [^|]+ \| ([^|]+) \|", line)
        if m:
            for name in re.findall(r"`([\w.]+)`", m.group(2)):
                out[name] = int(m.group(1))
    return out


def top(name: str) -> str:
    return name.split(".")[0]


def test_every_module_has_a_layer_and_imports_only_downward():
    mods, table = modules(), layers()
    missing = sorted({top(m) for m in mods if m} - set(table))
    assert not missing, f"add these modules to the table in docs/architecture.md: {missing}"
    upward = [f"{m} (layer {table[top(m)]}) imports {d} (layer {table[top(d)]})"
              for m, tree in mods.items() if m for d in sorted(imports(tree))
              if top(d) != top(m) and table[top(d)] > table[top(m)]]
    assert not upward, upward


def test_no_module_imports_one_that_imports_it_back():
    graph = {top(m): set() for m in modules() if m}
    for m, tree in modules().items():
        if m:
            graph[top(m)] |= {top(d) for d in imports(tree)} - {top(m)}
    state, loops = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                loops.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not loops, loops


def test_no_private_names_across_modules():
    ours = {top(m) for m in modules() if m}
    used = []
    for m, tree in modules().items():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "biomedlm_jax":
                aliases |= {a.asname or a.name: a.name for a in node.names if a.name in ours}
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("biomedlm_jax"):
                used += [f"{m}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                used.append(f"{m}: {aliases[node.value.id]}.{node.attr}")
    assert not used, used


def test_library_code_does_not_locate_the_source_checkout():
    """Configs and sample data come in as arguments: the package must work outside an editable install."""
    bad = []
    for f in PKG.rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        if re.search(r"dirname\(\s*os\.path\.dirname\(\s*os\.path\.abspath\(__file__\)", text) or "parents[1]" in text:
            bad.append(str(f.relative_to(REPO)))
    assert not bad, bad
