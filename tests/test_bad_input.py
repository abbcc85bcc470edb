"""Bad input, everywhere: every command, every kind of file the tool reads, bad options, bad output
paths, a full disk. Each case runs one command line through `main(argv)` in this process (the
console script's own code: parse, call, render, exit code) and must end with exit code 2, one
`error:` line naming the problem and the fix, no traceback, nothing left behind, and its inputs
untouched. A few run the installed console script in a fresh process: a usage error (Typer's
vendored click raised through `main` once) and the full disks (a per-process file size limit)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import CLI, random_ids, run_cli, tiny_model


@dataclass
class Case:
    name: str
    args: list[str]  # {placeholders}: files of the `inputs` fixture, {out} (the output path), {ws} (the case's folder)
    match: str  # a piece of the error line
    setup: object = None  # optional callable(ws: Path, inputs: dict) that prepares extra inputs in ws
    usage: bool = False  # a usage error: click's usage line comes before the error line
    env: dict = field(default_factory=dict)
    installed: bool = False  # run the installed console script in a fresh process


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def inputs(tmp_path_factory, tiny_folder) -> dict:
    """Every kind of file the tool reads, valid and broken, made once (read-only by the cases)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bad-inputs")
    files = {"model": str(tiny_folder), "root": str(root)}
    ckpt = root / "ckpt"
    text = _bytes(root / "calib.txt", b"It is a truth universally acknowledged. " * 300)
    r = run_cli("compress", str(tiny_folder), "--method", "wanda", "--pattern", "4:8", "--calib", str(text),
                "--nsamples", "2", "--seqlen", "32", "--out", str(ckpt))
    assert r.returncode == 0, r.stderr
    files["ckpt"], files["text"] = str(ckpt), str(text)

    def variant(name: str, edit) -> str:
        target = root / name
        shutil.copytree(ckpt, target)
        edit(target)
        return str(target)

    manifest = json.loads((ckpt / "thanos_deploy.json").read_text())
    shard = next(p.name for p in sorted(ckpt.glob("model-layer-*.safetensors")))
    files["ckpt_bad_json"] = variant("ckpt-bad-json", lambda d: (d / "thanos_deploy.json").write_text('{"format": "thanos-'))
    files["ckpt_json_list"] = variant("ckpt-json-list", lambda d: (d / "thanos_deploy.json").write_text("[1, 2]"))
    files["ckpt_no_pattern"] = variant("ckpt-no-pattern", lambda d: (d / "thanos_deploy.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "pattern"})))
    files["ckpt_structured"] = variant("ckpt-structured", lambda d: (d / "thanos_deploy.json").write_text(json.dumps({**manifest, "pattern": "structured:0.3"})))
    files["ckpt_packed_no_modules"] = variant("ckpt-packed", lambda d: (d / "thanos_deploy.json").write_text(json.dumps({**manifest, "storage": "packed"})))
    files["ckpt_truncated"] = variant("ckpt-truncated", lambda d: os.truncate(d / shard, (d / shard).stat().st_size // 2))
    files["ckpt_missing_shard"] = variant("ckpt-missing", lambda d: (d / shard).unlink())
    assert run_cli("pack", str(ckpt), "--out", str(root / "packed")).returncode == 0
    files["packed"] = str(root / "packed")

    dense = root / "dense"
    tiny_model("llama").save_pretrained(dense)
    trunc = root / "dense-truncated"
    shutil.copytree(dense, trunc)
    os.truncate(trunc / "model.safetensors", 100)
    files["dense_truncated"] = str(trunc)
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(dense / "config.json", no_weights / "config.json")
    files["no_weights"] = str(no_weights)
    bad_config = root / "bad-config"
    shutil.copytree(dense, bad_config)
    (bad_config / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    files["bad_config"] = str(bad_config)
    no_config = root / "no-config"
    no_config.mkdir()
    files["no_config"] = str(no_config)
    nan = root / "nan-weights"
    model = tiny_model("llama")
    model.model.layers[1].self_attn.q_proj.weight.data[0, 0] = float("nan")
    model.save_pretrained(nan)
    files["nan_model"] = str(nan)
    import transformers

    gemma = root / "gemma3-like"  # Gemma 3 270M's head layout (4 heads, 1 KV head, head_dim apart from hidden / heads), weights cut
    layout = transformers.AutoConfig.for_model("gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=1, head_dim=16, vocab_size=256, sliding_window=64, max_position_embeddings=512)
    transformers.AutoModelForCausalLM.from_config(layout).save_pretrained(gemma)
    os.truncate(gemma / "model.safetensors", 100)  # the refusal must come before the weights are read
    files["gemma"] = str(gemma)
    gpt2 = root / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    files["gpt2"] = str(gpt2)

    files["gguf_garbage"] = str(_bytes(root / "garbage.gguf", b"GGUF" + os.urandom(2000)))
    import gguf

    writer = gguf.GGUFWriter(str(root / "rwkv.gguf"), "rwkv6")  # a valid GGUF of an architecture transformers cannot map
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    files["gguf_unmapped"] = str(root / "rwkv.gguf")
    files["onnx_garbage"] = str(_bytes(root / "garbage.onnx", os.urandom(3000)))
    files["onnx_empty"] = str(_bytes(root / "empty.onnx", b""))
    onnx_dir = root / "onnx-folder"
    onnx_dir.mkdir()
    _bytes(onnx_dir / "model.onnx", b"not a protobuf at all" * 50)
    files["onnx_folder"] = str(onnx_dir)

    files["tok_pt_garbage"] = str(_bytes(root / "garbage.pt", os.urandom(500)))
    np.save(root / "flat.npy", np.arange(64))
    files["tok_npy_1d"] = str(root / "flat.npy")
    save_file({"input_ids": torch.rand(2, 32)}, root / "float.safetensors")
    files["tok_float"] = str(root / "float.safetensors")
    save_file({"input_ids": torch.full((2, 32), 10**6, dtype=torch.long)}, root / "big.safetensors")
    files["tok_out_of_vocab"] = str(root / "big.safetensors")
    files["tok_csv"] = str(_bytes(root / "ids.csv", b"1,2,3\n4,5,6\n"))

    files["txt_binary"] = str(_bytes(root / "binary.txt", bytes(range(256)) * 4))
    files["txt_empty"] = str(_bytes(root / "empty.txt", b""))
    files["jsonl_wrong_field"] = str(_bytes(root / "wrong.jsonl", b'{"content": "hello there"}\n' * 20))
    files["jsonl_text_number"] = str(_bytes(root / "number.jsonl", b'{"text": "fine"}\n{"text": 5}\n'))
    files["jsonl_array"] = str(_bytes(root / "array.jsonl", b'["text", "hello"]\n'))
    files["jsonl_not_json"] = str(_bytes(root / "broken.jsonl", b'{"text": "hello"\n'))
    files["jsonl_binary"] = str(_bytes(root / "binary.jsonl", os.urandom(600)))
    files["file"] = str(_bytes(root / "a-file", b"not a folder"))
    files["ids"] = str(root / "ids.safetensors")
    save_file({"input_ids": random_ids(2, 32, 256)}, root / "ids.safetensors")
    return files


def disk_full_setup(ws: Path, inputs: dict) -> None:
    """A 64 KiB file system (less than one layer of the tiny model) for --out: a tmpfs where mounting is allowed (root, no container
    restrictions); otherwise the same limit enforced by the kernel per process (`ulimit -f`, RLIMIT_FSIZE, see
    `run_case`), which fails the write call with EFBIG instead of ENOSPC."""
    small = ws / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode == 0
    (ws / ".mounted" if mounted else ws / ".fsize").write_text("")


def disk_full_for_activations_setup(ws: Path, inputs: dict) -> None:
    """The small disk of `disk_full_setup`, and calibration tokens whose activations (512 KiB per layer boundary) fill it first."""
    from safetensors.torch import save_file

    disk_full_setup(ws, inputs)
    save_file({"input_ids": random_ids(64, 32, 256)}, ws / "many-ids.safetensors")


CASES = [
    # usage errors (Typer's vendored click)
    Case("typo-in-command", ["bnech"], "No such command 'bnech'", usage=True, installed=True),
    Case("typo-in-option", ["compress", "{model}", "--patern", "2:4", "--out", "{out}"], "No such option: --patern", usage=True),
    Case("eval-without-model", ["eval"], "Missing argument", usage=True),
    # patterns and option values
    Case("pattern-three-parts", ["compress", "{model}", "--pattern", "2:5:1", "--out", "{out}"], "invalid pattern '2:5:1'"),
    Case("unknown-method", ["compress", "{model}", "--method", "obs", "--out", "{out}"], "unknown method 'obs'"),
    Case("block-size-zero", ["compress", "{model}", "--block-size", "0", "--out", "{out}"], "--block-size"),
    Case("cuda-without-gpu", ["eval", "{model}", "--device", "cuda"], "no CUDA device"),
    Case("unknown-dtype", ["eval", "{model}", "--dtype", "float8"], "unknown dtype 'float8'"),
    Case("shrink-with-nm", ["compress", "{model}", "--pattern", "2:4", "--shrink", "--out", "{out}"], "--shrink needs a structured pattern"),
    Case("offload-with-pack", ["compress", "{model}", "--pattern", "2:4", "--pack", "--offload", "--out", "{out}"], "--offload writes masked checkpoints"),
    Case("seqlen-zero", ["eval", "{model}", "--seqlen", "0"], "--seqlen"),
    Case("nsamples-zero", ["compress", "{model}", "--nsamples", "0", "--out", "{out}"], "--nsamples must be at least 1"),
    Case("compare-nsamples-zero", ["compare", "{model}", "--methods", "wanda", "--nsamples", "0"], "--nsamples must be at least 1"),
    Case("bench-nsamples-zero", ["bench", "{model}", "--plan", "default", "--nsamples", "0", "--out", "{out}"], "--nsamples must be at least 1"),
    Case("width-heads-the-config-refuses", ["compress", "{gemma}", "--pattern", "width:mlp=0.3,heads=0.25", "--out", "{out}"],
         "accepts 1, 2 or 4 query heads"),
    Case("resume-without-out", ["compress", "{model}", "--resume"], "--resume continues a run that writes an artifact: pass --out"),
    Case("tasks-unknown", ["eval", "{model}", "--tasks", "austen_clozee"], "unknown task(s) austen_clozee: the offline tasks are austen_cloze, austen_next"),
    Case("tasks-standard-offline", ["eval", "{model}", "--tasks", "arc_easy"], "cannot be reached from here: the offline tasks are austen_cloze"),
    Case("tasks-limit-zero", ["eval", "{model}", "--tasks", "austen_cloze", "--limit", "0"], "--limit must be at least 1"),
    Case("tasks-fewshot-negative", ["eval", "{model}", "--tasks", "austen_cloze", "--num-fewshot", "-1"], "--num-fewshot must be at least 0"),
    Case("tasks-on-onnx", ["eval", "{onnx_folder}", "--tasks", "austen_cloze"], "task accuracy runs on the torch backend"),
    Case("zero-new-tokens", ["generate", "{model}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    Case("compare-unknown-option", ["compare", "{model}", "--methods", "thanos:beta=1"], "beta"),
    Case("compare-no-methods", ["compare", "{model}", "--methods", ","], "--methods"),
    Case("compare-grid-empty-value", ["compare", "{model}", "--methods", "thanos:alpha=", "--out", "{out}"], "alpha has no value"),
    Case("compare-grid-not-a-number", ["compare", "{model}", "--methods", "thanos:alpha=0|x", "--out", "{out}"], "'x' is not a number"),
    Case("compare-grid-unknown-option", ["compare", "{model}", "--methods", "thanos:block_size=32|64,beta=1", "--out", "{out}"], "does not take option(s) beta"),
    Case("compare-grid-unknown-method", ["compare", "{model}", "--methods", "wanda,obs:alpha=1", "--out", "{out}"], "unknown method 'obs'"),
    Case("compare-grid-empty-alternative", ["compare", "{model}", "--methods", "thanos:alpha=1||2", "--out", "{out}"], "has an empty value"),
    Case("compare-grid-value-out-of-range", ["compare", "{model}", "--methods", "thanos:alpha=0|0.7", "--out", "{out}"], "--alpha must be in [0, 0.5]"),
    Case("compare-methods-file-missing", ["compare", "{model}", "--methods", "@{ws}/plan.txt", "--out", "{out}"], "does not exist"),
    Case("compare-methods-file-bad-line", ["compare", "{model}", "--methods", "@{ws}/plan.txt", "--out", "{out}"], "plan.txt' line 2",
         setup=lambda ws, inputs: (ws / "plan.txt").write_text("# sweep\nthanos:block_size=|64\n")),
    Case("compare-out-exists", ["compare", "{model}", "--methods", "wanda", "--out", "{out}"], "already exists",
         setup=lambda ws, inputs: ((ws / "out").mkdir(), (ws / "out" / "keep.txt").write_text("mine"))),
    Case("engine-bad-shapes", ["build-engine", "{onnx_folder}", "--shapes", "batch=4:1", "--out", "{out}"], "shapes"),
    # models
    Case("folder-without-config", ["eval", "{no_config}"], "without config.json"),
    Case("config-not-json", ["compress", "{bad_config}", "--out", "{out}"], "config"),
    Case("config-without-weights", ["eval", "{no_weights}"], "no file named model.safetensors"),
    Case("safetensors-truncated", ["eval", "{dense_truncated}"], "dense-truncated"),
    Case("offload-safetensors-truncated", ["compress", "{dense_truncated}", "--offload", "--calib-tokens", "{ids}", "--out", "{out}"], "dense-truncated"),
    Case("gguf-garbage", ["eval", "{gguf_garbage}"], "garbage.gguf"),
    Case("gguf-unmapped-architecture", ["compress", "{gguf_unmapped}", "--calib-tokens", "{ids}", "--out", "{out}"], "a model transformers cannot map"),
    Case("not-a-model-file", ["eval", "{text}"], "is not a model"),
    Case("unsupported-family", ["compress", "{gpt2}", "--out", "{ws}/new/deeper/out"], "unsupported architecture 'gpt2'"),
    Case("nan-weights", ["compress", "{nan_model}", "--calib-tokens", "{ids}", "--out", "{out}"], "layers.1.self_attn.q_proj"),
    # checkpoints and manifests
    Case("manifest-not-json", ["eval", "{ckpt_bad_json}"], "is not valid JSON"),
    Case("manifest-not-an-object", ["inspect", "{ckpt_json_list}"], "thanos_deploy.json"),
    Case("manifest-without-pattern", ["shrink", "{ckpt_no_pattern}", "--out", "{out}"], "pattern"),
    Case("manifest-packed-without-modules", ["inspect", "{ckpt_packed_no_modules}"], "without valid 'modules'"),
    Case("checkpoint-shard-truncated", ["eval", "{ckpt_truncated}"], "does not match the hash"),
    Case("checkpoint-shard-missing", ["pack", "{ckpt_missing_shard}", "--out", "{out}"], "is incomplete"),
    Case("pack-structured", ["pack", "{ckpt_structured}", "--out", "{out}"], "--pack needs an N:M pattern"),
    Case("shrink-without-manifest", ["shrink", "{model}", "--out", "{out}"], "pass --pattern"),
    # ONNX
    Case("onnx-garbage", ["inspect", "{onnx_garbage}"], "garbage.onnx"),
    Case("onnx-empty", ["inspect", "{onnx_empty}"], "empty.onnx"),
    Case("onnx-garbage-generate", ["generate", "{onnx_folder}", "--backend", "ort", "--prompt", "hi"], "model.onnx"),
    Case("engine-without-tensorrt", ["build-engine", "{onnx_folder}", "--out", "{out}"], "TensorRT"),
    # token files
    Case("tokens-garbage-pt", ["compress", "{model}", "--calib-tokens", "{tok_pt_garbage}", "--out", "{out}"], "cannot read token file"),
    Case("tokens-1d-npy", ["compress", "{model}", "--calib-tokens", "{tok_npy_1d}", "--out", "{out}"], "2-D tensor"),
    Case("tokens-float", ["compress", "{model}", "--calib-tokens", "{tok_float}", "--out", "{out}"], "token ids must be integers"),
    Case("tokens-out-of-vocab", ["compress", "{model}", "--calib-tokens", "{tok_out_of_vocab}", "--out", "{out}"], "token ids must lie in"),
    Case("tokens-csv", ["compress", "{model}", "--calib-tokens", "{tok_csv}", "--out", "{out}"], "use .pt, .npy or .safetensors"),
    # calibration and evaluation text
    Case("calib-binary-txt", ["compress", "{model}", "--calib", "{txt_binary}", "--seqlen", "64", "--out", "{out}"], "is binary, not UTF-8 text"),
    Case("calib-jsonl-text-a-number", ["compress", "{model}", "--calib", "{jsonl_text_number}", "--out", "{out}"], "line 2: \"text\" is 5, not a string"),
    Case("calib-jsonl-array-line", ["compress", "{model}", "--calib", "{jsonl_array}", "--out", "{out}"], "line 1: expected a JSON object"),
    Case("eval-jsonl-text-a-number", ["eval", "{model}", "--data", "{jsonl_text_number}"], "\"text\" is 5"),
    Case("calib-jsonl-wrong-field", ["compress", "{model}", "--calib", "{jsonl_wrong_field}", "--out", "{out}"], "\"text\" field"),
    Case("eval-jsonl-binary", ["eval", "{model}", "--data", "{jsonl_binary}"], "is binary, not UTF-8 text"),
    # output paths
    Case("out-under-a-file", ["compress", "{model}", "--out", "{file}/out"], "is not a writable folder"),
    Case("out-special-file", ["compress", "{model}", "--out", "/dev/null", "--overwrite"], "special file"),
    Case("out-current-folder", ["compress", "{model}", "--out", ".", "--overwrite"], "current folder"),
    Case("out-unwritable", ["compress", "{model}", "--calib-tokens", "{ids}", "--out", "/proc/thanos-deploy-out"], "/proc"),
    # export gguf (llama.cpp's converter: its sources come with `make setup`)
    Case("gguf-unknown-type", ["export", "gguf", "{model}", "--type", "q3_x", "--out", "{ws}/m.gguf"], "unknown --type 'q3_x': choose f32, f16"),
    Case("gguf-packed", ["export", "gguf", "{packed}", "--out", "{ws}/m.gguf"], "stored packed, which llama.cpp cannot read"),
    Case("gguf-onnx", ["export", "gguf", "{onnx_folder}", "--out", "{ws}/m.gguf"], "is an ONNX export"),
    Case("gguf-out-exists", ["export", "gguf", "{model}", "--out", "{ws}/m.gguf"], "--overwrite",
         setup=lambda ws, inputs: (ws / "m.gguf").write_bytes(b"mine")),
    Case("gguf-out-not-gguf", ["export", "gguf", "{model}", "--out", "{ws}/m.bin"], "not a .gguf file path"),
    Case("gguf-without-llama-cpp", ["export", "gguf", "{model}", "--out", "{ws}/m.gguf"], "run `thanos-deploy setup llama.cpp`",
         env={"THANOS_DEPLOY_CACHE": "{ws}/empty-cache"}),
    Case("export-out-under-a-file", ["export", "onnx", "{ckpt}", "--out", "{file}/onnx"], "is not a writable folder"),
    Case("disk-full", ["compress", "{model}", "--method", "wanda", "--calib-tokens", "{ids}", "--out", "{ws}/small/out"], "no space", setup=disk_full_setup,
         installed=True),
    Case("disk-full-of-activations", ["compress", "{model}", "--method", "wanda", "--calib-tokens", "{ws}/many-ids.safetensors", "--activations-on-disk",
                                      "--out", "{ws}/small/out"], "no space", setup=disk_full_for_activations_setup, installed=True),
    Case("bench-missing-candidate", ["bench", "{model}", "{ws}/no-such-artifact", "--out", "{out}"], "does not exist"),
    Case("bench-unknown-backend", ["bench", "{model}", "{ckpt}", "--backend", "tvm", "--out", "{out}"], "unknown backend"),
    Case("bench-plan-unknown-method", ["bench", "{model}", "--plan", "{ws}/plan.txt", "--out", "{out}"], "unknown method",
         setup=lambda ws, inputs: (ws / "plan.txt").write_text("2:4 obs\n")),
    Case("bench-bad-batch-sizes", ["bench", "{model}", "{ckpt}", "--batch-sizes", "1,x", "--out", "{out}"], "comma-separated integers"),
    Case("bench-plan-with-candidates", ["bench", "{model}", "{ckpt}", "--plan", "default", "--out", "{out}"], "--plan builds its own candidates"),
    Case("resume-damaged-progress", ["compress", "{model}", "--calib-tokens", "{ids}", "--out", "{out}", "--resume"], "--overwrite",
         setup=lambda ws, inputs: ((ws / ".out.partial").mkdir(), (ws / ".out.partial" / "progress.json").write_text("{broken"))),
]


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its content hash (folders: None). A partial run's `lock` file
    is left out: it is not data, and a refused resume writes its pid there while it holds it."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
        if not (p.name == "lock" and p.parent.name.endswith(".partial"))
    }


def run_case(case: Case, ws: Path, inputs: dict) -> tuple[subprocess.CompletedProcess, dict, dict]:
    """(result, files before, files after) of one case in its own folder `ws`."""
    ws.mkdir()
    if case.setup:
        case.setup(ws, inputs)
    before = snapshot(ws)
    values = {**inputs, "out": str(ws / "out"), "ws": str(ws)}
    args = [a.format(**values) for a in case.args]
    command = [CLI, *args]
    if (ws / ".fsize").exists():  # SIGXFSZ ignored, so the write call fails with EFBIG; 64 blocks of 1 KiB
        command = ["bash", "-c", 'trap "" XFSZ; ulimit -f 64; exec "$@"', "--", *command]
    try:
        if case.installed:
            result = subprocess.run(command, capture_output=True, text=True, cwd=ws, timeout=600,
                                    env={**os.environ, **{k: v.format(**values) for k, v in case.env.items()}})
        else:
            result = run_cli(*args, cwd=ws, env={k: v.format(**values) for k, v in case.env.items()})
        return result, before, snapshot(ws)
    finally:
        if (ws / ".mounted").exists():
            subprocess.run(["umount", str(ws / "small")], check=True)


@pytest.fixture(scope="module")
def results(inputs, tmp_path_factory) -> dict:
    """Every case: the in-process ones one after the other (they share this process's working
    folder and standard streams), the installed-script ones meanwhile in a thread each."""
    root = tmp_path_factory.mktemp("cases")
    shared = snapshot(Path(inputs["root"]))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {c.name: pool.submit(run_case, c, root / c.name, inputs) for c in CASES if c.installed}
        done = {c.name: run_case(c, root / c.name, inputs) for c in CASES if not c.installed}
        done.update({name: f.result() for name, f in futures.items()})
    done["shared inputs unchanged"] = snapshot(Path(inputs["root"])) == shared
    return done


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, results):
    r, before, after = results[case.name]
    output = r.stderr + r.stdout
    assert r.returncode == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert lines[-1] == errors[0] and (len(lines) == 1 or case.usage and lines[0].startswith("Usage: ")), r.stderr
    assert case.match in errors[0], errors[0]
    assert after == before, "files were left behind or changed"
    assert results["shared inputs unchanged"], "an input was changed"
    assert not Path("/proc/thanos-deploy-out").exists()


def test_the_suite_is_big_enough():
    assert len(CASES) >= 40
    commands = {c.args[0] for c in CASES}
    assert {"compress", "compare", "eval", "shrink", "pack", "inspect", "export", "build-engine", "generate"} <= commands
