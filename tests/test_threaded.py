"""Few-row products on every thread (runtime/threaded.py): F.linear's results, on all threads."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from thanos_deploy import compress_model
from thanos_deploy.compact.linear import CompactLinear
from thanos_deploy.compact.shrink import shrink_model
from thanos_deploy.request import Pruning
from thanos_deploy.runtime import open_backend
from thanos_deploy.runtime.threaded import MAX_ROWS, MIN_WEIGHT, ThreadedLinear, threaded_linear, use_every_thread

from .conftest import random_ids, tiny_model


@pytest.fixture
def set_threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def ran_batched(fn) -> bool:
    """Whether fn ran a batched product (the split path) rather than one mm/addmm."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return any(event.key == "aten::bmm" for event in prof.key_averages())


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (4, 1), (2, MAX_ROWS // 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_split_over_the_threads_give_f_linear(set_threads, threads, lead, bias):
    set_threads(threads)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(960, 40, generator=g)  # 960 rows: divisible by 2 and by 3, MIN_WEIGHT elements
    b = torch.randn(960, generator=g) if bias else None
    x = torch.randn(*lead, 40, generator=g)
    assert ran_batched(lambda: threaded_linear(x, weight, b))
    torch.testing.assert_close(threaded_linear(x, weight, b), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["more rows than MAX_ROWS", "rows not divisible", "one thread", "strided weight", "small weight"])
def test_other_products_are_exactly_f_linear(set_threads, case):
    set_threads(1 if case == "one thread" else 2)
    g = torch.Generator().manual_seed(1)
    rows = {"rows not divisible": 961, "small weight": MIN_WEIGHT // 40 - 1}.get(case, 960)
    weight = torch.randn(rows, 40, generator=g)
    if case == "strided weight":
        weight = torch.randn(40, rows, generator=g).t()
    x = torch.randn(MAX_ROWS + 1 if case == "more rows than MAX_ROWS" else 1, 40, generator=g)
    assert not ran_batched(lambda: threaded_linear(x, weight))
    assert torch.equal(threaded_linear(x, weight), F.linear(x, weight))


@torch.no_grad()
def test_every_linear_of_a_shrunk_model_uses_the_threads_and_its_logits_hold(set_threads):
    set_threads(2)
    model = tiny_model("llama", hidden_size=256, intermediate_size=512)  # products above MIN_WEIGHT
    compress_model(model, random_ids(4, 32), Pruning("thanos", "structured:0.3", {"alpha": 0.1}))
    shrink_model(model, alpha=0.1)
    ids = random_ids(3, 1, seed=5)  # a decode step: one token per sequence
    before = model(ids).logits
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, CompactLinear))]
    assert any(isinstance(m, CompactLinear) and m.dense_rows is not None for m in linears)
    assert use_every_thread(model) == len(linears)
    assert all(type(m) is ThreadedLinear or m.product is threaded_linear for m in linears)
    assert ran_batched(lambda: model(ids))
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_the_torch_runtime_on_cpu_threads_every_linear(tiny_folder):
    model = open_backend("torch", str(tiny_folder)).model
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is ThreadedLinear for m in linears)
