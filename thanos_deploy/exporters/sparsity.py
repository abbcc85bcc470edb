"""Which ONNX weights are 2:4 along the GEMM reduction axis K: the rule TensorRT applies.

TensorRT marks a MatMul/Gemm "eligible for sparse math" when its constant weight has at least 2
zeros in every group of 4 consecutive elements along K. K of a MatMul's B [.., K, N] is axis -2
(of A [.., M, K], axis -1); K of a Gemm's B is axis 1 with transB=1, else 0. Weights reached
through Transpose (axes remapped by `perm`), Cast, Identity or Quantize/DequantizeLinear count
as the initializer they come from, as in Polygraphy's pruning tool.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from ..errors import UserError

PASS_THROUGH = {"Cast", "Identity", "QuantizeLinear", "DequantizeLinear"}


def two_four_along(weight: np.ndarray, axis: int) -> bool:
    """At least 2 zeros in every group of 4 along `axis` (which must be a multiple of 4)."""
    moved = np.moveaxis(weight, axis, -1)
    if moved.shape[-1] % 4 or moved.size == 0:
        return False
    groups = moved.reshape(-1, moved.shape[-1] // 4, 4)
    return bool(((groups == 0).sum(-1) >= 2).all())


def check_model(model) -> list[dict]:
    """One row per constant MatMul/Gemm weight: node, initializer, shape, K axis, 2:4 along K, density, bytes."""
    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=True)
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    producer = {out: node for node in graph.node for out in node.output}

    def source(name: str, axis: int):
        """Follow pass-through ops back to a constant; returns (constant name, axis in it) or None."""
        for _ in range(16):
            if name in constants:
                return name, axis
            node = producer.get(name)
            if node is None:
                return None
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                rank = len(constants[node.input[0]].dims) if node.input[0] in constants else None
                if perm is None and rank is not None:
                    perm = list(range(rank))[::-1]
                if perm is None:
                    return None
                axis = perm[axis]
            elif node.op_type not in PASS_THROUGH:
                return None
            name = node.input[0]
        return None

    rows = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        attrs = {a.name: a.i for a in node.attribute}
        for position, name in enumerate(node.input[:2]):
            if node.op_type == "Gemm":
                k = (0 if attrs.get("transB", 0) == 0 else 1) if position == 1 else (1 if attrs.get("transA", 0) == 0 else 0)
            else:
                k = -2 if position == 1 else -1
            found = source(name, k)
            if found is None:
                continue
            const, axis = found
            array = numpy_helper.to_array(constants[const])
            if array.ndim < 2:
                continue
            axis = axis % array.ndim
            rows.append({
                "node": node.name or node.output[0],
                "op": node.op_type,
                "initializer": const,
                "shape": list(array.shape),
                "k_axis": axis,
                "two_four": two_four_along(array, axis),
                "density": float(np.count_nonzero(array)) / array.size,
                "bytes": int(array.nbytes),
            })
    return rows


def check_file(path: str | Path) -> list[dict]:
    """`inspect model.onnx`: the rows of `check_model`, or one clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file '{path}' does not exist: check the path")
    if path.stat().st_size == 0:
        raise UserError(f"ONNX file '{path}' is empty: re-export it (thanos-deploy export onnx)")
    try:
        return check_model(path)
    except (DecodeError, ValueError, OSError) as e:
        raise UserError(f"'{path}' is not a readable ONNX model ({str(e).splitlines()[0]}): re-export it (thanos-deploy export onnx)") from None
