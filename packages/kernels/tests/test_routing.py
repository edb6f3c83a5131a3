"""sort_by_expert: a stable, deterministic expert-sorted order with consistent inverse and offsets."""

import moe_kernels
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from moe_kernels.routing import sort_by_expert_torch


def _check_routing(r, idx_TK, E):
    flat = idx_TK.reshape(-1).long().cpu()
    order, inverse = r.order_N.cpu(), r.inverse_N.cpu()
    N = flat.numel()
    assert sorted(order.tolist()) == list(range(N))
    assert torch.equal(order[inverse], torch.arange(N))
    assert torch.equal(r.counts_E.cpu(), torch.tensor([(flat == e).sum() for e in range(E)]))
    assert r.offsets_E1[0] == 0 and r.offsets_E1[-1] == N
    for e in range(E):
        rows = order[r.offsets_E1[e] : r.offsets_E1[e + 1]]
        assert (flat[rows] == e).all()
        assert (rows[1:] > rows[:-1]).all(), "rows of one expert must keep their original order"


@st.composite
def routings(draw):
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, E))
    T = draw(st.sampled_from([0, 1, draw(st.integers(2, 600))]))
    n_used = draw(st.integers(1, E))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_used, (T, K), generator=gen), E


@given(routings())
def test_torch_sort_is_stable_and_consistent(routing):
    idx, E = routing
    _check_routing(moe_kernels.sort_by_expert(idx, E, backend="torch"), idx, E)


@given(routings())
def test_torch_sort_matches_reference(routing):
    """The sync-free torch sort (scatter_add counts) against the bincount and argsort reference."""
    idx, E = routing
    got = sort_by_expert_torch(idx.to(torch.int32), E)
    for a, b in zip(got, moe_kernels.sort_by_expert_naive(idx, E), strict=True):
        assert a.dtype == b.dtype == torch.long
        assert torch.equal(a, b)


@pytest.mark.gpu
@given(routings())
def test_cupy_counting_sort_matches_torch(routing):
    idx, E = routing
    idx = idx.cuda()
    r = moe_kernels.sort_by_expert(idx, E, backend="cupy")
    _check_routing(r, idx, E)
    ref = moe_kernels.sort_by_expert_naive(idx, E)
    for a, b in zip(r, ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("idx", "E", "match"),
    [
        (torch.tensor([[0, 3]]), 3, "idx"),
        (torch.tensor([[-1, 0]]), 3, "idx"),
        (torch.zeros(2, 4, dtype=torch.long), 3, "K > E"),
        (torch.zeros(4, dtype=torch.long), 3, "idx"),
        (torch.zeros(2, 2), 3, "idx"),
        (torch.zeros(2, 2, dtype=torch.long), 0, "n_experts"),
    ],
)
def test_bad_ids_raise_value_error(idx, E, match):
    with pytest.raises(ValueError, match=match):
        moe_kernels.sort_by_expert(idx, E)


def test_cupy_backend_needs_cuda_tensors():
    with pytest.raises(ValueError, match="cupy"):
        moe_kernels.sort_by_expert(torch.zeros(2, 1, dtype=torch.long), 2, backend="cupy")
