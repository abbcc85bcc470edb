"""`recover`: distillation from the dense teacher that keeps every pruned weight pruned, in the
student's own storage, reproducible across a kill and across processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from thanos_deploy import data, loading, models, oneshot
from thanos_deploy.artifact import Manifest
from thanos_deploy.progress import Reporter
from thanos_deploy.recovery import learning_rate, loss, recover
from thanos_deploy.request import Evaluation, Memory, Output, RecoverRequest, Teacher, Training, parse_duration, prepare

from .conftest import CLI, run_cli, start_cli, tiny_model
from .test_distributed import worker_pids

TINY_TRAINING = dict(batch_size=2, seqlen=32, lr=1e-4)
TINY_EVALUATION = Evaluation(windows=1, seqlen=32)
TINY_FLAGS = ["--batch-size", "2", "--seqlen", "32", "--eval-windows", "1", "--eval-seqlen", "32", "--lr", "1e-4"]


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory, smollm2_folder):
    """A tiny Llama with SmolLM2's tokenizer, initialised large enough that pruning moves its outputs."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    tiny_model("llama", vocab_size=len(tokenizer), initializer_range=0.2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def students(tmp_path_factory, teacher_folder):
    """The tiny teacher pruned into every storage compress writes."""
    root = tmp_path_factory.mktemp("students")
    made = {}
    for name, method, pattern, storage, options in (
        ("masked", "thanos", "2:4", "masked", {"alpha": 0.25}),
        ("packed", "thanos", "2:4", "packed", {"alpha": 0.25}),
        ("shrunk", "wanda", "structured:0.25", "shrunk", {}),
        ("plain", "thanos", "width:mlp=0.25,heads=0.5,multiple=32", "plain", {}),
    ):
        oneshot(prepare(str(teacher_folder), out=root / name, method=method, pattern=pattern, **options, storage=storage, nsamples=4, seqlen=32))
        made[name] = root / name
    return made


class Recorder(Reporter):
    """What recover reports while it trains."""

    def __init__(self):
        self.records = []

    def record(self, kind: str, values: dict) -> None:
        self.records.append((kind, values))


def decoder_weights(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, layer in enumerate(models.decoder_layers(model))
            for n, p in layer.named_parameters() if p.dim() == 2}


# ---------------------------------------------------------------- the math


def test_distillation_loss_is_the_temperature_scaled_kl_plus_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g, dtype=torch.float64), torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    T = 2.0
    p, log_q = F.softmax(t / T, -1), F.log_softmax(s / T, -1)
    kl = (p * (p.log() - log_q)).sum(-1).mean() * T * T
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    total, kl_part, ce_part = loss.whole(s, t, ids, T, 0.5)
    assert torch.allclose(kl_part.double(), kl, atol=1e-6) and torch.allclose(ce_part.double(), ce, atol=1e-6)
    assert torch.allclose(total.double(), kl + 0.5 * ce, atol=1e-6)
    assert loss.whole(t, t, ids, 1.0, 0.0)[0].abs() < 1e-6  # a student equal to its teacher has nothing to learn


@pytest.mark.parametrize("temperature, ce_weight, chunk, bias", [(1.0, 0.0, 3, False), (2.0, 0.5, 4, True), (1.0, 0.3, 100, False)])
def test_the_chunked_loss_and_its_gradients_equal_the_whole_one(temperature, ce_weight, chunk, bias):
    """Chunks of positions (any size, ragged last one) give the loss and the gradients the full logits give."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    head, t_head = torch.nn.Linear(6, 13, bias=bias).double(), torch.nn.Linear(6, 13, bias=bias).double()
    t_hidden, ids = torch.randn(2, 7, 6, generator=g, dtype=torch.float64), torch.randint(0, 13, (2, 7), generator=g)
    want = loss.whole(head(hidden), t_head(t_hidden), ids, temperature, ce_weight)
    want_grads = torch.autograd.grad(want[0], (hidden, *head.parameters()))
    got = loss.chunked(hidden, head, t_hidden, t_head, ids, temperature, ce_weight, chunk)
    got_grads = torch.autograd.grad(got[0], (hidden, *head.parameters()))
    for a, b in zip(got[:2] + (got[2] if ce_weight else torch.zeros(()),), want[:2] + (want[2] if ce_weight else torch.zeros(()),)):
        assert torch.allclose(a.double(), b.double(), atol=1e-10)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-10)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    s = Training(tokens=100 * 4 * 256, lr=1e-4, warmup=0.05)
    rates = [learning_rate(step, s) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4 / 5) and rates[4] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:])) and rates[-1] == pytest.approx(1e-5, rel=0.01)
    assert learning_rate(10_000, Training(max_time="60", lr=1e-4)) == 1e-4  # a time budget alone: constant after warm-up


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("1.5h", 5400), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


# ---------------------------------------------------------------- what trains and what stays


def kl_to(teacher, student, ids) -> float:
    with torch.no_grad():
        return float(loss.whole(student(ids).logits, teacher(ids).logits, ids, 1.0, 0.0)[0])


def test_recovery_keeps_every_pruned_weight_pruned_and_2_4_strict(tmp_path, students, teacher_folder):
    (student, tokenizer), teacher = loading.load(str(students["masked"])), loading.load(str(teacher_folder))[0]
    before, held_out = decoder_weights(student), data.windows(data.evaluation_tokens("austen", tokenizer), 32, 4)  # text never trained on
    recorder = Recorder()
    result = recover(RecoverRequest(str(students["masked"]), Output(tmp_path / "out"), Teacher(str(teacher_folder)),
                                    Training(tokens=6 * 64, **{**TINY_TRAINING, "lr": 3e-3}), TINY_EVALUATION), recorder)
    steps = [values for kind, values in recorder.records if kind == "recover.step"]
    after = decoder_weights(loading.load(str(tmp_path / "out"))[0])
    for name, w in before.items():
        a = after[name]
        assert torch.all(a[w == 0] == 0), name  # pruned stays pruned
        assert not torch.equal(a[w != 0], w[w != 0]), name  # the rest trained
        rows = (w == 0).any(1)
        assert torch.all((a[rows].reshape(-1, 4) == 0).sum(1) >= 2), name  # strict 2:4 in the pattern rows
        assert torch.all(a[~rows] != 0), name  # outlier rows (alpha) stay dense
    assert len(steps) == 6 and kl_to(teacher, loading.load(str(tmp_path / "out"))[0], held_out) < 0.98 * kl_to(teacher, student, held_out)
    manifest = Manifest.read(tmp_path / "out")
    rec = manifest.recovery
    assert manifest.storage == "masked" and rec["teacher"] == str(teacher_folder) and rec["steps"] == 6 and rec["tokens_trained"] == 384
    assert rec["seed"] == 0 and rec["final_kl"] == pytest.approx(steps[-1]["kl"])
    log = json.loads((tmp_path / "out" / "recovery.json").read_text())["log"]
    assert [e["step"] for e in log] == [0, 1, 2, 3, 4, 5, 6] and all(e["perplexity"] > 1 for e in log)
    assert (tmp_path / "out" / "recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["tokens"] == 384 and result["matmul_fraction"] > 0


@pytest.mark.parametrize("storage", ["packed", "shrunk", "plain"])
def test_recovery_writes_the_students_storage_with_its_shapes(tmp_path, students, teacher_folder, storage):
    student = students[storage]
    recover(RecoverRequest(str(student), Output(tmp_path / "out"), training=Training(tokens=2 * 64, **TINY_TRAINING),
                           evaluation=TINY_EVALUATION))  # teacher: the manifest's source
    old, new = Manifest.read(student), Manifest.read(tmp_path / "out")
    assert new.storage == old.storage == storage and new.modules == old.modules and new.plain == old.plain
    a, b = loading.load(str(student))[0], loading.load(str(tmp_path / "out"))[0]
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(a) == shapes(b) and new.recovery["teacher"] == str(teacher_folder)
    assert any(not torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items() if v.is_floating_point())
    stored = load_file(tmp_path / "out" / "model.safetensors")
    if storage == "packed":
        assert any(k.endswith(".values") for k in stored) and not any(k.endswith("mlp.up_proj.weight") for k in stored)
    if storage == "plain":
        config = json.loads((tmp_path / "out" / "config.json").read_text())
        assert config["intermediate_size"] == 96 and config["num_attention_heads"] == 2


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, students, teacher_folder, smollm2_folder):
    other_vocab = tmp_path / "other-vocab"
    tiny_model("llama", vocab_size=300).save_pretrained(other_vocab)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    student = str(students["masked"])
    cases = [
        ([student, "--teacher", str(other_vocab)], "vocabulary of 300 tokens"),
        ([str(teacher_folder)], "not a thanos-deploy artifact"),
        ([student, "--tokens", "0"], "budget is zero"),
        ([student, "--max-time", "0m"], "budget is zero"),
        ([student, "--max-time", "soon"], "not a duration"),
        ([student, "--out", str(blocker / "out")], "not a writable folder"),
        ([student, "--learning-rate", "1"], "No such option"),
    ]
    for args, message in cases:
        out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
        r = run_cli("recover", *args, *out, *TINY_FLAGS)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert len([line for line in lines if line.startswith("error")]) == 1 and "Traceback" not in r.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_a_teacher_that_is_not_the_parent_gets_a_warning(tmp_path, students, teacher_folder):
    twin = tmp_path / "twin"
    shutil.copytree(teacher_folder, twin)
    r = run_cli("recover", str(students["masked"]), "--teacher", str(twin), "--tokens", "64", *TINY_FLAGS, "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stdout.split())
    assert f"warning: teacher '{twin}' is not the model" in said and "was pruned from" in said


# ---------------------------------------------------------------- a kill, and several processes


def test_resume_after_sigkill_writes_the_same_bytes(tmp_path, students):
    args = ["recover", str(students["masked"]), "--tokens", str(8 * 64), "--eval-every", "64", *TINY_FLAGS]
    whole = run_cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    proc = start_cli(*args, "--out", str(tmp_path / "cut"))
    progress = tmp_path / ".cut.partial" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and 2 <= json.loads(progress.read_text())["done"] < 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut").exists()
    other = run_cli(*args[:-1], "3e-4", "--out", str(tmp_path / "cut"), "--resume")  # another learning rate: refused, progress kept
    assert other.returncode == 2 and "differs" in other.stderr and "lr" in other.stderr and progress.is_file()
    again = run_cli(*args, "--out", str(tmp_path / "cut"), "--resume")
    assert again.returncode == 0, again.stderr
    assert not re.search(r"^step 1:", again.stdout, re.M)  # it went on from the checkpoint, not from the start
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert not (tmp_path / ".cut.partial").exists()


def test_a_time_budget_trains_at_least_one_step_and_writes(tmp_path, students):
    r = run_cli("recover", str(students["shrunk"]), "--max-time", "0.001s", *TINY_FLAGS, "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    recovery = Manifest.read(tmp_path / "out").recovery
    assert recovery["steps"] == 1 and recovery["max_seconds"] == 0.001 and recovery["tokens"] is None


def test_two_gloo_processes_shard_match_one_keep_masks_and_resume_on_any_count(tmp_path, students):
    """FSDP2 on 2 gloo processes: the same global batch as one process gives the same weights to 1e-5
    (after 24 steps: the target asks for 8); every pruned weight stays zero (strict 2:4 gathered);
    each process holds half the states the plan says it will; killed after a checkpoint, it resumes
    with the same bytes on 2 processes and continues on 1."""
    args = ["recover", str(students["masked"]), "--tokens", str(24 * 64), "--eval-every", "128", *TINY_FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = run_cli(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run([CLI, *args, "--nproc", "2", "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, float((a[k] - b[k]).abs().max()))
    before = load_file(students["masked"] / next(p.name for p in sorted(students["masked"].glob("model-layer-*.safetensors"))))
    for k, w in before.items():
        if k.endswith("proj.weight"):
            assert torch.all(b[k][w == 0] == 0), k
    logs = {name: json.loads((tmp_path / name / "recovery.json").read_text()) for name in ("one", "two")}
    held = {name: sum(log["shard_bytes"].values()) for name, log in logs.items()}
    assert held["two"] <= 0.55 * held["one"], held
    for name, log in logs.items():  # the plan's states against what the shards measured
        for part, measured in (("parameters", "parameters"), ("gradients", "gradients"), ("optimizer states", "optimizer")):
            assert log["plan"]["device"][part] == pytest.approx(log["shard_bytes"][measured], rel=0.01), (name, part)
    assert "held by each process" in two.stdout and "memory plan per process (2 on cpu)" in two.stdout

    launcher = subprocess.Popen([CLI, *args, "--nproc", "2", "--out", str(tmp_path / "cut")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
    progress = tmp_path / ".cut.partial" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline and launcher.poll() is None and not (progress.is_file() and json.loads(progress.read_text())["done"] >= 2):
        time.sleep(0.02)
    ranks = worker_pids(launcher.pid)
    for pid in ranks.values():
        os.kill(pid, signal.SIGSTOP)  # frozen mid-run, so the kill lands before the end
    assert 2 <= json.loads(progress.read_text())["done"] < 24 and not (tmp_path / "cut").exists()
    os.kill(ranks[1], signal.SIGKILL)
    os.kill(ranks[0], signal.SIGCONT)
    _, stderr = launcher.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert launcher.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: process 1 of 2 was killed by SIGKILL"), stderr
    shutil.copytree(tmp_path / ".cut.partial", tmp_path / ".other.partial")
    (tmp_path / ".other.partial" / "lock").unlink(missing_ok=True)
    again = subprocess.run([CLI, *args, "--nproc", "2", "--out", str(tmp_path / "cut"), "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "cut" / "model.safetensors").read_bytes() == (tmp_path / "two" / "model.safetensors").read_bytes()
    other = run_cli(*args, "--out", str(tmp_path / "other"), "--resume")  # the 2-process checkpoint, resharded for 1
    assert other.returncode == 0, other.stderr
    c = load_file(tmp_path / "other" / "model.safetensors")
    for k in b:
        assert torch.allclose(b[k], c[k], atol=1e-5, rtol=0), k


def test_the_memory_plan_refuses_what_does_not_fit_and_plans_an_8b_run_from_its_config(tmp_path, students):
    import transformers

    big = run_cli("recover", str(students["masked"]), "--batch-size", "200000", "--seqlen", "32", "--out", str(tmp_path / "out"))
    assert big.returncode == 2 and "recover needs about" in big.stderr and "it fits with" in big.stderr and "--batch-size" in big.stderr, big.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    offload = run_cli("recover", str(students["masked"]), "--cpu-offload", "--out", str(tmp_path / "out"))
    assert offload.returncode == 2 and "--cpu-offload" in offload.stderr and "drop it" in offload.stderr
    folder = tmp_path / "llama-3-8b"
    transformers.LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False).save_pretrained(folder)
    plans = {}
    for name, flags in (("1x80", ["--nproc", "1"]), ("1x80-offload", ["--nproc", "1", "--cpu-offload", "--gradient-checkpointing"]),
                        ("8x80", ["--nproc", "8", "--batch-size", "8"])):
        r = run_cli("recover", str(folder), "--plan-only", "--json", "--device-memory", "80GB", "--seqlen", "2048", *flags)
        assert r.returncode == 0, r.stderr
        plans[name] = json.loads(r.stdout)
    parameters = 8_030_261_248  # Llama-3-8B: 32 layers of 218,112,000, embeddings and head 525,336,576 each, the final norm 4,096
    assert plans["1x80"]["device"]["parameters"] == 4 * parameters and not plans["1x80"]["fits"] and plans["1x80"]["fixes"]
    assert plans["1x80-offload"]["host"]["optimizer states"] == 8 * parameters and plans["1x80-offload"]["fits"]
    assert plans["8x80"]["device"]["parameters"] == 4 * parameters / 8 and plans["8x80"]["fits"]


def test_memory_options_train_the_same_model(tmp_path, students, teacher_folder):
    """Gradient checkpointing recomputes the same activations; a bf16 teacher only rounds its logits."""
    training = Training(tokens=2 * 64, **TINY_TRAINING)
    runs = {"plain": {}, "checkpointed": {"memory": Memory(gradient_checkpointing=True)}, "bf16-teacher": {"teacher": Teacher(dtype="bfloat16")}}
    for name, options in runs.items():
        recover(RecoverRequest(str(students["masked"]), Output(tmp_path / name), training=training, evaluation=TINY_EVALUATION, **options))
    plain, checkpointed, half = (load_file(tmp_path / name / "model.safetensors") for name in runs)
    for k in plain:
        assert torch.allclose(plain[k], checkpointed[k], atol=1e-6), k
        assert torch.allclose(plain[k], half[k], atol=1e-3), k
    assert any(not torch.equal(plain[k], half[k]) for k in plain)  # the teacher's precision did reach the update
