"""Shrunk and packed checkpoints: exact math, round trips, sizes, and damaged files."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from thanos_deploy import compress_model, load, models
from thanos_deploy.artifact import Manifest, save
from thanos_deploy.compact.linear import CompactLinear
from thanos_deploy.compact.pack import pack, pack_model, unpack
from thanos_deploy.compact.shrink import shrink_model
from thanos_deploy.errors import UserError
from thanos_deploy.inspection import inspect_model
from thanos_deploy.patterns import parse_pattern
from thanos_deploy.request import Pruning

from .conftest import random_ids, run_cli, tiny_model

INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def nm_weight(rows, cols, n, m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    groups = w.view(rows, cols // m, m)
    groups.scatter_(-1, torch.rand(rows, cols // m, m, generator=g).argsort(-1)[..., :n], 0.0)
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_round_trip_is_bit_exact(dtype):
    w = nm_weight(16, 64, 2, 4, dtype)
    w[0, :4] = torch.tensor([-0.0, 0.0, 0.0, 3.0])  # more than two zeros, one negative
    w[1, :8] = torch.tensor([0.0, 0.0, 0.0, 0.0, -0.0, -0.0, 0.0, 0.0])
    w[2, 4:8] = torch.tensor([0.0, -0.0, 1.5, 0.0])
    values, meta = pack(w, 2, 4)
    assert values.shape == (16, 32) and values.dtype == dtype
    assert meta.shape == (16, 8) and meta.dtype == torch.uint8  # 2 bits per kept value
    back = unpack(values, meta, 2, 4, 64)
    assert torch.equal(back.view(INT[dtype]), w.view(INT[dtype]))


def test_pack_byte_layout_for_2_4():
    w = torch.tensor([[0.0, 7.0, 0.0, 9.0, 1.0, 2.0, 0.0, 0.0]])
    values, meta = pack(w, 2, 4)
    assert values.tolist() == [[7.0, 9.0, 1.0, 2.0]]
    # positions 1, 3, 0, 1 at bits 0-1, 2-3, 4-5, 6-7
    assert meta.tolist() == [[1 | 3 << 2 | 0 << 4 | 1 << 6]]


@pytest.mark.parametrize("n, m", [(4, 8), (1, 4), (5, 8), (2, 3)])
def test_pack_other_nm(n, m):
    w = nm_weight(5, m * 6, n, m, torch.float32)
    assert torch.equal(unpack(*pack(w, n, m), n, m, m * 6), w)


def test_pack_rejects_a_weight_that_is_not_nm():
    w = nm_weight(4, 16, 2, 4, torch.float32)
    w[2, 1:3] = 1.0
    with pytest.raises(UserError, match="not 2:4"):
        pack(w, 2, 4)


@pytest.mark.parametrize("index, dense, bias", [(True, False, False), (True, True, True), (False, True, False), (False, False, True)])
def test_compact_linear_equals_dense(index, dense, bias):
    torch.manual_seed(0)
    W = torch.randn(24, 40)
    b = torch.randn(24) if bias else None
    kept = torch.randperm(40)[:28].sort().values if index else None
    rows = torch.tensor([3, 17, 5]) if dense else None
    if kept is not None:
        pruned = torch.ones(40, dtype=torch.bool)
        pruned[kept] = False
        main = torch.ones(24, dtype=torch.bool)
        if rows is not None:
            main[rows] = False
        W[main.nonzero().squeeze(1).unsqueeze(1), pruned.nonzero().squeeze(1)] = 0
    if kept is not None:
        module = CompactLinear.shrunk(W, b, in_index=kept, dense_rows=rows)
    else:
        module = CompactLinear.packed_rows(W, b, dense_rows=rows, pattern=(2, 4))
    x = torch.randn(3, 5, 40)
    assert torch.allclose(module(x), F.linear(x, W, b), atol=1e-5)
    assert torch.equal(module.dense(), W)


@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_shrink_matches_masked_model_and_reloads(tmp_path, kind, alpha):
    model = tiny_model(kind)
    compress_model(model, random_ids(4, 32), Pruning("thanos", "structured:0.3", {"alpha": alpha}))
    ids = random_ids(2, 24, seed=7)
    with torch.no_grad():
        masked = model(ids).logits
    producers, consumer = models.mlp(models.linears(models.decoder_layers(model)[0]))
    specs = shrink_model(model, alpha=alpha)
    layer0 = models.decoder_layers(model)[0]
    down = layer0.get_submodule(consumer)
    if alpha == 0:  # narrowed MLP: no gather, producers lose the dropped channels
        assert type(down) is torch.nn.Linear and down.in_features % 8 == 0 and down.in_features < 128
        assert all(layer0.get_submodule(p).out_features == down.in_features for p in producers)
    else:
        assert isinstance(down, CompactLinear) and len(down.dense_rows) == math.floor(0.1 * 64)
    for spec in specs.values():
        if "kept_rounded" in spec:
            assert spec["kept_rounded"] % 8 == 0 and spec["kept_rounded"] >= spec["kept"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, masked, atol=1e-5)
    out = tmp_path / "shrunk"
    save(model, None, out, Manifest(storage="shrunk", modules=specs, pattern="structured:0.3"))
    reloaded, _ = load(str(out))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, masked, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_packed_checkpoint_round_trip_and_size(tmp_path, alpha):
    model = tiny_model().to(torch.float16)
    compress_model(model, random_ids(4, 32), Pruning("thanos", "2:4", {"alpha": alpha}))
    ids = random_ids(1, 16, seed=3)
    with torch.no_grad():
        masked = model(ids).logits
    specs = pack_model(model, parse_pattern("2:4"), alpha=alpha)
    out = tmp_path / "packed"
    save(model, None, out, Manifest(storage="packed", modules=specs, pattern="2:4"))
    reloaded, _ = load(str(out))  # CPU: dense-with-zeros
    for name, spec in specs.items():  # the weights come back bit for bit
        assert torch.equal(reloaded.get_submodule(name).dense(), model.get_submodule(name).dense()), name
    with torch.no_grad():  # (a fresh fp16 model keeps its rotary frequencies in fp32: rounding-level differences)
        assert torch.allclose(reloaded(ids).logits, masked, atol=2e-3)
    report = inspect_model(reloaded, Manifest.read(out))
    # 2:4 rows: half the values + 2 bits each (0.5625x); outlier rows stay dense
    assert report["totals"]["bytes"] <= (0.57 * (1 - alpha) + alpha + 0.01) * report["totals"]["dense_bytes"]
    d = sum(r["outlier_rows"] for r in report["rows"])
    assert (d == 0) == (alpha == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here); on CPU packed weights load dense-with-zeros")
def test_packed_weights_use_semi_structured_kernels_on_cuda(tmp_path):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("semi-structured sparsity needs compute capability >= 8.0")
    model = tiny_model(hidden_size=128, intermediate_size=256).to(torch.float16)
    compress_model(model, random_ids(4, 32), Pruning("wanda", "2:4"))
    ids = random_ids(2, 64, seed=3)
    with torch.no_grad():
        masked = model.cuda()(ids.cuda()).logits.float().cpu()
    model.cpu()
    specs = pack_model(model, parse_pattern("2:4"))
    save(model, None, tmp_path / "p", Manifest(storage="packed", modules=specs, pattern="2:4"))
    reloaded, _ = load(str(tmp_path / "p"), device="cuda")
    down = models.decoder_layers(reloaded)[0].mlp.down_proj
    assert type(down.weight.data) is not torch.Tensor  # SparseSemiStructuredTensor
    with torch.no_grad():
        out = reloaded(ids.cuda()).logits.float().cpu()
    assert (out - masked).abs().max() < 5e-2


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def masked_2of4(tmp_path_factory, tiny_folder):
    text = tmp_path_factory.mktemp("text") / "c.txt"
    text.write_text("It is a truth universally acknowledged. " * 300)
    out = tmp_path_factory.mktemp("ck") / "m"
    r = run_cli("compress", str(tiny_folder), "--method", "wanda", "--pattern", "2:4", "--calib", str(text),
                "--nsamples", "2", "--seqlen", "64", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def clean_failure(r, out, match):
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_cli_pack_then_inspect(tmp_path, masked_2of4):
    out = tmp_path / "p"
    r = run_cli("pack", str(masked_2of4), "--out", str(out), "--save-dtype", "float16")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "thanos_deploy.json").read_text())["storage"] == "packed"
    r = run_cli("inspect", str(out), "--json")
    result = json.loads(r.stdout)
    assert all(row["storage"] == "packed 2:4" and row["two_four"] for row in result["rows"])
    assert result["totals"]["bytes"] <= 0.57 * result["totals"]["dense_bytes"]


def test_cli_shrink_on_non_structured_checkpoint(tmp_path, masked_2of4):
    out = tmp_path / "s"
    clean_failure(run_cli("shrink", str(masked_2of4), "--out", str(out)), out, "--shrink needs a structured pattern")


def test_cli_pack_on_weights_that_violate_2_4(tmp_path, tiny_folder):
    out = tmp_path / "p"
    clean_failure(run_cli("pack", str(tiny_folder), "--pattern", "2:4", "--out", str(out)), out, "violates 2:4")


def test_cli_damaged_checkpoints(tmp_path, masked_2of4):
    import shutil

    packed = tmp_path / "p"
    assert run_cli("pack", str(masked_2of4), "--out", str(packed)).returncode == 0
    for damage, match in [("truncate", "does not match the hash"), ("flip", "does not match the hash"), ("manifest", "disagree with")]:
        bad = tmp_path / damage
        shutil.copytree(packed, bad)
        weights = bad / "model.safetensors"
        if damage == "truncate":
            weights.write_bytes(weights.read_bytes()[:-1000])
        elif damage == "flip":
            data = bytearray(weights.read_bytes())
            data[len(data) // 2] ^= 0xFF
            weights.write_bytes(bytes(data))
        else:
            manifest = json.loads((bad / "thanos_deploy.json").read_text())
            name = next(iter(manifest["modules"]))
            manifest["modules"][name]["out_features"] += 8
            (bad / "thanos_deploy.json").write_text(json.dumps(manifest))
        out = tmp_path / f"{damage}-out"
        clean_failure(run_cli("shrink", str(bad), "--out", str(out), "--pattern", "2:4"), out, "already packed")
        r = run_cli("inspect", str(bad))
        assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr
