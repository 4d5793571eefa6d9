"""Host synchronisations per call: at most one with the value checks on (their single
device flag, read once), none with ``check_inputs=False``.

Counted under a ``TorchDispatchMode`` on both CPU backends (the Triton kernels in the
interpreter, standing in for the GPU, and the chunked PyTorch path): every op that
reads a device value on the host (``_local_scalar_dense`` behind ``.item()``/``bool()``/
``int()``, ``is_nonzero``, ``nonzero``, ``equal``) and every copy to the CPU from
another device. A forward and its backward are counted together.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rl_batch
from torch.utils._python_dispatch import TorchDispatchMode

import gspo_kernels
from gspo_kernels import _ops

SYNC_OPS = {
    "aten._local_scalar_dense.default",
    "aten.is_nonzero.default",
    "aten.nonzero.default",
    "aten.equal.default",
    "aten.item.default",
}


class CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        to_host = (
            name in ("aten._to_copy.default", "aten.copy_.default")
            and any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
            and (
                kwargs.get("device") == torch.device("cpu")
                or (name == "aten.copy_.default" and args[0].device.type == "cpu")
            )
        )
        if name in SYNC_OPS or to_host:
            self.syncs.append(name)
        return func(*args, **kwargs)


# (B, G, T, V) small enough for the interpreter; one empty sequence and ragged lengths
B, G, T, V = 2, 3, 8, 33


def _batch():
    b = rl_batch(0, B, G, T, V)
    return tuple(b[k] for k in ("x", "y", "mask", "lengths", "rewards", "old", "ref"))


CALLS = {
    "sequence_logprobs": lambda x, y, m, L, r, o, ref, ck: gspo_kernels.sequence_logprobs(
        x, y, lengths=L, check_inputs=ck
    ).sum(),
    "token_logprobs": lambda x, y, m, L, r, o, ref, ck: gspo_kernels.token_logprobs(
        x, y, valid=m, return_entropy=True, check_inputs=ck
    )[0].sum(),
    "gspo_loss": lambda x, y, m, L, r, o, ref, ck: gspo_kernels.gspo_loss(
        x, y, r, lengths=L, old_logprobs=o, ref_logprobs=ref, beta=0.04, entropy_coef=0.01, check_inputs=ck
    )[0],
    "grpo_loss": lambda x, y, m, L, r, o, ref, ck: gspo_kernels.grpo_loss(
        x, y, r, m, old_logprobs=o, ref_logprobs=ref, beta=0.04, loss_agg="token-mean", check_inputs=ck
    )[0],
    "policy_loss": lambda x, y, m, L, r, o, ref, ck: gspo_kernels.policy_loss(
        x,
        y,
        "group_norm",
        m.float(),
        rewards=r,
        old_logprobs=o,
        ref_logprobs=ref,
        beta=0.04,
        sampling_logprobs=o,
        off_policy_mask_threshold=0.1,
        top_entropy_quantile=0.5,
        entropy_coef=0.02,
        vllm_importance_sampling_mode="sequence_mask",
        loss_type="dapo",
        check_inputs=ck,
    )[0],
    # the hidden-state path (fused kernels on the Triton backend, chunks on the torch one)
    "policy_loss/hidden": lambda x, y, m, L, r, o, ref, ck: gspo_kernels.policy_loss(
        hidden=HID, weight=W, tokens=y, advantages="group_norm", mask=m, rewards=r, old_logprobs=o, check_inputs=ck
    )[0],
    "linear_sequence_logprobs": lambda x, y, m, L, r, o, ref, ck: gspo_kernels.linear_sequence_logprobs(
        HID, W, y, lengths=L, check_inputs=ck
    ).sum(),
    # packed sequences, max_seqlen given (else T_max itself is one read before the kernels)
    "sequence_logprobs/packed": lambda x, y, m, L, r, o, ref, ck: gspo_kernels.sequence_logprobs(
        x.reshape(-1, V), y.reshape(-1), m.reshape(-1), cu_seqlens=CU, max_seqlen=T, check_inputs=ck
    ).sum(),
    "gspo_loss/packed": lambda x, y, m, L, r, o, ref, ck: gspo_kernels.gspo_loss(
        x.reshape(-1, V),
        y.reshape(-1),
        r.reshape(-1),
        m.reshape(-1),
        group_size=G,
        cu_seqlens=CU,
        max_seqlen=T,
        old_logprobs=o.reshape(-1),
        ref_logprobs=ref.reshape(-1),
        beta=0.04,
        check_inputs=ck,
    )[0],
}
HID = torch.randn(B, G, T, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
W = torch.randn(V, 16, generator=torch.Generator().manual_seed(2)) / 4
CU = torch.arange(B * G + 1) * T


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    if request.param == "triton" and _ops.CPU_BACKEND != "triton":
        pytest.skip("Triton interpreter not active (TRITON_INTERPRET unset at import)")  # set by conftest
    monkeypatch.setattr(_ops, "CPU_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("check_inputs", [True, False])
@pytest.mark.parametrize("call", list(CALLS))
def test_host_syncs_per_call(backend, call, check_inputs):
    x, *rest = _batch()
    x.requires_grad_(True)
    CALLS[call](x, *rest, check_inputs).backward()  # first call: allocator warm-up, nothing lazy left
    with CountSyncs() as counter:
        out = CALLS[call](x, *rest, check_inputs)
        out.backward()
    assert len(counter.syncs) <= (1 if check_inputs else 0), counter.syncs
    assert torch.isfinite(out)


def test_one_flag_still_names_each_failure():
    # the single read raises the failed check's own message, with its details
    x, y, m, L, r, o, ref = _batch()
    y_bad = y.clone()
    y_bad[1, 1, 7] = V + 4
    with pytest.raises(ValueError, match=rf"tokens must lie in \[0, V\) = \[0, {V}\).*got values in \[\d+, {V + 4}\]"):
        gspo_kernels.gspo_loss(x, y_bad, r, m, old_logprobs=o)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\] = \[0, 8\], got values in \[0, 9\]"):
        gspo_kernels.sequence_logprobs(x, y, lengths=L.clone().fill_(9).index_fill_(1, torch.tensor([0]), 0))
    o_bad = o.clone()
    o_bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="old_logprobs must be finite at valid"):
        gspo_kernels.gspo_loss(x, y, r, m, old_logprobs=o_bad)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        gspo_kernels.policy_loss(x, y, "group_norm", m.float() * 0.5, rewards=r)


def test_unchecked_out_of_range_ids_never_read_out_of_bounds():
    # check_inputs=False: nothing raises; an id past V is clamped into [0, V) by the kernels
    x, y, m, L, r, o, ref = _batch()
    y_bad = y.clone()
    y_bad[0, 0, 0] = V + 1000
    lp = gspo_kernels.token_logprobs(x, y_bad, check_inputs=False)
    clamped = y_bad.clamp(0, V - 1)
    torch.testing.assert_close(lp, gspo_kernels.token_logprobs(x, clamped))
