"""The layout stays readable: no import circles, every import at the top of its file (except the
optional heavy backends), the CLI free of library decisions, every study runnable with --help."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"thanos_deploy": "thanos_deploy", "exporters": "thanos_deploy.exporters", "runtime": "thanos_deploy.runtime",
            "bench": "thanos_deploy.bench"}
LAZY = {"onnxruntime", "tensorrt", "datasets"}  # optional extras, imported where they are needed


def modules() -> dict[str, Path]:
    """Module name -> file, for every module the wheel ships."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[0] == "studies":
                continue
            name = ".".join([package, *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))
            found[name] = path
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


def test_the_circle_finder_finds_circles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a → b → c → a"]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_circles():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    assert len(graph) > 40 and graph["thanos_deploy.cli"], "the scan missed the package"
    assert not cycles(graph), "import circles:\n" + "\n".join(cycles(graph))


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
    """The commands hold no library decisions: they never touch models, checkpoints, methods or
    patterns directly, and never print with anything but the shared console."""
    tree = ast.parse((ROOT / "thanos_deploy" / "cli.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert not imported & {"models", "checkpoint", "methods", "patterns", "pipeline.sequential", "pipeline.resume", "compact.shrink",
                           "compact.pack", "data", "targets"}, imported
    assert "Table(" not in (ROOT / "thanos_deploy" / "cli.py").read_text()


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
