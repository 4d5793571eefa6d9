"""Packed (padding-free) batches: ``cu_seqlens`` gives the same values, gradients and
metrics as the same batch padded to ``(N, T)``.

The batch: sequences of random lengths with an empty one, a one-token one and one
longer than all the others together; masks with holes inside sequences (a packed row
may hold prompt + completion: the mask selects the completion); temperature.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCE

import gspo_kernels
from gspo_kernels import _ops, logprobs
from gspo_kernels.sequences import resolve_packed

V = 23
# N = 8 (groups of 4 or 2): an empty sequence, a one-token one, and one (20) longer than all others together (18)
LENGTHS = [3, 0, 1, 5, 2, 20, 4, 3]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _packed_batch(dtype, seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total = int(cu[-1])
    x = (torch.randn(total, V, generator=g) * 2).to(dtype)
    y = torch.randint(0, V, (total,), generator=g)
    m = torch.rand(total, generator=g) > 0.2
    old = -torch.rand(total, generator=g, dtype=torch.float64) * 4
    ref = old + 0.2 * torch.randn(total, generator=g, dtype=torch.float64)
    rewards = torch.randn(len(lengths), generator=g)
    adv_tok = torch.randn(total, generator=g)
    return dict(cu=cu, x=x, y=y, m=m, old=old, ref=ref, rewards=rewards, adv_tok=adv_tok)


def _pad(t, cu, fill=0):
    """(total, ...) -> (N, T_max, ...): the test's own padding, by a loop."""
    N, T = len(cu) - 1, max(int(cu[i + 1] - cu[i]) for i in range(len(cu) - 1))
    out = torch.full((N, T) + tuple(t.shape[1:]), fill, dtype=t.dtype)
    for i in range(N):
        a, b = int(cu[i]), int(cu[i + 1])
        out[i, : b - a] = t[a:b]
    return out


def _unpad(t, cu):
    return torch.cat([t[i, : int(cu[i + 1] - cu[i])] for i in range(len(cu) - 1)])


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    if request.param == "triton" and _ops.CPU_BACKEND != "triton":
        pytest.skip("Triton interpreter not active")  # conftest sets TRITON_INTERPRET=1 without a GPU
    monkeypatch.setattr(_ops, "CPU_BACKEND", request.param)
    return request.param


def _close(a, b, dtype, kind, what):
    torch.testing.assert_close(a.double(), b.double(), **TOLERANCE[dtype][kind], msg=lambda msg: f"{what}: {msg}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_sequence_logprobs_packed_equals_padded(backend, dtype):
    d = _packed_batch(dtype)
    x = d["x"].requires_grad_(True)
    seq = gspo_kernels.sequence_logprobs(x, d["y"], d["m"], cu_seqlens=d["cu"], temperature=0.7)
    (g,) = torch.autograd.grad(seq.sum() + (seq**2).sum(), x)
    xp = _pad(d["x"].detach(), d["cu"]).requires_grad_(True)
    seq_p = gspo_kernels.sequence_logprobs(xp, _pad(d["y"], d["cu"]), _pad(d["m"], d["cu"], False), temperature=0.7)
    (gp,) = torch.autograd.grad(seq_p.sum() + (seq_p**2).sum(), xp)
    _close(seq, seq_p, dtype, "value", "sequence log-probs")
    _close(g, _unpad(gp, d["cu"]), dtype, "grad", "gradient")
    assert seq[1].item() == 0.0  # the empty sequence
    # (1, total, V) and (1, total) are the same batch
    seq1 = gspo_kernels.sequence_logprobs(
        d["x"].unsqueeze(0), d["y"].unsqueeze(0), d["m"].unsqueeze(0), cu_seqlens=d["cu"].long(), temperature=0.7
    )
    assert torch.equal(seq1, seq.detach())


LOSSES = {
    "gspo": lambda **kw: gspo_kernels.gspo_loss(advantage="group_norm", **kw),
    "gspo_token_adv": lambda adv, **kw: gspo_kernels.gspo_loss(advantage=adv, level="sequence_token", **kw),
    "grpo_token_mean": lambda **kw: gspo_kernels.grpo_loss(loss_agg="token-mean", **kw),
    "dapo_masks": lambda **kw: gspo_kernels.policy_loss(
        advantages="group_norm",
        loss_type="dapo",
        top_entropy_quantile=0.5,
        off_policy_mask_threshold=0.05,
        sampling_logprobs=kw.pop("old_logprobs") - 0.1,
        **kw,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_losses_packed_equal_padded(backend, dtype, loss):
    d = _packed_batch(dtype, seed=3)
    cu = d["cu"]
    common = dict(beta=0.04, entropy_coef=0.01, temperature=0.9, group_size=4)

    def run(packed):
        f = (lambda t: t) if packed else (lambda t, fill=0: _pad(t, cu, fill))
        x = f(d["x"]).detach().requires_grad_(True)
        kw = dict(
            logits=x,
            tokens=f(d["y"]),
            mask=f(d["m"]) if packed else _pad(d["m"], cu, False),
            old_logprobs=f(d["old"]),
            ref_logprobs=f(d["ref"]),
            **common,
        )
        if packed:
            kw["cu_seqlens"] = cu
        if loss == "gspo_token_adv":
            kw["adv"] = f(d["adv_tok"])
        else:
            kw["rewards"] = d["rewards"]
        out, metrics = LOSSES[loss](**kw)
        return out, metrics, torch.autograd.grad(out, x)[0]

    l1, m1, g1 = run(True)
    l2, m2, g2 = run(False)
    _close(l1, l2, dtype, "value", "loss")
    _close(g1, _unpad(g2, cu), dtype, "grad", "gradient")
    for name in ("kl", "entropy", "policy_loss", "advantage", "seq_logprobs", "clip_fraction"):
        if name in m2:
            _close(m1[name], m2[name], dtype, "value", name)
    r1, r2 = m1["ratio"], m2["ratio"]
    _close(r1, r2 if r2.dim() == 1 else _unpad(r2, cu), dtype, "value", "ratio")


def test_hidden_state_path_packed_equals_padded():
    g = torch.Generator().manual_seed(4)
    d = _packed_batch(torch.float64, seed=4)
    cu, H = d["cu"], 6
    hidden = torch.randn(int(cu[-1]), H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    kw = dict(rewards=d["rewards"], beta=0.0, group_size=2, chunk_size=4)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    l1, _ = gspo_kernels.gspo_loss(
        None, d["y"], mask=d["m"], hidden=h1, weight=w1, cu_seqlens=cu, old_logprobs=d["old"], **kw
    )
    h2, w2 = _pad(hidden, cu).requires_grad_(True), weight.clone().requires_grad_(True)
    l2, _ = gspo_kernels.gspo_loss(
        None,
        _pad(d["y"], cu),
        mask=_pad(d["m"], cu, False),
        hidden=h2,
        weight=w2,
        old_logprobs=_pad(d["old"], cu),
        **kw,
    )
    _close(l1, l2, torch.float64, "value", "loss")
    gh1, gw1 = torch.autograd.grad(l1, (h1, w1))
    gh2, gw2 = torch.autograd.grad(l2, (h2, w2))
    _close(gh1, _unpad(gh2, cu), torch.float64, "grad", "grad hidden")
    _close(gw1, gw2, torch.float64, "grad", "grad weight")


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3, 0]])
    cu = gspo_kernels.cu_seqlens_from_position_ids(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 4, 8, 9]
    with pytest.raises(ValueError, match="position_ids must start at 0"):
        gspo_kernels.cu_seqlens_from_position_ids(torch.tensor([1, 0, 1]))


@pytest.mark.parametrize(
    "cu,match",
    [
        (torch.tensor([0, 3, 5], dtype=torch.int16), r"cu_seqlens must be an int32 or int64 tensor, got torch.int16"),
        (
            torch.tensor([[0, 3, 5]], dtype=torch.int32),
            r"cu_seqlens must be 1-D of shape \(N\+1,\), got shape \(1, 3\)",
        ),
        (torch.tensor([1, 3, 5], dtype=torch.int32), r"cu_seqlens must start at 0, got 1"),
        (torch.tensor([0, 4, 3, 3, 5], dtype=torch.int32), r"cu_seqlens must be non-decreasing"),
        (torch.tensor([0, 3, 4], dtype=torch.int32), r"cu_seqlens must end at the token count 5, got 4"),
        (
            torch.tensor([0, 1, 3, 5], dtype=torch.int32),
            r"cu_seqlens holds N = 3 sequences, not a multiple of group_size=2",
        ),
    ],
)
def test_bad_cu_seqlens_are_refused_before_any_kernel(cu, match, monkeypatch):
    x, y = torch.randn(5, V), torch.zeros(5, dtype=torch.long)

    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran before the check")

    monkeypatch.setattr(logprobs, "token_logprobs_checked", no_kernel)
    with pytest.raises(ValueError, match=match):
        gspo_kernels.gspo_loss(x, y, torch.zeros(len(cu) - 1 if cu.dim() == 1 else 2), cu_seqlens=cu, group_size=2)
    if "group_size" not in match:
        with pytest.raises(ValueError, match=match):
            gspo_kernels.sequence_logprobs(x, y, cu_seqlens=cu)


def test_packed_layout_maps_tokens_to_rows():
    p = resolve_packed(torch.tensor([0, 2, 2, 5]), 5)
    assert (p.n, p.t_max) == (3, 3) and p.seq_id.tolist() == [0, 0, 2, 2, 2] and p.pos.tolist() == [0, 1, 0, 1, 2]
    x = torch.arange(5.0)
    assert p.pad(x).tolist() == [[0, 1, 0], [0, 0, 0], [2, 3, 4]] and torch.equal(p.unpad(p.pad(x)), x)
    with pytest.raises(ValueError, match="max_seqlen=2 is shorter than the longest sequence"):
        resolve_packed(torch.tensor([0, 2, 2, 5]), 5, max_seqlen=2)


def test_linear_sequence_logprobs_packed_equals_padded():
    g = torch.Generator().manual_seed(6)
    d = _packed_batch(torch.float32, seed=6)
    cu, H = d["cu"], 8
    hidden = torch.randn(int(cu[-1]), H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    h1 = hidden.clone().requires_grad_(True)
    s1 = gspo_kernels.linear_sequence_logprobs(h1, weight, d["y"], d["m"], cu_seqlens=cu, temperature=0.8)
    h2 = _pad(hidden, cu).requires_grad_(True)
    s2 = gspo_kernels.linear_sequence_logprobs(h2, weight, _pad(d["y"], cu), _pad(d["m"], cu, False), temperature=0.8)
    _close(s1, s2, torch.float32, "value", "sequence log-probs")
    (g1,) = torch.autograd.grad(s1.sum(), h1)
    (g2,) = torch.autograd.grad(s2.sum(), h2)
    _close(g1, _unpad(g2, cu), torch.float32, "grad", "grad hidden")
    assert s1[1].item() == 0.0
