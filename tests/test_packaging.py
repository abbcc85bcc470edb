"""The package installs from its wheel: build it, install it into a fresh environment that has no
editable finder and no source tree on its path, then use it there as a user would."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def run(*command, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert r.returncode == 0, f"{command}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """(wheel, the fresh environment's python and console script, a working folder outside the repository)."""
    work = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", work / "dist", ROOT, cwd=work)
    wheel = next((work / "dist").glob("thanos_deploy-*.whl"))
    env = work / "env"
    run(sys.executable, "-m", "venv", "--without-pip", env, cwd=work)
    python = env / "bin" / "python"
    packages = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=work).stdout.strip())
    # the dependencies (torch, transformers, ...) come from this environment's site-packages as a plain
    # path entry: its .pth files, the editable finder among them, are not run
    (packages / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--quiet", wheel, cwd=work)
    return {"wheel": wheel, "python": python, "script": env / "bin" / "thanos-deploy", "work": work, "packages": packages}


def test_the_wheel_ships_every_module_of_the_source_tree(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    shipped = [*(ROOT / "thanos_deploy").rglob("*.py"), *(ROOT / "thanos_deploy" / "tasks").glob("*.yaml")]
    missing = [path.relative_to(ROOT).as_posix() for path in shipped if path.relative_to(ROOT).as_posix() not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_every_module_imports_from_the_installed_wheel(installed):
    code = ("import importlib, pkgutil, thanos_deploy, json\n"
            "names = [m.name for m in pkgutil.walk_packages(thanos_deploy.__path__, 'thanos_deploy.') if not m.name.endswith('__main__')]\n"
            "for name in names: importlib.import_module(name)\n"
            "print(json.dumps({'file': thanos_deploy.__file__, 'count': len(names)}))")
    out = json.loads(run(installed["python"], "-c", code, cwd=installed["work"]).stdout.splitlines()[-1])
    assert Path(out["file"]).is_relative_to(installed["packages"]), out
    assert out["count"] >= 40, out


def test_the_console_script_runs_version_and_inspect(installed):
    script, work = installed["script"], installed["work"]
    assert run(script, "--version", cwd=work).stdout.strip() == "thanos-deploy 0.1.0"
    folder = work / "tiny"
    tiny_model("llama").save_pretrained(folder)
    r = run(script, "inspect", folder, "--json", cwd=work)
    result = json.loads(r.stdout)
    assert result["totals"]["linears"] == 14 and result["totals"]["density"] == 1.0
    bad = subprocess.run([str(script), "inspect", str(work / "missing")], capture_output=True, text=True, cwd=work)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
