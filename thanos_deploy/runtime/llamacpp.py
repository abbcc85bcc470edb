"""llama.cpp on a .gguf file: what llama.cpp, Ollama and LM Studio users run. Through
llama-cpp-python (ctypes) on the shared library that `thanos-deploy setup llama.cpp` builds from
the same pinned sources as the converter, so the exporter, the tools and this backend are one
llama.cpp.

One sequence at a time: a llama.cpp context here holds one KV cache, so a batch runs row by row
(perplexity) and bench times batch 1. Weights stay in the file's own layout: llama.cpp's
repacked CPU layouts (use_extra_bufts) are off, because their AMX path dies with SIGILL on
virtual machines that expose AMX without enabling it (this project's machines do), and a
crash cannot be caught.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import gguf
import torch

from .. import llamacpp_build as llamacpp
from ..errors import UserError
from .base import Backend

CONTEXT, BATCH = 2048, 512


def binding():
    """llama-cpp-python, loading the library `setup llama.cpp` built (LLAMA_CPP_LIB_PATH)."""
    library = llamacpp.home() / "build" / "bin"
    if not (library / llamacpp.LIBRARY).is_file():
        raise UserError(f"llama.cpp is not built yet: run `{llamacpp.SETUP}` (once, about 11 minutes on 2 cores)")
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(library))
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"--backend llamacpp needs llama-cpp-python {llamacpp.VERSION}: "
                        f"CMAKE_ARGS='-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF' pip install 'thanos-deploy[llamacpp]' (make setup-llamacpp)") from None
    if llama_cpp.__version__ != llamacpp.VERSION:
        raise UserError(f"llama-cpp-python {llama_cpp.__version__} is installed, the llama.cpp built here is {llamacpp.VERSION}'s: "
                        f"pip install llama-cpp-python=={llamacpp.VERSION}")
    return llama_cpp


def _trained_context(path: Path) -> int:
    """The context length the file declares (its `<arch>.context_length`), or the default when it has none."""
    try:
        fields = gguf.GGUFReader(path).fields
        arch = fields["general.architecture"].contents()
        return int(fields[f"{arch}.context_length"].contents())
    except (KeyError, ValueError, OSError):
        return CONTEXT


class GgufTokenizer:
    """llama.cpp's own tokenizer of the file, with the few calls `generate` makes of a Hugging Face one."""

    def __init__(self, llm):
        self.llm = llm
        self.eos_token_id = llm.token_eos()

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.llm.tokenize(text.encode(), add_bos=add_special_tokens, special=False)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.llm.detokenize([int(i) for i in ids], special=not skip_special_tokens).decode(errors="replace")


class LlamaCppBackend(Backend):
    def __init__(self, target: str, *, threads: int | None = None, context: int = CONTEXT):
        path = Path(target)
        if path.suffix != ".gguf" or not path.is_file():
            raise UserError(f"'{target}' is not a .gguf file: --backend llamacpp runs GGUF files (thanos-deploy export gguf)")
        llama_cpp = binding()
        plain = llama_cpp.llama_cpp.llama_model_default_params

        def no_repack():
            params = plain()
            params.use_extra_bufts = False
            return params

        threads = threads or torch.get_num_threads()
        context = min(context, _trained_context(path))  # no longer than trained: llama.cpp warns, and logits_all keeps context × vocabulary floats
        llama_cpp.llama_cpp.llama_model_default_params = no_repack  # Llama() reads its defaults from here
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=BATCH, n_ubatch=BATCH, n_threads=threads,
                                       n_threads_batch=threads, logits_all=True, verbose=False)
        except ValueError as e:
            raise UserError(f"llama.cpp cannot load '{target}' ({e}): export it again with this version (thanos-deploy export gguf)") from None
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = plain
        weakref.finalize(self, self.llm.close)  # before interpreter teardown, where the binding's own __del__ fails
        self.tokenizer = GgufTokenizer(self.llm)
        self.description = f"{self.llm._model.desc()}, {threads} threads"

    def step(self, input_ids, attention_mask, position_ids, state):
        """Prefill (state None) runs each row from an empty cache; a decode step continues the one
        sequence in the cache (state: its length)."""
        rows = input_ids.tolist()
        if state is None:
            logits = []
            for row in rows:
                self.llm.reset()
                logits.append(self._eval(row))
            return torch.stack(logits), (self.llm.n_tokens if len(rows) == 1 else None)
        if len(rows) != 1 or state != self.llm.n_tokens:
            raise RuntimeError("the llama.cpp backend continues one sequence at a time, the last one it prefilled")
        return self._eval(rows[0])[None], self.llm.n_tokens

    def _eval(self, tokens: list[int]) -> torch.Tensor:
        start = self.llm.n_tokens
        if start + len(tokens) > self.llm.n_ctx():
            raise UserError(f"{start + len(tokens)} tokens exceed the llama.cpp context of {self.llm.n_ctx()}: use shorter prompts or windows")
        self.llm.eval(tokens)
        return torch.from_numpy(self.llm.scores[start:start + len(tokens)].copy())
