"""What makes a captured CUDA graph replay correctly, checked on any machine:

- the loss tail's option parameters (a small device tensor the kernels read) stay alive as
  long as a graph can replay a call that read them, however many other option sets come
  after (a beta or epsilon schedule, an evaluation sweep), and the eager cache stays bounded;
- the hidden-state ops never ask the device for its free memory: their one self-sized
  buffer (chunk of logits, dz slice) follows the explicit ``memory_budget`` alone.

Capture itself needs a GPU (tests/test_cuda_graphs.py); here the capture is simulated by
what the package reads to detect it.
"""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
from conftest import rl_batch

import gspo_kernels
from gspo_kernels import _launch_linear as kl
from gspo_kernels import _ops, linear
from gspo_kernels.losses.options import LossOptions
from gspo_kernels.losses.tail import launch as tail_launch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernels = pytest.mark.skipif(
    not kl.HAS_TRITON or (DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the fused kernels need a GPU or Triton's interpreter",
)


@pytest.fixture
def fresh_params(monkeypatch):
    """Empty parameter caches for the test (the module's own are restored afterwards)."""
    from collections import OrderedDict

    monkeypatch.setattr(tail_launch, "_PRM_CACHE", OrderedDict())
    monkeypatch.setattr(tail_launch, "_PRM_PINNED", {})


def _spy_params(monkeypatch):
    seen = []
    real = tail_launch._params

    def spy(opt, device):
        seen.append((opt, real(opt, device)))
        return seen[-1][1]

    monkeypatch.setattr(tail_launch, "_params", spy)
    return seen


def _loss(d, **opts):
    x = d["x"].clone().requires_grad_(True)
    loss, _ = gspo_kernels.gspo_loss(
        x, d["y"], d["rewards"], d["mask"], old_logprobs=d["old"], check_inputs=False, **opts
    )
    return x, loss


def test_capture_fill_gives_the_eager_parameters():
    v = tail_launch._param_values(LossOptions(epsilon=0.13, epsilon_high=0.27, beta=0.05, entropy_coef=0.01))
    eager = tail_launch._build_params(v, DEVICE, capturing=False)
    filled = tail_launch._build_params(v, DEVICE, capturing=True)
    assert eager.dtype == filled.dtype == torch.float64 and eager.shape == (tail_launch.tm.N_PRM,)
    assert torch.equal(eager, filled)
    assert eager[int(tail_launch.tm.R_BETA)].item() == 0.05


@needs_kernels
def test_parameters_a_capture_read_outlive_100_other_option_sets(fresh_params, monkeypatch):
    d = rl_batch()
    seen = _spy_params(monkeypatch)
    _, want = _loss(d, epsilon=0.11)
    monkeypatch.setattr(tail_launch, "_capturing", lambda device: True)
    _, got = _loss(d, epsilon=0.11)  # "captured": the graph would hold seen[-1]'s address
    monkeypatch.setattr(tail_launch, "_capturing", lambda device: False)
    opt, captured = seen[-1]
    assert captured is seen[0][1]  # the eager warm-up's tensor, now pinned (no copy at capture)
    assert torch.equal(got.detach(), want.detach())
    ref, values, ptr = weakref.ref(captured), captured.clone(), captured.data_ptr()
    del captured, got, want
    seen.clear()
    for i in range(100):  # a schedule: a new option set per step, eager
        tail_launch._params(LossOptions(epsilon=0.2 + 1e-3 * i, beta=1e-3 * i), DEVICE)
    gc.collect()
    alive = ref()
    assert alive is not None, "the tensor a captured call read was freed"
    assert alive.data_ptr() == ptr and torch.equal(alive, values)
    assert len(tail_launch._PRM_CACHE) <= tail_launch.PRM_CACHE_SIZE  # eager entries stay bounded
    assert tail_launch._params(opt, DEVICE) is alive  # and later calls reuse it


def test_eager_parameters_are_evicted_but_live_while_a_graph_of_autograd_needs_them(fresh_params):
    opt = LossOptions(epsilon=0.3)
    t = tail_launch._params(opt, DEVICE)
    held = t  # what FusedTail.save_for_backward keeps until backward
    ref = weakref.ref(t)
    del t
    for i in range(100):
        tail_launch._params(LossOptions(epsilon=0.5 + 0.004 * i), DEVICE)
    assert len(tail_launch._PRM_CACHE) == tail_launch.PRM_CACHE_SIZE and not tail_launch._PRM_PINNED
    assert (opt, DEVICE) not in tail_launch._PRM_CACHE  # evicted (least recently used) ...
    assert ref() is held  # ... yet alive while its holder lives
    del held
    gc.collect()
    assert ref() is None  # and freed after: no unbounded growth from eager calls


def test_recently_used_parameters_survive_eviction(fresh_params):
    keep = LossOptions(epsilon=0.3)
    t = tail_launch._params(keep, DEVICE)
    for i in range(3 * tail_launch.PRM_CACHE_SIZE):
        tail_launch._params(LossOptions(epsilon=0.5 + 0.002 * i), DEVICE)
        assert tail_launch._params(keep, DEVICE) is t  # used every step: never the least recent


# ---------------------------------------------------------------- hidden-state ops: no free-memory query
@pytest.fixture
def no_mem_query(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.cuda.mem_get_info called inside a forward/backward")

    monkeypatch.setattr(torch.cuda, "mem_get_info", refuse)


def test_slicing_depends_on_the_budget_alone(no_mem_query):
    tiles = kl.tile_set(torch.bfloat16, torch.device("cpu"), True)
    bn = tiles["dz"].block_n
    for dev in (torch.device("cpu"), torch.device("cuda")):  # the type alone picks the default, no query
        assert linear.slice_cols(1000, 151_936, torch.bfloat16, dev, tiles, budget=1000 * 2 * bn * 3) == 3 * bn
        assert linear.slice_cols(1000, 151_936, torch.bfloat16, dev, tiles, budget=1) == bn
        assert linear.default_chunk_size(1000, torch.float32, dev, budget=4000 * 5) == 4
        assert linear.default_chunk_size(1000, torch.float32, dev, budget=4000 * 8) == 8
    assert linear.default_chunk_size(1000, torch.float32, torch.device("cuda")) == 1 << 16  # 256 MiB / 4000 B
    assert linear.default_chunk_size(1000, torch.float32, torch.device("cpu")) == 1 << 14  # 64 MiB / 4000 B
    assert linear.default_memory_budget(torch.device("cuda")) == linear.MEMORY_BUDGET == 256 << 20
    assert linear.default_memory_budget(torch.device("cpu")) == linear.CPU_MEMORY_BUDGET == 64 << 20


def _head(R=8, H=16, V=100, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, H, generator=g, dtype=dtype).to(DEVICE).requires_grad_(True)
    w = (torch.randn(V, H, generator=g, dtype=dtype) / H**0.5).to(DEVICE).requires_grad_(True)
    y = torch.randint(0, V, (R,), generator=g).to(DEVICE)
    return h, w, y


def _grads(h, w, y, **kw):
    lp = gspo_kernels.linear_token_logprobs(h, w, y, check_inputs=False, **kw)
    return (lp, *torch.autograd.grad(lp.sum(), (h, w)))


@needs_kernels
def test_fused_backward_slices_follow_memory_budget(no_mem_query, monkeypatch):
    monkeypatch.setattr(_ops, "CPU_BACKEND", "triton")
    monkeypatch.setattr(linear, "FUSED", True)
    calls = []
    real = kl.bwd_launches
    monkeypatch.setattr(kl, "bwd_launches", lambda *a, **k: calls.append(a[12]) or real(*a, **k))  # v0
    h, w, y = _head()
    bn = kl.tile_set(h.dtype, h.device, kl.aligned_rows(h, w))["dz"].block_n
    one = _grads(h, w, y)
    assert calls == [0]  # the default budget: V in one slice
    calls.clear()
    sliced = _grads(h, w, y, memory_budget=8 * 4 * bn)  # R x bn fp32: one tile per slice
    assert calls == list(range(0, 100, bn))
    for a, b in zip(one, sliced):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_chunked_path_chunks_follow_memory_budget(no_mem_query, monkeypatch):
    monkeypatch.setattr(linear, "FUSED", False)
    chunks = []
    real = linear._logits
    monkeypatch.setattr(linear, "_logits", lambda h, *a: chunks.append(h.shape[0]) or real(h, *a))
    h, w, y = _head(dtype=torch.float64)
    one = _grads(h, w, y)
    assert chunks == [8, 8]  # forward, backward: one chunk each
    chunks.clear()
    split = _grads(h, w, y, memory_budget=100 * 8 * 2)  # two rows of fp64 logits per chunk
    assert chunks == [2] * 8
    for a, b in zip(one, split):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_losses_pass_memory_budget_to_the_hidden_state_path(monkeypatch):
    monkeypatch.setattr(linear, "FUSED", False)
    budgets = []
    real = linear.default_chunk_size
    monkeypatch.setattr(linear, "default_chunk_size", lambda *a: budgets.append(a[3]) or real(*a))
    d = rl_batch()
    H = 6
    hidden = torch.randn(*d["x"].shape[:-1], H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(d["x"].shape[-1], H, dtype=torch.float64)
    loss, _ = gspo_kernels.gspo_loss(
        None, d["y"], d["rewards"], d["mask"], hidden=hidden, weight=weight, memory_budget=12_345, check_inputs=False
    )
    loss.backward()
    assert budgets == [12_345, 12_345]
    module = gspo_kernels.GSPOLoss(memory_budget=4096)
    assert module.options["memory_budget"] == 4096


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1GB"])
def test_memory_budget_is_checked(bad):
    h, w, y = _head()
    with pytest.raises(ValueError, match=rf"memory_budget must be a positive int \(bytes\), got {bad!r}"):
        gspo_kernels.linear_token_logprobs(h, w, y, memory_budget=bad)
