"""llama.cpp's own converter, tools and library, from the sources that the pinned `llama-cpp-python`
source distribution on the package index carries (no maintained package ships the converter):
fetched once into the cache (its sha256 checked), the converter run from there, the C++ tools and
libllama.so built there once. exporters/gguf.py and runtime/llamacpp.py both use it.

    thanos-deploy setup llama.cpp              # fetch the sources; build llama-quantize, llama-bench, llama-perplexity, libllama.so
    thanos-deploy setup llama.cpp --no-build   # the converter only: GGUF exports in f32, f16, bf16 and q8_0

The converter (`convert_hf_to_gguf.py`) runs in this Python with llama.cpp's own `gguf-py` (the
package index's `gguf` lags behind it) and needs `sentencepiece` even for BPE tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from . import hub
from .errors import UserError

PACKAGE, VERSION = "llama-cpp-python", "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TOOLS = ("llama-quantize", "llama-bench", "llama-perplexity", "llama-completion")
LIBRARY = "libllama.so"  # llama-cpp-python loads it (LLAMA_CPP_LIB_PATH): one build serves the tools and the runtime backend
SETUP = "thanos-deploy setup llama.cpp"


def home() -> Path:
    return hub.cache_dir() / f"llama.cpp-{VERSION}"


def sources() -> Path:
    """The llama.cpp source tree (vendor/llama.cpp of the sdist), or one line naming the command that fetches it."""
    tree = home() / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        raise UserError(f"llama.cpp's converter is not here yet: run `{SETUP}` (once; it fetches the {PACKAGE} {VERSION} sources "
                        "from the package index and builds llama.cpp's tools)")
    return tree


def tool(name: str) -> Path:
    """A built llama.cpp tool, or one line naming the command that builds it."""
    path = home() / "build" / "bin" / name
    if not path.is_file():
        raise UserError(f"{name} is not built yet: run `{SETUP}` (once, about 11 minutes on 2 cores)")
    return path


def fetch() -> Path:
    """Download the sdist (its sha256 checked) and unpack its llama.cpp sources into the cache."""
    tree = home() / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    home().mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(f"https://pypi.org/simple/{PACKAGE}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        files = json.load(urllib.request.urlopen(request, timeout=60))["files"]
        url = next(f["url"] for f in files if f["filename"] == f"{PACKAGE.replace('-', '_')}-{VERSION}.tar.gz")
        with tempfile.TemporaryDirectory(dir=home()) as tmp:
            archive = Path(tmp) / "sdist.tar.gz"
            with urllib.request.urlopen(url, timeout=600) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
            if hashlib.sha256(archive.read_bytes()).hexdigest() != SHA256:
                raise UserError(f"the {PACKAGE} {VERSION} source distribution does not match its sha256: download it again")
            prefix = f"{PACKAGE.replace('-', '_')}-{VERSION}/vendor/llama.cpp/"
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
                for member in members:
                    member.name = member.name[len(prefix):]
                tar.extractall(Path(tmp) / "llama.cpp", members=[m for m in members if m.name], filter="data")
            os.replace(Path(tmp) / "llama.cpp", tree)
    except (OSError, StopIteration, KeyError, ValueError, tarfile.TarError) as e:
        raise UserError(f"cannot fetch the {PACKAGE} {VERSION} sources from the package index ({e}): check the connection and run `{SETUP}` again") from None
    return tree


def build() -> Path:
    """Build llama.cpp's CPU tools (CMake, Release, this CPU's instructions) into the cache."""
    tree = fetch()
    build = home() / "build"
    if all((build / "bin" / name).is_file() for name in (*TOOLS, LIBRARY)):
        return build / "bin"
    if not shutil.which("cmake"):
        raise UserError("building llama.cpp's tools needs cmake: install it (apt-get install cmake), then run the command again")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(tree), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                 "-DBUILD_SHARED_LIBS=ON"]
    for step in (configure, ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS, "llama"]):
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"building llama.cpp failed ({' '.join(step[:3])} …): {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return build / "bin"


def convert(folder: Path, out: Path, outtype: str) -> list[str]:
    """llama.cpp's convert_hf_to_gguf.py on a Hugging Face folder; returns its output lines."""
    script = sources() / "convert_hf_to_gguf.py"
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py, not the package index's
    done = subprocess.run([sys.executable, str(script), str(folder), "--outtype", outtype, "--outfile", str(out)], capture_output=True,
                          text=True, env=env)
    lines = (done.stdout + done.stderr).splitlines()
    if done.returncode != 0:
        cause = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
        if "sentencepiece" in cause:
            raise UserError("llama.cpp's converter needs sentencepiece: pip install sentencepiece (or 'thanos-deploy[gguf]')")
        raise UserError(f"llama.cpp's converter refused '{folder}': {cause.strip()}")
    return lines


def quantize(source: Path, out: Path, kind: str) -> list[str]:
    """llama-quantize; returns its output lines (it reports every tensor it kept at another type)."""
    done = subprocess.run([str(tool("llama-quantize")), str(source), str(out), kind, str(os.cpu_count() or 2)], capture_output=True, text=True)
    lines = (done.stdout + done.stderr).splitlines()
    if done.returncode != 0:
        raise UserError(f"llama-quantize failed to make {kind}: {lines[-1] if lines else done.returncode}")
    return lines
