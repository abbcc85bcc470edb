"""Magnitude and Wanda against their definitions, on small matrices."""

import torch

from thanos_deploy import prune_weight
from thanos_deploy.errors import UserError
from thanos_deploy.request import Pruning


def test_wanda_unstructured_is_per_row_smallest_score():
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    x = torch.randn(200, 32) * torch.linspace(0.1, 3, 32)
    new = prune_weight(w, x, Pruning("wanda", "unstructured:0.25"))
    score = w.abs() * x.norm(dim=0)
    for r in range(8):
        expected = set(torch.argsort(score[r])[:8].tolist())
        assert set(torch.nonzero(new[r] == 0).flatten().tolist()) == expected
    kept = new != 0
    assert torch.equal(new[kept], w[kept])  # Wanda never updates the kept weights


def test_wanda_2_4_uses_input_norms():
    w = torch.ones(1, 4)
    x = torch.diag(torch.tensor([1.0, 5.0, 0.5, 2.0]))  # column norms 1, 5, 0.5, 2
    new = prune_weight(w, x, Pruning("wanda", "2:4"))
    assert new.tolist() == [[0.0, 1.0, 0.0, 1.0]]


def test_magnitude_unstructured_is_layer_wide():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    new = prune_weight(w, torch.randn(10, 4), Pruning("magnitude", "unstructured:0.5"))
    # one threshold over the matrix: the whole first row goes, not half of each row
    assert new.tolist() == [[0, 0, 0, 0], [10, 20, 30, 40]]


def test_structured_zeroes_lowest_mean_columns():
    torch.manual_seed(1)
    w = torch.randn(6, 10)
    new = prune_weight(w, torch.randn(50, 10), Pruning("magnitude", "structured:0.3"))
    zero_cols = (new == 0).all(0)
    assert int(zero_cols.sum()) == 3
    assert set(torch.nonzero(zero_cols).flatten().tolist()) == set(torch.argsort(w.abs().mean(0))[:3].tolist())


def test_half_precision_weights_keep_dtype():
    w = torch.randn(8, 16).to(torch.bfloat16)
    new = prune_weight(w, torch.randn(20, 16), Pruning("wanda", "2:4"))
    assert new.dtype == torch.bfloat16
    assert ((new.view(8, 4, 4) == 0).sum(-1) >= 2).all()


def test_unknown_option_is_rejected():
    try:
        prune_weight(torch.randn(4, 8), torch.randn(5, 8), Pruning("wanda", "2:4", {"alpha": 0.1}))
    except UserError as e:
        assert "alpha" in str(e)
    else:
        raise AssertionError("wanda accepted alpha")
