"""Shared fixtures: tiny random models built in the tests, and the real SmolLM2 (loaded once)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from thanos_deploy import loading
from thanos_deploy.cli import main

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)


# what a family's config needs beyond TINY to be tiny and valid (defaults sized for the real models)
FAMILY_CONFIG = {
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 64},
    "gemma3_text": {"head_dim": 16, "sliding_window": 64},
    "phi3": {"pad_token_id": 0},
    "falcon": {"ffn_hidden_size": 128, "new_decoder_architecture": True, "num_kv_heads": 2},
    "cohere": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}


def tiny_model(kind: str = "llama", seed: int = 0, **overrides):
    """A 2-layer random causal LM of the given family, in float32, eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = {**TINY, **overrides}
    if kind == "opt":
        config = transformers.OPTConfig(
            hidden_size=cfg["hidden_size"], ffn_dim=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"], vocab_size=cfg["vocab_size"], word_embed_proj_dim=cfg["hidden_size"],
            max_position_embeddings=512,
        )
        model = transformers.OPTForCausalLM(config)
    else:  # any model_type transformers knows, from its own config class (offline, no hub)
        config = transformers.AutoConfig.for_model(kind, max_position_embeddings=512, **FAMILY_CONFIG.get(kind, {}), **cfg)
        if getattr(config, "num_key_value_heads", None) is not None:  # grouped-query attention where the family has it
            config.num_key_value_heads = 2
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.float().eval()


def random_ids(n: int, seqlen: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The converted SmolLM2-135M folder (converted once into the user cache)."""
    return Path(loading.resolve(loading.SMOLLM2_ALIAS))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, smollm2_folder) -> Path:
    """A tiny random Llama saved with SmolLM2's tokenizer, for CLI runs that need text."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CLI = str(Path(sys.executable).with_name("thanos-deploy"))  # the installed console script


def run_cli(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run a command line in this process through `main(argv)`, as the console script would
    (the same code: parse, call, render, exit code); its stdout, stderr and code come back."""
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess([CLI, *args], code, out.getvalue(), err.getvalue())


def run_installed(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run the installed `thanos-deploy` console script in a fresh process (exit codes and
    tracebacks as a shell sees them; the few tests that need a real process)."""
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=900
    )


def start_cli(*args: str) -> subprocess.Popen:
    """Start the installed console script for a test that interrupts it. SIGINT is reset to its
    default in the child: a shell without job control starts background jobs (`make test &`)
    with SIGINT ignored, children inherit that, and Python then installs no KeyboardInterrupt."""
    return subprocess.Popen([CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
