"""The layout stays readable: a file's path is its import path, imports point one way between the
folders (errors/patterns/models → methods → pipeline → oneshot → commands; exporters and runtime
below the commands), no import circles, every import at the top of its file (except the optional
heavy backends), one gateway to torch.distributed, the CLI free of library decisions, the entry
points narrow, every study runnable with --help."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

from thanos_deploy import compress_model, oneshot, prepare, recover

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "thanos_deploy"
LAZY = {"onnxruntime", "tensorrt", "datasets", "lm_eval", "llama_cpp"}  # optional extras, imported where they are needed

# The folders and top-level modules of the package, lowest first: a unit may import its own layer
# or a lower one, never a higher one, and two units never import each other.
LAYERS = [
    {"errors"},
    {"patterns", "models", "targets", "hub", "austen", "data", "tasks", "progress", "plots", "llamacpp_build"},
    {"methods", "compact", "width"},
    {"artifact", "staging", "loading", "request", "inspection", "measure", "evaluate"},
    {"pipeline"},
    {"oneshot"},
    {"runtime"},
    {"exporters"},
    {"recovery", "compare", "scores", "bench", "console", "cli", "__main__", "__init__"},
]


def modules() -> dict[str, Path]:
    """Module name -> file, for every module the wheel ships (its path under the repository is its import path)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports at module level, with the packages whose __init__ runs
    (but not its own parent packages: Python has started those before `name`, whatever it imports)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in tree.body:
        nodes = [node] + (node.body + node.handlers[0].body if isinstance(node, ast.Try) else [])
        for n in nodes:
            if isinstance(n, ast.Import):
                targets |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - n.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets |= {f"{base}.{a.name}" for a in n.names}
    edges = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            prefix = ".".join(parts[:i])
            if prefix in known and prefix != name and not name.startswith(prefix + "."):
                edges.add(prefix)
    return edges


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def unit(module: str) -> str:
    """The folder or top-level module a module belongs to ('thanos_deploy' itself is '__init__')."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk, as the circle it closes."""
    state: dict[str, int] = {}
    found = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(" → ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def wrong_directions(graph: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    """Imports from a unit to a higher layer, and pairs of units that import each other."""
    rank = {u: i for i, layer in enumerate(layers) for u in layer}
    arrows = {(unit(a), unit(b)) for a, targets in graph.items() for b in targets if unit(a) != unit(b)}
    upward = [f"{a} → {b} (layer {rank[a]} imports layer {rank[b]})" for a, b in sorted(arrows) if rank[a] < rank[b]]
    both = [f"{a} ↔ {b}" for a, b in sorted(arrows) if (b, a) in arrows and a < b]
    return upward + both


def test_the_checks_find_circles_and_reverse_arrows():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a → b → c → a"]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    layers = [{"low"}, {"mid", "side"}, {"top"}]
    fine = {"p.top.x": {"p.mid.y"}, "p.mid.y": {"p.low"}, "p.side": {"p.mid.y"}}
    assert wrong_directions(fine, layers) == []
    assert wrong_directions({**fine, "p.low": {"p.top.x"}}, layers) == ["low → top (layer 0 imports layer 2)"]
    assert wrong_directions({**fine, "p.mid.y": {"p.side"}}, layers) == ["mid ↔ side"]


def test_every_unit_has_a_layer():
    units = {unit(m) for m in modules()}
    placed = set().union(*LAYERS)
    assert units - placed == set(), f"place these in LAYERS: {sorted(units - placed)}"
    assert placed - units == set(), f"no such folder or module: {sorted(placed - units)}"


def test_no_import_circles():
    g = graph()
    assert len(g) > 60 and g["thanos_deploy.cli"], "the scan missed the package"
    assert not cycles(g), "import circles:\n" + "\n".join(cycles(g))


def test_imports_point_one_way_between_folders():
    assert not wrong_directions(graph(), LAYERS), "\n".join(wrong_directions(graph(), LAYERS))


def test_torch_distributed_has_one_gateway():
    """Every exchange between processes goes through pipeline/distributed.py (World)."""
    users = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.startswith(("torch.distributed", "torch.nn.parallel")) for n in names):
                users.append(name)
    assert set(users) == {"thanos_deploy.pipeline.distributed"}, users


def test_imports_are_at_the_top_except_optional_backends():
    inside = []
    for name, path in modules().items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                        if not all(n.split(".")[0] in LAZY for n in names):
                            inside.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not inside, "imports inside functions:\n" + "\n".join(inside)


def test_the_cli_only_parses_calls_and_renders():
    """The commands hold no library decisions: they never touch models, artifacts, methods' code or
    patterns directly, and never print with anything but the shared console."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert not imported & {"models", "artifact", "staging", "patterns", "pipeline.sequential", "pipeline.resume", "compact.shrink",
                           "compact.pack", "data", "targets", "width"}, imported
    assert "Table(" not in (PACKAGE / "cli.py").read_text()


def test_the_entry_points_take_a_checked_request():
    """oneshot, compress_model and recover take the request objects, not loose options."""
    for fn in (oneshot, compress_model, recover):
        assert len(inspect.signature(fn).parameters) <= 8, fn.__name__
    assert "pruning" in inspect.signature(compress_model).parameters
    assert list(inspect.signature(oneshot).parameters)[0] == "request" and list(inspect.signature(recover).parameters)[0] == "request"
    assert prepare.__module__ == "thanos_deploy.request"


RUN_HELP = """
import contextlib, io, runpy, sys
failed = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        failed.append(f"{path}: --help did not exit")
    except SystemExit as e:
        if e.code not in (0, None) or "usage" not in out.getvalue().lower():
            failed.append(f"{path}: exit {e.code}, output {out.getvalue()[:200]!r}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_study_runs_with_help():
    """Each study under bench/studies/ prints its usage (one interpreter for all of them)."""
    studies = sorted(str(p) for p in (ROOT / "bench" / "studies").glob("*.py"))
    assert len(studies) >= 10
    r = subprocess.run([sys.executable, "-c", RUN_HELP, *studies], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
