"""The package's shape, as docs/architecture.md maps it: the library in folders, one layer each; a module
imports only from its own folder or from folders of lower layers (lazy imports inside functions
included); no import loops between modules; no private names across modules; the top-level modules are
the commands and nothing in the library imports them; no library code finds files through the checkout."""
import ast
import functools
import gc
import re

from conftest import REPO

PKG = REPO / "biomedlm_jax"
ENTRY = "(entry points)"  # the table's name for the top-level command modules


@functools.lru_cache(maxsize=1)
def modules() -> dict:
    """{dotted module name without the package prefix ('' for biomedlm_jax/__init__.py): parsed file}."""
    out = {}
    # With the garbage collector off while parsing: a finalizer run by a collection inside ast.parse
    # can parse too (on Python 3.11 a logged traceback does, e.g. an asyncio task's "exception was never
    # retrieved" left by an earlier test in this process), and CPython 3.11.7 then fails the outer parse
    # with "SystemError: AST constructor recursion depth mismatch".
    gc.collect()
    gc.disable()
    try:
        for f in sorted(PKG.rglob("*.py")):
            parts = f.relative_to(PKG).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = ast.parse(f.read_text(encoding="utf-8"))
    finally:
        gc.enable()
    return out


def imports(tree, mods) -> set:
    """The package modules a file imports, wherever the import statement is (a package's name counts as
    its __init__)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("biomedlm_jax"):
            base = node.module.removeprefix("biomedlm_jax").lstrip(".")
            for a in node.names:  # `from biomedlm_jax.pkg import module` imports a module, else a name
                sub = f"{base}.{a.name}" if base else a.name
                found.add(sub if sub in mods else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("biomedlm_jax.") for a in node.names if a.name.startswith("biomedlm_jax.")}
    return found


def table() -> dict:
    """{folder or ENTRY: layer} from the folder table in docs/architecture.md."""
    out = {}
    for line in (REPO / "docs" / "architecture.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| (\d) \| (`\w+/`|\(entry points\)) \|", line)
        if m:
            out[m.group(2).strip("`/")] = int(m.group(1))
    return out


def folder(module: str) -> str:
    return module.split(".")[0] if "." in module or (PKG / module).is_dir() else ENTRY


def test_every_folder_has_a_layer_and_a_docstring_that_says_what_it_may_import():
    layers = table()
    folders = sorted(p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders and not set(folders) ^ (set(layers) - {ENTRY}), (folders, layers)
    for f in folders:
        doc = ast.get_docstring(modules()[f]) or ""
        assert f"Layer {layers[f]}, {f}:" in doc and "Imports:" in doc, f"biomedlm_jax/{f}/__init__.py: {doc[:80]!r}"


def test_imports_go_to_the_own_folder_or_lower_layers_and_no_library_module_imports_a_command():
    mods, layers = modules(), table()
    assert layers[ENTRY] == max(layers.values())
    bad = []
    for m, tree in mods.items():
        if not m:
            continue
        for d in sorted(imports(tree, mods)):
            fm, fd = folder(m), folder(d)
            if fd == ENTRY and d != m:
                bad.append(f"{m} imports the command module {d}")
            elif fd != fm and layers[fd] >= layers[fm]:
                bad.append(f"{m} ({fm}/, layer {layers[fm]}) imports {d} ({fd}/, layer {layers[fd]})")
    assert not bad, bad


def test_top_level_modules_are_commands():
    """Each top-level module is a command (`python -m biomedlm_jax.NAME`) with a main() or a __main__ block."""
    mods = modules()
    for m, tree in mods.items():
        if m and folder(m) == ENTRY:
            src = ast.unparse(tree)
            assert "__name__ == '__main__'" in src or "def main(" in src, f"biomedlm_jax/{m}.py is not a command"
            assert not any(isinstance(n, ast.ClassDef) for n in tree.body), f"biomedlm_jax/{m}.py defines a class"


def test_no_module_imports_one_that_imports_it_back():
    mods = modules()
    graph = {m: {d for d in imports(tree, mods) if d in mods and d != m} for m, tree in mods.items()}
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
    mods = modules()
    used = []
    for m, tree in mods.items():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("biomedlm_jax"):
                base = node.module.removeprefix("biomedlm_jax").lstrip(".")
                for a in node.names:
                    sub = f"{base}.{a.name}" if base else a.name
                    if sub in mods:
                        aliases[a.asname or a.name] = sub
                    elif a.name.startswith("_"):
                        used.append(f"{m}: from {node.module} import {a.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                used.append(f"{m}: {aliases[node.value.id]}.{node.attr}")
    assert not used, used


def test_the_checks_see_lazy_imports_and_loops():
    """The rules above are not vacuous: a lazy upward import and a loop in a made-up package are found."""
    fake = {"core.errors": ast.parse("def f():\n    from biomedlm_jax.training import trainer\n"),
            "training.trainer": ast.parse("from biomedlm_jax.core import errors\n")}
    assert imports(fake["core.errors"], fake) == {"training.trainer"}
    assert imports(fake["training.trainer"], fake) == {"core.errors"}
    layers = table()
    assert layers["training"] > layers["core"]


def test_library_code_does_not_locate_the_source_checkout():
    """Configs and sample data come in as arguments: the package must work outside an editable install."""
    bad = []
    for f in PKG.rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        if re.search(r"dirname\(\s*os\.path\.dirname\(\s*os\.path\.abspath\(__file__\)", text) or "parents[1]" in text:
            bad.append(str(f.relative_to(REPO)))
    assert not bad, bad
