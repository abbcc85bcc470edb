import pytest
import torch

from thanos_deploy.errors import UserError
from thanos_deploy.patterns import NM, Structured, Unstructured, mask_for, n_of_m, parse_pattern, smallest, smallest_per_row


@pytest.mark.parametrize(
    "text, expected",
    [("2:4", NM(2, 4)), ("4:8", NM(4, 8)), ("1:3", NM(1, 3)), ("unstructured:0.5", Unstructured(0.5)),
     ("structured:0.3", Structured(0.3)), (" Unstructured:0 ", Unstructured(0.0))],
)
def test_parse(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["2:5:1", "3:2", "0:4", "4:4", "structured:1.5", "unstructured:-0.1", "banana", "unstructured:abc", ""])
def test_parse_rejects(text):
    with pytest.raises(UserError) as e:
        parse_pattern(text)
    assert "\n" not in str(e.value) and "pattern" in str(e.value)


def test_smallest_exact_count_with_ties():
    scores = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # four tied zeros
    mask = smallest(scores, 3)
    assert int(mask.sum()) == 3
    # ties broken by lowest flat index: (0,1), (0,2), (1,0)
    assert mask.tolist() == [[False, True, True], [True, False, False]]


def test_smallest_per_row_and_n_of_m():
    torch.manual_seed(0)
    s = torch.rand(6, 16)
    m = smallest_per_row(s, 5)
    assert (m.sum(1) == 5).all()
    for r in range(6):
        assert set(torch.nonzero(m[r]).flatten().tolist()) == set(torch.argsort(s[r])[:5].tolist())
    nm = n_of_m(s, 2, 4)
    groups = nm.view(6, 4, 4)
    assert (groups.sum(-1) == 2).all()
    # the two pruned entries of every group are its two smallest
    sg = s.view(6, 4, 4)
    assert (sg[groups].view(6, 4, 2).max(-1).values <= sg[~groups].view(6, 4, 2).min(-1).values).all()


def test_structured_mask_zeroes_whole_columns():
    torch.manual_seed(0)
    s = torch.rand(5, 10)
    mask = mask_for(Structured(0.3), s, per_row=True)
    cols = mask.all(0)
    assert int(cols.sum()) == 3 and (mask == cols.unsqueeze(0)).all()
    assert set(torch.nonzero(cols).flatten().tolist()) == set(torch.argsort(s.mean(0))[:3].tolist())
