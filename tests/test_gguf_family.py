"""A GGUF of another family than SmolLM2's (Qwen2), written here with the `gguf` package from a tiny
random model plus SmolLM2's tokenizer metadata, goes through the same path: load, convert, prune."""

import gguf
import pytest
import torch

from thanos_deploy import compress_model, loading
from thanos_deploy.request import Pruning

from .conftest import random_ids, tiny_model

pytestmark = pytest.mark.slow  # the 49k-token tokenizer makes writing and reading the file take seconds


def write_gguf(model, path, tokenizer_from) -> None:
    """model's config and float32 tensors under llama.cpp's names, tokenizer fields copied from another GGUF."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), cfg.model_type)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    for key, field in gguf.GGUFReader(tokenizer_from).fields.items():
        if key.startswith("tokenizer."):
            if field.types[0] == gguf.GGUFValueType.ARRAY:
                writer.add_array(key, field.contents())
            else:
                writer.add_key_value(key, field.contents(), field.types[0])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[cfg.model_type.upper()], cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_qwen2_gguf_loads_converts_and_prunes(tmp_path, monkeypatch):
    monkeypatch.setenv("THANOS_DEPLOY_CACHE", str(tmp_path / "cache"))
    original = tiny_model("qwen2", vocab_size=49152, tie_word_embeddings=False)
    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(original, path, loading._smollm2_gguf())
    model, tokenizer = loading.load(str(path))
    assert model.config.model_type == "qwen2" and tokenizer is not None
    ids = torch.tensor([tokenizer("It is a truth universally acknowledged")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)  # float32 tensors: an exact round trip
    report = compress_model(model, random_ids(2, 32, vocab=49152), Pruning("thanos", "2:4"))
    assert report["sparsity"] == pytest.approx(0.5)
