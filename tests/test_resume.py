"""Long jobs: a compress killed (SIGKILL) or interrupted (Ctrl-C) in the middle resumes to the very
same bytes; two processes on one --out do not mix; --offload never holds the model in memory, and
--activations-on-disk never holds the calibration activations of every batch."""

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from thanos_deploy.pipeline import activations, offload
from thanos_deploy.request import Pruning

from .conftest import random_ids, run_cli, start_cli, tiny_model

LAYERS = 6


def save_tiny(folder: Path, *, layers: int = 2, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama folder (no tokenizer: runs use --calib-tokens)."""
    tiny_model("llama", seed=seed, num_hidden_layers=layers, **overrides).save_pretrained(folder)
    return folder


def save_ids(path: Path, n: int = 8, seqlen: int = 32, vocab: int = 256) -> Path:
    from safetensors.torch import save_file

    save_file({"input_ids": random_ids(n, seqlen, vocab)}, path)
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny 6-layer model (tied embeddings, as SmolLM2), its calibration tokens, and the uninterrupted run's output."""
    root = tmp_path_factory.mktemp("resume")
    model, ids = save_tiny(root / "model", layers=LAYERS, tie_word_embeddings=True), save_ids(root / "ids.safetensors")
    args = ["compress", str(model), "--method", "thanos", "--pattern", "2:4", "--calib-tokens", str(ids)]
    reference = root / "reference"
    r = run_cli(*args, "--out", str(reference))
    assert r.returncode == 0, r.stderr
    return args, reference


def wait_for_layers(out: Path, process: subprocess.Popen, done: int) -> None:
    progress = out.parent / f".{out.name}.partial" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run finished before it could be interrupted"
        try:
            if json.loads(progress.read_text())["done"] >= done:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError("no progress")


def assert_same_files(out: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    assert any(n.endswith(".safetensors") for n in names)
    for name in names:
        if name != "thanos_deploy.json":  # the manifest records seconds, which differ
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    ours, theirs = (json.loads((d / "thanos_deploy.json").read_text()) for d in (out, reference))
    assert ours["files"] == theirs["files"]  # the sha256 of every safetensors file
    assert [[e["sparsity"] for e in layer["linears"]] for layer in ours["layers"]] == [[e["sparsity"] for e in layer["linears"]] for layer in theirs["layers"]]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def test_sigkill_in_the_middle_then_resume_gives_the_same_bytes(job, tmp_path):
    args, reference = job
    out = tmp_path / "out"
    process = start_cli(*args, "--out", str(out))
    wait_for_layers(out, process, 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    progress = out.parent / f".{out.name}.partial" / "progress.json"
    saved = progress.read_bytes()

    again = run_cli(*args, "--out", str(out))  # without --resume: refused, saying what to do
    assert again.returncode == 2 and "add --resume to continue it, or --overwrite" in again.stderr, again.stderr
    changed = run_cli(*[a if a != "2:4" else "4:8" for a in args], "--out", str(out), "--resume")
    assert changed.returncode == 2 and len(changed.stderr.strip().splitlines()) == 1, changed.stderr
    assert "pattern (was 2:4, now 4:8)" in changed.stderr and "--overwrite" in changed.stderr
    assert progress.read_bytes() == saved  # the refused resumes kept the progress

    resumed = run_cli(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_files(out, reference)


def test_ctrl_c_prints_the_resume_command_which_gives_the_same_bytes(job, tmp_path):
    args, reference = job
    out = tmp_path / "out"
    process = start_cli(*args, "--out", str(out))
    wait_for_layers(out, process, 2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    command = next(line.strip() for line in stderr.splitlines() if line.strip().startswith("thanos-deploy compress"))
    assert command.endswith("--resume")
    resumed = run_cli(*shlex.split(command)[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_files(out, reference)


def test_a_second_process_on_the_same_out_refuses_at_once(job, tmp_path):
    args, _ = job
    out = tmp_path / "out"
    first = start_cli(*args, "--out", str(out))
    wait_for_layers(out, first, 1)
    first.send_signal(signal.SIGSTOP)  # paused (Ctrl-Z), it still holds the lock: the second run meets it for sure
    try:
        for extra in ([], ["--overwrite"]):
            second = run_cli(*args, "--out", str(out), *extra)
            assert second.returncode == 2 and f"another thanos-deploy process (pid {first.pid})" in second.stderr, second.stderr
        assert json.loads((out.parent / f".{out.name}.partial" / "progress.json").read_text())["done"] >= 1  # untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.send_signal(signal.SIGCONT)
        first.wait()


PEAK = (
    "import atexit, sys\n"
    "from thanos_deploy.cli import main\n"
    "def hwm():\n"
    "    status = open('/proc/self/status').read().split('\\n')\n"
    "    print('VmHWM', next(l.split()[1] for l in status if l.startswith('VmHWM:')), file=sys.stderr)\n"
    "atexit.register(hwm)\n"
    "sys.argv = ['thanos-deploy'] + sys.argv[1:]\n"
    "sys.exit(main())\n"
)


def peak_rss_kib(*args: str) -> int:
    """Run the CLI in a fresh process and return its peak resident memory (VmHWM)."""
    r = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return int(next(line.split()[1] for line in r.stderr.splitlines() if line.startswith("VmHWM")))


def peaks_of_runs_differing_in(tmp_path: Path, model: Path, ids: Path, *flags: str) -> list[int]:
    """Peak resident memory of Wanda 2:4 runs that differ in one flag each; their outputs must be byte-identical."""
    args = ["compress", str(model), "--method", "wanda", "--pattern", "2:4", "--calib-tokens", str(ids)]
    outs = [tmp_path / flag.lstrip("-") for flag in flags]
    peaks = [peak_rss_kib(*args, "--out", str(out), flag) for out, flag in zip(outs, flags)]
    for path in outs[0].glob("*.safetensors"):
        assert all(path.read_bytes() == (out / path.name).read_bytes() for out in outs[1:]), path.name
    return peaks


def test_offload_peak_memory_is_below_the_in_memory_run_by_the_model_size(tmp_path):
    model = save_tiny(tmp_path / "model", layers=8, hidden_size=256, intermediate_size=1024)
    ids = save_ids(tmp_path / "ids.safetensors", n=4, seqlen=64)
    size_kib = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1024
    in_memory, offloaded = peaks_of_runs_differing_in(tmp_path, model, ids, "--no-offload", "--offload")
    assert in_memory - offloaded > 0.7 * size_kib, (in_memory, offloaded, size_kib)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: run by bench/studies/gpu_checks.sh on a GPU machine")
def test_offload_on_cuda_gives_the_bytes_of_the_in_memory_cuda_run(job, tmp_path):
    """One layer at a time on the GPU, read from the shards: the same bytes as the model held in memory."""
    args, _ = job
    outs = {flag: tmp_path / flag.lstrip("-") for flag in ("--no-offload", "--offload")}
    for flag, out in outs.items():
        r = run_cli(*args, "--device", "cuda", "--out", str(out), flag)
        assert r.returncode == 0, r.stderr
    assert_same_files(outs["--offload"], outs["--no-offload"])


def test_the_sharded_output_is_the_model_pruned_in_memory(job):
    """The per-layer shards + index hold exactly what compress_model computes, tied head included."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from thanos_deploy import compress_model, load

    args, reference = job
    expected = AutoModelForCausalLM.from_pretrained(args[1])
    compress_model(expected, load_file(args[args.index("--calib-tokens") + 1])["input_ids"], Pruning("thanos", "2:4"))
    loaded, _ = load(str(reference))
    assert json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ours, theirs = loaded.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_activations_on_disk_give_the_same_bytes_with_offload_and_after_kills(job, tmp_path):
    """Four calibration batches read back one at a time from the progress folder, layers offloaded,
    killed, resumed in memory, killed again and resumed on disk: the bytes of the in-memory run, the
    activation file of the next layer kept at each kill, and no file left behind."""
    args = [*job[0], "--batch-tokens", "64"]  # 8 windows of 32 tokens: 4 batches
    reference = tmp_path / "reference"
    r = run_cli(*args, "--out", str(reference), "--activations-in-memory")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    partial = out.parent / f".{out.name}.partial"
    on_disk = [*args, "--out", str(out), "--activations-on-disk", "--offload"]
    done = 1
    for command in (on_disk, [*args, "--out", str(out), "--activations-in-memory", "--resume"]):
        process = start_cli(*command)
        wait_for_layers(out, process, done + 1)
        process.send_signal(signal.SIGKILL)
        process.wait()
        done = json.loads((partial / "progress.json").read_text())["done"]
        assert len(activations.OnDisk(partial / f"inputs-{done:05d}.safetensors", "cpu")) == 4  # kept for --resume

    resumed = run_cli(*on_disk, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_files(out, reference)


def test_activations_on_disk_peak_memory_is_below_the_in_memory_run_by_their_size(tmp_path):
    model = save_tiny(tmp_path / "model")  # hidden 64: the activations of 1024 windows outweigh the model
    ids = save_ids(tmp_path / "ids.safetensors", n=1024, seqlen=64)
    size_kib = 2 * 1024 * 64 * 64 * 4 / 1024  # into and out of a layer, float32: 32 MiB
    in_memory, on_disk = peaks_of_runs_differing_in(tmp_path, model, ids, "--activations-in-memory", "--activations-on-disk")
    assert in_memory - on_disk > 0.75 * size_kib, (in_memory, on_disk, size_kib)


def test_activations_go_to_disk_by_default_only_when_they_would_not_fit_in_memory(monkeypatch):
    model, ids = tiny_model("llama"), random_ids(8, 32)
    need = activations.nbytes(model, ids)
    assert need == 2 * 8 * 32 * 64 * 4
    monkeypatch.setattr(offload, "available_memory", lambda: need)
    assert activations.wants_on_disk(None, model, ids)
    assert not activations.wants_on_disk(False, model, ids)
    monkeypatch.setattr(offload, "available_memory", lambda: 100 * need)
    assert not activations.wants_on_disk(None, model, ids)
    assert activations.wants_on_disk(True, model, ids)
