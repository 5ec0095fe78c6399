"""The package's shape: imports flow one way (cli → demo → recipes → parts → models, store → kernels), no cycles,
nothing but the entry point imports the CLI, and every file and function stays readable (files under 400
lines, functions under 60 without their docstrings).

`LAYERS` below is the one picture of the package; README.md's `## Layout` section draws the same list
(checked here).
Imports are read from the source (every `import` statement, inside functions too), not from what happens
to be loaded at run time.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lower layers never import higher ones; a module may import its own layer when that makes no cycle
# (a subpackage's modules are placed one by one where they differ from their package)
LAYERS = [
    {"errors", "config", "kernels", "distributed"},
    {"store", "training.losses", "training.progress"},
    {"models", "data", "training.logprobs", "training.batching"},
    {"sampling.engine", "sampling.stops", "sampling.vllm_backend", "tasks", "training.checkpoint",
     "training.parallel", "training.reference"},
    {"sampling", "training", "evaluate", "judge", "mbr", "plot"},
    {"recipes"},
    {"demo"},
    {"cli", "__main__"},
]


def modules() -> dict[str, Path]:
    """Dotted module name → file, with kernels/ installed as lite_selftrain.kernels."""
    found = {}
    for folder, package in ((ROOT / "lite_selftrain", "lite_selftrain"), (ROOT / "kernels", "lite_selftrain.kernels")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports (relative imports resolved; `from . import x` names module x)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module itself
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer(name: str) -> int:
    """The layer of the longest listed prefix of `name` (`training.losses` before `training`)."""
    parts = name.split(".")[1:]
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        for i, members in enumerate(LAYERS):
            if key in members:
                return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_imports_flow_down_the_layers():
    wrong = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
             for a, targets in graph().items() if a != "lite_selftrain"
             for b in targets if b != "lite_selftrain" and layer(b) > layer(a)]
    assert not wrong, wrong


def test_nothing_imports_the_cli_but_the_entry_point():
    users = sorted(a for a, targets in graph().items() if "lite_selftrain.cli" in targets)
    assert users == ["lite_selftrain.__main__"]
    for folder in ("tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            assert "lite_selftrain.cli" not in path.read_text() or path.name == "test_layout.py", path


def test_no_import_cycles():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError(" → ".join(trail[trail.index(nxt):] + [node, nxt]) if nxt in trail
                                     else f"{node} → {nxt}")
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_the_checks_see_real_edges():
    edges = graph()
    assert "lite_selftrain.sampling.engine" in edges["lite_selftrain.sampling.generate"]  # in a function
    assert "lite_selftrain.kernels" in edges["lite_selftrain.training.logprobs"]
    assert "lite_selftrain.training.trainer" in edges["lite_selftrain.training"]
    assert "lite_selftrain.recipes.common" in edges["lite_selftrain.recipes.rest_em"]


def readme_layers() -> list[set[str]]:
    """The layers README.md's `## Layout` picture draws, bottom first: a line's names before its `#`, an
    indented line continuing the line above."""
    block = (ROOT / "README.md").read_text().split("\n## Layout\n", 1)[1].split("```")[1]
    drawn: list[set[str]] = []
    for line in block.splitlines():
        names = set(line.split("#")[0].split())
        if names:
            if line.startswith(" ") and drawn:
                drawn[-1] |= names
            else:
                drawn.append(names)
    return drawn[::-1]


def test_the_readme_draws_these_layers():
    assert readme_layers() == LAYERS


def test_files_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def function_lengths(path: Path) -> dict[str, int]:
    """'file:function' → its lines, the docstring not counted: the longest of that name (methods of several
    classes share one); nested functions count in their own right."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if ast.get_docstring(node, clean=False) is not None:
                lines -= node.body[0].end_lineno - node.body[0].lineno + 1
            key = f"{path.relative_to(ROOT)}:{node.name}"
            out[key] = max(out.get(key, 0), lines)
    return out


def test_functions_fit_on_a_screen():
    long = {name: n for p in modules().values() for name, n in function_lengths(p).items() if n > 60}
    assert not long, long


def test_the_length_check_counts_lines():
    lengths = function_lengths(ROOT / "lite_selftrain" / "training" / "trainer.py")
    assert 30 < lengths["lite_selftrain/training/trainer.py:train"] <= 60
    assert lengths["lite_selftrain/training/trainer.py:lr_factor"] == 7  # 8 lines, one of them the docstring
