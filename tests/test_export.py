"""ONNX export and the runtime backends: parity with PyTorch, the 2:4 K-axis rule, TensorRT helpers."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from thanos_deploy import compress_model
from thanos_deploy.errors import UserError
from thanos_deploy.exporters import sparsity
from thanos_deploy.exporters.onnx import write_artifact
from thanos_deploy.exporters.tensorrt import input_profiles, parse_shapes, parse_sparsity_log, trtexec_command
from thanos_deploy.patterns import parse_pattern
from thanos_deploy.request import Pruning
from thanos_deploy.runtime import open_backend
from thanos_deploy.runtime.ort import create_session

from .conftest import random_ids, run_cli, tiny_model

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except (ImportError, OSError):
    HAVE_TRT = False


# ---------------------------------------------------------------- the 2:4 rule along K


def two_four(shape, axis):
    """A weight that is 2:4 along `axis` and dense along the others."""
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) + 3
    moved = np.moveaxis(w, axis, -1)
    moved[..., 0::4] = 0
    moved[..., 1::4] = 0
    return np.ascontiguousarray(np.moveaxis(moved, -1, axis))


def graph_with(nodes, initializers):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])]
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes[-1:]]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, name) for name, a in initializers.items()])
    return helper.make_model(graph)


def rows_by_initializer(model):
    return {r["initializer"]: r for r in sparsity.check_model(model)}


def test_matmul_weight_is_checked_along_axis_0():
    good, bad = two_four((8, 6), 0), two_four((8, 6), 1)  # [K, N]: K is axis 0
    model = graph_with([helper.make_node("MatMul", ["x", "good"], ["y"]), helper.make_node("MatMul", ["x", "bad"], ["z"])], {"good": good, "bad": bad})
    rows = rows_by_initializer(model)
    assert rows["good"]["k_axis"] == 0 and rows["good"]["two_four"]
    assert not rows["bad"]["two_four"]


def test_gemm_trans_b_checks_axis_1():
    w = two_four((6, 8), 1)  # [N, K] with transB=1
    model = graph_with([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1), helper.make_node("Gemm", ["x", "w"], ["z"], transB=0)], {"w": w})
    rows = sparsity.check_model(model)
    assert [(r["k_axis"], r["two_four"]) for r in rows] == [(1, True), (0, False)]


def test_transposed_and_cast_weights_are_traced_to_the_initializer():
    w = two_four((6, 8), 1)  # stored [N, K]; Transpose(perm=[1, 0]) feeds MatMul as [K, N]
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("Cast", ["wt"], ["wc"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "wc"], ["y"]),
    ]
    rows = sparsity.check_model(graph_with(nodes, {"w": w}))
    assert rows == [{"node": "y", "op": "MatMul", "initializer": "w", "shape": [6, 8], "k_axis": 1, "two_four": True, "density": 0.5, "bytes": 192}]


def test_k_not_multiple_of_four_is_not_eligible():
    w = np.zeros((6, 5), dtype=np.float32)
    assert not sparsity.check_model(graph_with([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": w}))[0]["two_four"]


# ---------------------------------------------------------------- ONNX Runtime parity


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """Tiny Llama and OPT, 2:4-pruned, exported with and without past, fp32 and fp16."""
    out = {}
    for kind in ("llama", "opt"):
        model = tiny_model(kind)
        compress_model(model, random_ids(4, 32), Pruning("wanda", "2:4"))
        for past in (True, False):
            folder = tmp_path_factory.mktemp(f"{kind}-{past}") / "onnx"
            out[kind, past] = (model, folder, write_artifact(model, None, folder, dtype="fp32", with_past=past))
    return out


@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("past", [True, False])
def test_ort_matches_torch(tiny_exports, kind, past):
    model, folder, report = tiny_exports[kind, past]
    assert report["verification"]["max_abs_diff"] < 1e-4
    assert report["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ("past_key_values.0.key" in report["inputs"]) == past and ("present.0.value" in report["outputs"]) == past
    # independent check on real token ids, through the runtime interface
    ids = random_ids(2, 9, seed=4)
    with torch.no_grad():
        expected = model(ids).logits
    got, state = open_backend("ort", str(folder)).prefill(ids)
    assert (got - expected).abs().max() < 1e-4
    # the decoder's layers are 2:4 along K in the graph, the LM head is not
    assert report["two_four"]["two_four_along_k"] == report["two_four"]["weights"] - 1


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_ort_greedy_generation_equals_torch(tiny_exports, tmp_path, kind):
    model, folder, _ = tiny_exports[kind, True]
    model.save_pretrained(tmp_path / "ck")
    prompt = random_ids(1, 6, seed=11)
    torch_ids = open_backend("torch", str(tmp_path / "ck")).generate(prompt, 20)
    ort_ids = open_backend("ort", str(folder)).generate(prompt, 20)
    no_past_ids = open_backend("ort", str(tiny_exports[kind, False][1])).generate(prompt, 20)
    assert torch_ids.shape == (1, 26)
    assert torch.equal(torch_ids, ort_ids) and torch.equal(torch_ids, no_past_ids)
    with torch.no_grad():
        reference = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(torch_ids, reference)


def test_fp16_export_runs_in_ort(tmp_path):
    model = tiny_model()
    report = write_artifact(model, None, tmp_path / "fp16", dtype="fp16", with_past=True)
    graph = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    assert graph.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert report["verification"]["max_abs_diff"] < report["verification"]["tolerance"]
    ids = open_backend("ort", str(tmp_path / "fp16")).generate(random_ids(1, 5), 4)
    assert ids.shape == (1, 9)


@pytest.mark.parametrize("exporter", ["auto", "legacy"])
def test_shrunk_model_exports_with_smaller_initializers(tmp_path, exporter):
    from thanos_deploy.compact.shrink import shrink_model

    past = exporter == "auto"  # the legacy exporter is the fallback for graphs without a cache
    dense = tiny_model()
    write_artifact(dense, None, tmp_path / "dense", dtype="fp32", with_past=past, exporter=exporter)
    model = tiny_model()
    compress_model(model, random_ids(4, 32), Pruning("thanos", "structured:0.3", {"alpha": 0.1}))
    shrink_model(model, alpha=0.1)  # outlier rows: the compact linears add their extra columns
    report = write_artifact(model, None, tmp_path / "shrunk", dtype="fp32", with_past=past, exporter=exporter)
    assert report["exporter"] == ("dynamo" if past else "legacy")
    assert report["verification"]["max_abs_diff"] < 1e-4

    def initializer_bytes(folder):
        return sum(numpy_helper.to_array(i).nbytes for i in onnx.load(str(folder / "model.onnx")).graph.initializer)

    assert initializer_bytes(tmp_path / "shrunk") < initializer_bytes(tmp_path / "dense")
    assert gathers_along_axis_1(tmp_path / "shrunk") == []  # ONNX Runtime runs those an element at a time


def gathers_along_axis_1(folder) -> list[str]:
    """Gather/ScatterND nodes that move data along a non-leading axis (slow in ONNX Runtime)."""
    graph = onnx.load(str(folder / "model.onnx")).graph
    found = []
    for node in graph.node:
        axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if (node.op_type == "Gather" and axis not in (0,)) or node.op_type == "ScatterND":
            found.append(f"{node.op_type}(axis={axis}) {node.name}")
    return found


def test_packed_model_with_outlier_rows_exports(tmp_path):
    from thanos_deploy.compact.pack import pack_model

    model = tiny_model()
    compress_model(model, random_ids(4, 32), Pruning("thanos", "2:4", {"alpha": 0.1}))
    pack_model(model, parse_pattern("2:4"), alpha=0.1)  # outlier rows: outputs put back in row order
    report = write_artifact(model, None, tmp_path / "packed", dtype="fp32", with_past=True)
    assert report["verification"]["max_abs_diff"] < 1e-4
    assert report["two_four"]["two_four_along_k"] > 0
    assert gathers_along_axis_1(tmp_path / "packed") == []


def test_requested_provider_must_be_active(tiny_exports):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has CUDA: the refusal path cannot be shown here")
    _, folder, _ = tiny_exports["llama", True]
    with pytest.raises(UserError, match="did not start CUDAExecutionProvider"):
        create_session(folder / "model.onnx", "cuda")
    assert create_session(folder / "model.onnx", "cpu").get_providers()[0] == "CPUExecutionProvider"


# ---------------------------------------------------------------- TensorRT helpers (no TensorRT needed)

RECORDED_LOG = [
    "[11/28/2026-10:00:01] [TRT] [I] Local timing cache in use. Profiling results in this builder pass will not be stored.",
    "[11/28/2026-10:00:05] [TRT] [I] (Sparsity) Layers eligible for sparse math: /model/layers.0/mlp/down_proj/MatMul, "
    "/model/layers.0/mlp/up_proj/MatMul, /model/layers.0/self_attn/q_proj/MatMul",
    "[11/28/2026-10:00:09] [TRT] [I] (Sparsity) TRT inference plan picked sparse implementation for layers: /model/layers.0/mlp/up_proj/MatMul",
    "[11/28/2026-10:00:09] [TRT] [I] Engine generation completed in 8.1 seconds.",
]


def test_tensorrt_log_parser():
    parsed = parse_sparsity_log(RECORDED_LOG)
    assert parsed["eligible"] == ["/model/layers.0/mlp/down_proj/MatMul", "/model/layers.0/mlp/up_proj/MatMul", "/model/layers.0/self_attn/q_proj/MatMul"]
    assert parsed["picked_sparse"] == ["/model/layers.0/mlp/up_proj/MatMul"]
    assert parsed["eligible_not_picked"] == ["/model/layers.0/mlp/down_proj/MatMul", "/model/layers.0/self_attn/q_proj/MatMul"]
    assert parse_sparsity_log(["nothing here"]) == {"eligible": [], "picked_sparse": [], "eligible_not_picked": []}


def test_tensorrt_profiles_and_trtexec_line(tmp_path):
    shapes = parse_shapes("batch=1:2:4,past=0:64:256")
    profiles = input_profiles({"input_ids": ["b", "s"], "attention_mask": ["b", "t"], "position_ids": ["b", "s"],
                               "past_key_values.0.key": ["b", 3, "p", 64]}, shapes)
    assert profiles["attention_mask"] == ((1, 1), (2, 192), (4, 768))
    assert profiles["past_key_values.0.key"] == ((1, 3, 0, 64), (2, 3, 64, 64), (4, 3, 256, 64))
    line = trtexec_command(tmp_path / "m.onnx", tmp_path / "m.plan", profiles, sparse=True, fp16_flag=False, workspace_mib=2048, timing_cache=tmp_path / "c")
    assert "--sparsity=enable" in line and "--fp16" not in line and "--minShapes=input_ids:1x1," in line
    with pytest.raises(UserError, match="min <= opt <= max"):
        parse_shapes("seq=8:4:16")


def test_tensorrt_commands_fail_clearly_without_tensorrt(tiny_exports, tmp_path):
    if HAVE_TRT:
        pytest.skip("TensorRT is installed here")
    _, folder, _ = tiny_exports["llama", True]
    for args in (["build-engine", str(folder), "--out", str(tmp_path / "e.plan")],
                 ["generate", str(tmp_path / "e.plan"), "--backend", "tensorrt", "--prompt", "hi"]):
        r = run_cli(*args)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "TensorRT is not available" in lines[0] and "NVIDIA GPU" in lines[0], r.stderr
    assert not (tmp_path / "e.plan").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (it needs an NVIDIA GPU and NVIDIA's TensorRT libraries); this path is not run by CI")
def test_tensorrt_engine_generates_like_torch(tiny_exports, tmp_path):
    from thanos_deploy.exporters.tensorrt import build_engine

    model, folder, _ = tiny_exports["llama", True]
    fp16 = tmp_path / "fp16"
    write_artifact(model, None, fp16, dtype="fp16", with_past=True)
    report = build_engine(fp16 / "model.onnx", tmp_path / "e.plan", shapes="batch=1:1:2,seq=1:16:64,past=0:16:64")
    assert json.loads((tmp_path / "e.json").read_text())["trtexec"].startswith("trtexec")
    assert report["sparsity"]["eligible"] is not None
    ids = open_backend("tensorrt", str(tmp_path / "e.plan")).generate(random_ids(1, 5), 8)
    assert ids.shape == (1, 13)
