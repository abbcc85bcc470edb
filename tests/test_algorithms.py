"""Thanos and SparseGPT against the math: direct solves in float64, constraints, invariants."""

import math
import warnings

import pytest
import torch

from thanos_deploy import compress_model, prune_weight
from thanos_deploy.errors import UserError
from thanos_deploy.methods import get_method, sparsegpt, thanos
from thanos_deploy.methods.hessian import inverse_cholesky, trailing_inverse
from thanos_deploy.methods.stats import Stats
from thanos_deploy.patterns import parse_pattern
from thanos_deploy.request import Pruning

from .conftest import random_ids, tiny_model

F64 = torch.float64


def problem(rows=16, cols=64, tokens=400, seed=0, dtype=F64):
    """A weight and correlated inputs with uneven column scales, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=dtype) * 0.5
    X = torch.randn(tokens, cols, generator=g, dtype=dtype) @ mix + torch.randn(tokens, cols, generator=g, dtype=dtype) * torch.linspace(0.2, 3, cols, dtype=dtype)
    W = torch.randn(rows, cols, generator=g, dtype=dtype)
    return W, X, Stats(sq_norms=(X**2).sum(0), hessian=X.T @ X, tokens=tokens)


def damped(H, percdamp=0.01):
    return H + percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)


def error(W, new, X):
    return float(((new - W) @ X.T).norm())


# ---------------------------------------------------------------- Cholesky identities


def test_trailing_inverse_matches_direct_inverse():
    _, _, st = problem(cols=48)
    H = damped(st.hessian)
    U = inverse_cholesky(st.hessian, 0.01)
    for i in (0, 5, 17, 47):
        direct = torch.linalg.inv(H[i:, i:])
        assert torch.allclose(trailing_inverse(U, i), direct, rtol=1e-6, atol=1e-6 * direct.abs().max())
        assert torch.allclose(trailing_inverse(U, i, i + 8), direct[:8, :8], rtol=1e-6, atol=1e-6 * direct.abs().max())


# ---------------------------------------------------------------- Thanos


@pytest.mark.parametrize("largest", [40, 300])  # 300: several cache-sized batches, solved concurrently on CPU
def test_principal_solves_equal_direct_solves(largest):
    g = torch.Generator().manual_seed(0)
    width, rows = 320, 30
    A = torch.randn(width, width + 10, generator=g, dtype=F64)
    M = A @ A.T / width + 0.1 * torch.eye(width, dtype=F64)
    rhs = torch.randn(rows, width, generator=g, dtype=F64)
    counts = torch.randint(0, largest + 1, (rows,), generator=g)
    counts[0], counts[1] = 0, largest  # an empty row and a full-size one
    mask = torch.stack([torch.randperm(width, generator=g) < c for c in counts])
    x = thanos._principal_solve(M, rhs, mask, row_batch=7)
    for r in range(rows):
        i = mask[r]
        expected = torch.zeros(width, dtype=F64)
        if i.any():
            expected[i] = torch.linalg.solve(M[i][:, i], rhs[r, i])
        assert torch.allclose(x[r], expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max().clamp(min=1)))


@pytest.mark.parametrize("sparsity", [0.5, 0.8])  # 0.8: most rows prune more than half (the |k|-sized solve)
def test_thanos_single_block_is_global_wanda_mask_plus_exact_least_squares(sparsity):
    W, X, st = problem(rows=12, cols=40)
    new = thanos.prune(W, st, parse_pattern(f"unstructured:{sparsity}"), block_size=64)
    # independent computation: global Wanda mask, then per row min ‖(w'-w)X‖²_H s.t. w'[q] = 0
    score = W.abs() * X.norm(dim=0)
    k = math.floor(sparsity * W.numel())
    mask = torch.zeros(W.numel(), dtype=torch.bool)
    mask[torch.argsort(score.flatten(), stable=True)[:k]] = True
    mask = mask.view_as(W)
    H = damped(st.hessian)
    expected = torch.zeros_like(W)
    for r in range(W.shape[0]):
        keep = ~mask[r]
        # normal equations of the kept coordinates: w'_k H_kk = w H_{:,k}
        expected[r, keep] = torch.linalg.solve(H[keep][:, keep], (W[r] @ H[:, keep]))
    assert torch.equal(new == 0, mask)
    assert float((new - expected).norm() / expected.norm()) < 1e-4


@pytest.mark.parametrize("pattern", ["unstructured:0.5", "unstructured:0.37", "2:4", "4:8", "1:4", "structured:0.3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thanos_update_beats_same_mask_without_update(pattern, seed):
    W, X, st = problem(rows=24, cols=64, seed=seed)
    new = thanos.prune(W, st, parse_pattern(pattern), block_size=16, alpha=0.0)
    assert error(W, new, X) <= error(W, W.masked_fill(new == 0, 0), X)


def test_thanos_constraints_unstructured():
    W, _, st = problem(rows=20, cols=64, dtype=torch.float32)
    for p in (0.1, 0.5, 0.73):
        new = thanos.prune(W, st, parse_pattern(f"unstructured:{p}"), block_size=16)
        assert int((new == 0).sum()) == math.floor(p * W.numel())


@pytest.mark.parametrize("pattern, alpha", [("2:4", 0.0), ("2:4", 0.1), ("4:8", 0.2), ("3:8", 0.0), ("1:3", 0.15)])
def test_thanos_nm_strict_on_non_outlier_rows(pattern, alpha):
    W, _, st = problem(rows=40, cols=48, dtype=torch.float32)
    patt = parse_pattern(pattern)
    new = thanos.prune(W, st, patt, block_size=24, alpha=alpha)
    zeros = (new.view(40, -1, patt.m) == 0).sum(-1)
    nm_rows = (zeros >= patt.n).all(1)
    unchanged = (new == W).all(1)
    dense = math.floor(alpha * 40)
    assert int((~nm_rows).sum()) == dense and int(unchanged.sum()) == dense
    assert torch.equal(~nm_rows, unchanged)
    # the dense rows are those with the largest Σ_j W_ij²‖X_j‖²
    score = (W.square() * st.sq_norms).sum(1)
    assert set(torch.nonzero(unchanged).flatten().tolist()) == set(torch.argsort(score, descending=True)[:dense].tolist())


@pytest.mark.parametrize("p, alpha, cols, expected_s", [(0.3, 0.1, 128, 43), (0.3, 0.0, 128, 39), (0.6, 0.5, 128, 127)])
def test_thanos_structured_column_count_and_shape(p, alpha, cols, expected_s):
    W, _, st = problem(rows=30, cols=cols, dtype=torch.float32)
    new = thanos.prune(W, st, parse_pattern(f"structured:{p}"), alpha=alpha)
    dense = (new == W).all(1)
    assert int(dense.sum()) == math.floor(alpha * 30)
    zero_cols = (new[~dense] == 0).all(0)
    assert int(zero_cols.sum()) == expected_s
    assert torch.equal(new[~dense] == 0, zero_cols.expand_as(new[~dense]))  # same columns in every row
    assert (new[dense] != 0).all()


def test_alpha_defaults_and_range():
    m = get_method("thanos")
    assert m.options(parse_pattern("structured:0.3"), {})["alpha"] == 0.1
    assert m.options(parse_pattern("2:4"), {})["alpha"] == 0.0
    assert m.options(parse_pattern("unstructured:0.5"), {})["alpha"] == 0.0
    for bad in (-0.1, 0.6):
        with pytest.raises(UserError, match=r"\[0, 0.5\]"):
            m.options(parse_pattern("2:4"), {"alpha": bad})
    with pytest.raises(UserError, match="N:M and structured"):
        m.options(parse_pattern("unstructured:0.5"), {"alpha": 0.1})
    with pytest.raises(UserError, match="multiple of M=8"):
        m.options(parse_pattern("4:8"), {"block_size": 100})


def test_statistics_use_every_calibration_batch():
    """The reference keeps only the last sample for row/column scores; we use all of them."""
    W, X, _ = problem(rows=20, cols=32, tokens=600, dtype=torch.float32)
    X[:300, :8] *= 20  # the first half of the data makes columns 0..7 important
    whole = Stats.from_inputs(X)
    batched = Stats.from_inputs(X[:300])
    batched.add(X[300:])
    last_only = Stats.from_inputs(X[300:])
    patt = parse_pattern("structured:0.25")
    a = thanos.prune(W, whole, patt, alpha=0.1)
    b = thanos.prune(W, batched, patt, alpha=0.1)
    c = thanos.prune(W, last_only, patt, alpha=0.1)
    assert torch.equal(a == 0, b == 0) and torch.allclose(a, b, atol=1e-4)
    assert not torch.equal(a == 0, c == 0)


# ---------------------------------------------------------------- SparseGPT


def direct_sparsegpt(W, H, pattern, block_size):
    """Sequential OBS, one column at a time, with explicit inverses of the trailing Hessians."""
    W = W.clone()
    rows, cols = W.shape
    inv = [torch.linalg.inv(H[i:, i:]) for i in range(cols)]
    d2 = torch.tensor([inv[i][0, 0] for i in range(cols)], dtype=W.dtype)  # [(H_{F_i})^-1]_ii
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        if pattern == "unstructured":
            sal = W[:, i1:i2] ** 2 / d2[i1:i2]
            thresh = torch.sort(sal.flatten()).values[int(sal.numel() * 0.5)]
            mask[:, i1:i2] = sal <= thresh
        for i in range(i1, i2):
            if pattern == "2:4" and (i - i1) % 4 == 0:
                sal = W[:, i : i + 4] ** 2 / d2[i : i + 4]
                mask[:, i : i + 4] = False
                mask[:, i : i + 4].scatter_(1, torch.argsort(sal, dim=1, stable=True)[:, :2], True)
            for r in torch.nonzero(mask[:, i]).flatten():
                W[r, i:] -= W[r, i] / inv[i][0, 0] * inv[i][0, :]
                W[r, i] = 0.0
    return W


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_equals_direct_sequential_obs(pattern):
    W, X, st = problem(rows=10, cols=32)
    spec = "unstructured:0.5" if pattern == "unstructured" else "2:4"
    new = sparsegpt.prune(W, st, parse_pattern(spec), block_size=8)
    expected = direct_sparsegpt(W, damped(st.hessian), pattern, 8)
    assert torch.equal(new == 0, expected == 0)
    assert torch.allclose(new, expected, rtol=1e-8, atol=1e-8)


def test_sparsegpt_structured_zeroes_whole_columns_per_block():
    W, _, st = problem(rows=12, cols=64, dtype=torch.float32)
    new = sparsegpt.prune(W, st, parse_pattern("structured:0.25"), block_size=32)
    zero_cols = (new == 0).all(0)
    assert int(zero_cols[:32].sum()) == 8 and int(zero_cols[32:].sum()) == 8


# ---------------------------------------------------------------- numerics, dtypes, devices


def test_damping_retries_then_fails_clearly():
    W, _, st = problem(cols=16, dtype=torch.float32)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    eigs = torch.linspace(1, 10, 16)
    eigs[0] = -0.3  # mean(diag) = 5.5: 1 % damping (0.055) is not enough, 10 % (0.55) is
    bad = Stats(st.sq_norms, Q @ torch.diag(eigs) @ Q.T, st.tokens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = thanos.prune(W, bad, parse_pattern("2:4"))
    assert torch.isfinite(new).all()
    assert any("retrying with percdamp=0.1" in str(w.message) for w in caught)
    hopeless = Stats(st.sq_norms, -torch.eye(16) * 1e6 + torch.diag(torch.ones(16)), st.tokens)
    with pytest.raises(UserError, match="could not be factorised"):
        sparsegpt.prune(W, hopeless, parse_pattern("2:4"))


def test_dead_inputs_are_zeroed_without_nans():
    W, X, _ = problem(cols=16, dtype=torch.float32)
    X[:, 3] = 0
    for method in ("thanos", "sparsegpt"):
        new = prune_weight(W, X, Pruning(method, "2:4"))
        assert torch.isfinite(new).all() and (new[:, 3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["thanos", "sparsegpt"])
def test_half_precision_layers(method, dtype):
    model = tiny_model().to(dtype)
    compress_model(model, random_ids(2, 16), Pruning(method, "2:4"))
    w = model.model.layers[1].mlp.down_proj.weight
    assert w.dtype == dtype and torch.isfinite(w).all()
    assert ((w.view(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()


def test_driver_names_the_layer_in_warnings():
    model = tiny_model()
    ids = torch.zeros(2, 16, dtype=torch.long)  # one repeated token: rank-deficient Hessians
    report = compress_model(model, ids, Pruning("thanos", "2:4", {"percdamp": 1e-6}))
    messages = [w for layer in report["layers"] for e in layer["linears"] for w in e.get("warnings", [])]
    assert messages and all(m.startswith("layers.") for m in messages)
    assert any("retrying" in m for m in messages) and any("rank-deficient Hessian" in m for m in messages)
    with pytest.raises(UserError, match=r"^layers\.0\.self_attn\.q_proj: the Hessian could not be factorised"):
        compress_model(tiny_model(), ids, Pruning("sparsegpt", "2:4", {"percdamp": 1e-30}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("method", ["thanos", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured:0.5", "2:4", "structured:0.3"])
def test_cuda_matches_cpu(method, pattern):
    W, X, _ = problem(rows=64, cols=128, tokens=512, dtype=torch.float32)
    cpu = prune_weight(W, X, Pruning(method, pattern, {"block_size": 32}))
    gpu = prune_weight(W.cuda(), X.cuda(), Pruning(method, pattern, {"block_size": 32}))
    assert gpu.is_cuda
    agree = float(((gpu.cpu() == 0) == (cpu == 0)).float().mean())
    assert agree > 0.99
    assert error(W, gpu.cpu(), X) <= 1.01 * error(W, cpu, X)
