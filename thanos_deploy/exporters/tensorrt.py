"""Build a TensorRT engine from an exported ONNX decoder, with 2:4 sparse weights enabled.

Written against TensorRT's documented Python API (10.x, and 11.x where precision comes from the
ONNX types: there is no FP16 flag, so export with --dtype fp16). This path needs an NVIDIA GPU
and TensorRT's libraries; it has not been run by this project's CI (TensorRT cannot be installed
there). The pieces that need no TensorRT (shape profiles, the trtexec line, the log parser) are
plain functions and are tested.

The report says which layers TensorRT found eligible for sparse math and which picked a sparse
tactic, parsed from the builder log:
    (Sparsity) Layers eligible for sparse math: a, b, c
    (Sparsity) TRT inference plan picked sparse implementation for layers: b, c
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..artifact import check_output
from ..errors import UserError
from ..loading import onnx_file
from ..runtime.tensorrt import require_tensorrt

ELIGIBLE = re.compile(r"\(Sparsity\) Layers eligible for sparse math:\s*(.*)$")
PICKED = re.compile(r"\(Sparsity\) TRT inference plan picked sparse implementation for layers:\s*(.*)$")


def parse_sparsity_log(lines: list[str]) -> dict:
    """Eligible / picked layer names from TensorRT builder log lines, and the layers in neither."""
    eligible, picked = [], []
    for line in lines:
        for pattern, bucket in ((ELIGIBLE, eligible), (PICKED, picked)):
            if m := pattern.search(line.strip()):
                bucket += [name.strip() for name in m.group(1).split(",") if name.strip()]
    return {
        "eligible": eligible,
        "picked_sparse": picked,
        "eligible_not_picked": [n for n in eligible if n not in picked],
    }


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int


DEFAULT_SHAPES = {"batch": Range(1, 1, 4), "seq": Range(1, 128, 512), "past": Range(0, 128, 1024)}


def parse_shapes(spec: str | None) -> dict[str, Range]:
    """'batch=1:1:4,seq=1:128:512,past=0:128:1024' (any subset; the rest keep their defaults)."""
    shapes = dict(DEFAULT_SHAPES)
    for part in filter(None, (spec or "").split(",")):
        name, _, values = part.partition("=")
        try:
            lo, opt, hi = (int(v) for v in values.split(":"))
        except ValueError:
            raise UserError(f"bad --shapes entry '{part}': use name=min:opt:max, e.g. seq=1:128:512") from None
        if name.strip() not in shapes or not 0 <= lo <= opt <= hi:
            raise UserError(f"bad --shapes entry '{part}': names are batch, seq, past and min <= opt <= max")
        shapes[name.strip()] = Range(lo, opt, hi)
    if shapes["batch"].min < 1 or shapes["seq"].min < 1:
        raise UserError("--shapes: batch and seq must be at least 1")
    return shapes


def input_profiles(onnx_inputs: dict[str, list], shapes: dict[str, Range]) -> dict[str, tuple]:
    """(min, opt, max) shapes of every graph input, from the batch/seq/past ranges.

    `onnx_inputs` maps input names to their ONNX dims (ints for static dims, strings otherwise).
    """
    out = {}
    for name, dims in onnx_inputs.items():
        per_bound = []
        for bound in ("min", "opt", "max"):
            b, s, p = (getattr(shapes[k], bound) for k in ("batch", "seq", "past"))
            if name in ("input_ids", "position_ids"):
                per_bound.append((b, s))
            elif name == "attention_mask":
                per_bound.append((b, p + s))
            elif name.startswith("past_key_values."):
                per_bound.append((b, int(dims[1]), p, int(dims[3])))
            else:
                raise UserError(f"ONNX input '{name}' is not one of the decoder inputs this tool exports")
        out[name] = tuple(per_bound)
    return out


def trtexec_command(onnx: Path, plan: Path, profiles: dict[str, tuple], *, sparse: bool, fp16_flag: bool, workspace_mib: int, timing_cache: Path) -> str:
    """The equivalent trtexec command line."""
    def shape_arg(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, shape[i]))}" for name, shape in profiles.items())

    parts = [
        "trtexec", f"--onnx={onnx}", f"--saveEngine={plan}",
        f"--minShapes={shape_arg(0)}", f"--optShapes={shape_arg(1)}", f"--maxShapes={shape_arg(2)}",
        f"--memPoolSize=workspace:{workspace_mib}M", f"--timingCacheFile={timing_cache}",
    ]
    if sparse:
        parts.append("--sparsity=enable")
    if fp16_flag:
        parts.append("--fp16")
    return " ".join(parts)


def onnx_inputs(path: Path) -> dict[str, list]:
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return {
        i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input if i.name not in initializers
    }


def onnx_is_fp16(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for o in model.graph.output)


def build_engine(onnx_path: Path, plan_path: Path, *, sparse: bool = True, shapes: str | None = None, workspace_mib: int = 4096) -> dict:
    """Build and save `plan_path`, its timing cache and `<plan>.json` report."""
    trt = require_tensorrt()
    major = int(trt.__version__.split(".")[0])
    fp16_graph = onnx_is_fp16(onnx_path)
    fp16_flag = major <= 10 and not fp16_graph  # TRT 11 has no FP16 flag: precision is the ONNX's
    if major >= 11 and not fp16_graph:
        raise UserError("TensorRT 11 takes precision from the ONNX: export with --dtype fp16 for fp16 sparse tensor cores")
    profiles = input_profiles(onnx_inputs(onnx_path), parse_shapes(shapes))

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity, msg):
            self.lines.append(msg)
            if severity <= trt.ILogger.Severity.WARNING:
                print(f"[TensorRT] {msg}")

    logger = Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # the path API keeps external data working
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse '{onnx_path}': {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = plan_path.with_suffix(".timing-cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT failed to build an engine from '{onnx_path}': {' | '.join(logger.lines[-3:])}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    tmp.write_bytes(bytes(plan))
    tmp.replace(plan_path)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    report = {
        "tensorrt": trt.__version__,
        "onnx": str(onnx_path),
        "plan": str(plan_path),
        "sparse_weights": sparse,
        "fp16": fp16_graph or fp16_flag,
        "profiles": {name: [list(s) for s in shape] for name, shape in profiles.items()},
        "sparsity": parse_sparsity_log(logger.lines),
        "trtexec": trtexec_command(onnx_path, plan_path, profiles, sparse=sparse, fp16_flag=fp16_flag, workspace_mib=workspace_mib, timing_cache=cache_path),
    }
    plan_path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_engine_from(source: str | Path, out: Path, *, sparse: bool = True, shapes: str | None = None, workspace_mib: int = 4096,
                      overwrite: bool = False) -> dict:
    """`build-engine`: check the ONNX path, the shapes and the output before TensorRT is needed, then build."""
    path = onnx_file(source)
    parse_shapes(shapes)
    check_output(out, overwrite)
    require_tensorrt()
    return build_engine(path, out, sparse=sparse, shapes=shapes, workspace_mib=workspace_mib)
