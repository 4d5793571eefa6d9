"""The loss's value checks inside the fused tail's forward kernel (losses/tail/checks.py).

- Each check, on a bad value at a valid position: the fused path raises the same error as
  the torch composition, naming the argument, and the check was computed by the kernel
  (its bit was set in the kernel's ``CHECK``, not left to a torch evaluation).
- The same values where they do not count (masked positions, an empty sequence) pass,
  and the loss, its gradient and every metric equal the torch composition's, which zeroes
  them (LossInputs.zeroed): an empty sequence's per-sequence advantage counts when finite
  (TRL's advantage metric keeps it), as 0 otherwise; its per-sequence correction ratio as 0.
- Several failures at once raise the first in queue order, whether the kernel or torch ops
  computed it; a reference head over another vocabulary checks the ids again.
The launch counts (checks add no kernel) are asserted in tests/test_tail.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import TOLERANCE, torch_composition

import gspo_kernels
from gspo_kernels import _ops
from gspo_kernels.losses.tail import autograd as tail_autograd
from gspo_kernels.losses.tail import checks as tail_checks

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and _ops.CPU_BACKEND != "triton",
    reason="the fused tail runs on the Triton path (interpreter unset)",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Two groups of three; sequence 1 is empty (length 0), sequence 5 one token long.
B, G, T, V = 2, 3, 8, 33
LENGTHS = [[8, 0, 3], [5, 8, 1]]


@contextlib.contextmanager
def kernel_checks():
    """Record the CHECK bits the fused forward kernel was launched with."""
    seen = []
    saved = tail_autograd._take_checks

    def spy(*args):
        check, bits = saved(*args)
        seen.append(check)
        return check, bits

    tail_autograd._take_checks = spy
    try:
        yield seen
    finally:
        tail_autograd._take_checks = saved


def _batch():
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor(LENGTHS)
    mask = torch.arange(T) < lengths.unsqueeze(-1)
    b = dict(
        x=torch.randn(B, G, T, V, generator=g),
        y=torch.randint(0, V, (B, G, T), generator=g),
        lengths=lengths,
        mask=mask,
        rewards=torch.randn(B, G, generator=g),
        old=-torch.rand(B, G, T, generator=g) * 3,
    )
    b["ref"] = b["old"] + 0.1 * torch.randn(B, G, T, generator=g)
    b["isr_tok"] = 0.8 + 0.4 * torch.rand(B, G, T, generator=g)
    b["isr_seq"] = 0.8 + 0.4 * torch.rand(B, G, generator=g)
    b["adv_tok"] = torch.randn(B, G, T, generator=g)
    b["adv_seq"] = torch.randn(B, G, generator=g)
    return {k: v.to(DEVICE) for k, v in b.items()}


def _call(b, **over):
    """One loss call reading every checked input: a float mask (or lengths), old and ref
    log-probs, a correction ratio, advantages (or rewards)."""
    kw = dict(old_logprobs=b["old"], ref_logprobs=b["ref"], beta=0.04, loss_type="dapo")
    adv = over.pop("advantages", "group_norm")
    if isinstance(adv, str):
        kw["rewards"] = over.pop("rewards", b["rewards"])
    if "lengths" in over:
        kw["lengths"] = over.pop("lengths")
        mask = None
    else:
        mask = over.pop("mask", b["mask"].float())
    kw.update(over)
    x = b["x"].clone().requires_grad_(True)
    loss, metrics = gspo_kernels.policy_loss(
        x,
        over.pop("tokens", b["y"]) if "tokens" in over else b["y"],
        adv,
        mask,
        **{k: v for k, v in kw.items() if k != "tokens"},
    )
    (grad,) = torch.autograd.grad(loss, x)
    return loss, metrics, grad


def _set(t, where, value):
    t = t.clone()
    t[where] = value
    return t


VALID = (0, 2, 1)  # a valid token (sequence 2 has 3)
MASKED = (0, 2, 5)  # a masked token of the same sequence
EMPTY = (0, 1)  # the empty sequence
FULL = (1, 1)  # a sequence of 8 valid tokens

# kind -> (keyword arguments of _call from the batch, the message the error names)
BAD = {
    "lengths": (lambda b: dict(lengths=_set(b["lengths"], (1, 0), T + 1)), r"lengths must lie in \[0, T\]"),
    "binary_mask": (lambda b: dict(mask=_set(b["mask"].float(), MASKED, 0.5)), "mask must hold only 0 and 1"),
    "old": (lambda b: dict(old_logprobs=_set(b["old"], VALID, float("nan"))), "old_logprobs must be finite"),
    "ref": (lambda b: dict(ref_logprobs=_set(b["ref"], VALID, float("inf"))), "ref_logprobs must be finite"),
    "isr": (
        lambda b: dict(importance_sampling_ratio=_set(b["isr_tok"], VALID, float("nan"))),
        "importance_sampling_ratio must be finite",
    ),
    "isr_seq": (
        lambda b: dict(importance_sampling_ratio=_set(b["isr_seq"], FULL, float("inf"))),
        "importance_sampling_ratio must be finite",
    ),
    "adv": (lambda b: dict(advantages=_set(b["adv_tok"], VALID, float("-inf"))), "advantages must be finite"),
    "adv_seq": (lambda b: dict(advantages=_set(b["adv_seq"], FULL, float("nan"))), "advantages must be finite"),
    "rewards": (lambda b: dict(rewards=_set(b["rewards"], EMPTY, float("nan"))), "rewards must be finite"),
    "ids": (lambda b: dict(tokens=_set(b["y"], VALID, V)), r"tokens must lie in \[0, V\) = \[0, 33\)"),
    "ids_negative": (lambda b: dict(tokens=_set(b["y"], VALID, -1)), r"tokens must lie in \[0, V\)"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_value_raises_from_the_kernel(kind):
    b = _batch()
    make, message = BAD[kind]
    with kernel_checks() as seen, pytest.raises(ValueError, match=message):
        _call(b, **make(b))
    bit = tail_checks.BITS[kind.split("_seq")[0].replace("_negative", "")]
    assert seen and seen[0] & bit, (kind, seen)
    with torch_composition(), pytest.raises(ValueError, match=message):
        _call(b, **make(b))


# kind -> keyword arguments with a bad value where it does not count (masked / empty)
HARMLESS = {
    "old": lambda b: dict(old_logprobs=_set(b["old"], MASKED, float("nan"))),
    "ref": lambda b: dict(ref_logprobs=_set(b["ref"], MASKED, float("inf"))),
    "isr": lambda b: dict(importance_sampling_ratio=_set(b["isr_tok"], MASKED, float("nan"))),
    "isr_seq": lambda b: dict(importance_sampling_ratio=_set(b["isr_seq"], EMPTY, float("nan"))),
    "adv": lambda b: dict(advantages=_set(b["adv_tok"], MASKED, float("inf"))),
    "adv_seq_nan": lambda b: dict(advantages=_set(b["adv_seq"], EMPTY, float("nan"))),
    "adv_seq_kept": lambda b: dict(advantages=_set(b["adv_seq"], EMPTY, 7.0)),
    "ids": lambda b: dict(tokens=_set(_set(b["y"], MASKED, V + 5), (1, 0, 0), -100)),
    "lengths_bounds": lambda b: dict(lengths=_set(_set(b["lengths"], (0, 0), 0), (1, 1), T)),
}


@pytest.mark.parametrize("kind", list(HARMLESS))
def test_values_that_do_not_count_pass(kind):
    b = _batch()
    kw = HARMLESS[kind](b)
    with kernel_checks() as seen:
        loss, metrics, grad = _call(b, **kw)
    assert seen and seen[0], "the fused kernel computed no check"
    with torch_composition():
        want_loss, want_metrics, want_grad = _call(b, **kw)
    tol = TOLERANCE[torch.float32]
    torch.testing.assert_close(loss, want_loss, **tol["value"])
    torch.testing.assert_close(grad, want_grad, **tol["grad"])
    assert set(metrics) == set(want_metrics)
    for name in metrics:
        torch.testing.assert_close(metrics[name], want_metrics[name], **tol["value"], msg=name)
    assert torch.isfinite(loss)
    if kind == "adv_seq_kept":
        assert metrics["advantage"][EMPTY] == 7.0
    if kind == "adv_seq_nan":
        assert metrics["advantage"][EMPTY] == 0.0


def test_first_failure_in_order_is_raised():
    """lengths before old before ids: the kinds' order (tail/checks.py KINDS)."""
    b = _batch()
    kw = dict(
        lengths=_set(b["lengths"], (1, 0), -1),
        old_logprobs=_set(b["old"], VALID, float("nan")),
        tokens=_set(b["y"], VALID, V),
    )
    for ctx in (contextlib.nullcontext(), torch_composition()):
        with ctx, pytest.raises(ValueError, match="lengths must lie"):
            _call(b, **kw)
    kw.pop("lengths")
    for ctx in (contextlib.nullcontext(), torch_composition()):
        with ctx, pytest.raises(ValueError, match="old_logprobs must be finite"):
            _call(b, **kw)


def test_checks_off_take_nothing():
    b = _batch()
    with kernel_checks() as seen:
        _call(b, check_inputs=False, old_logprobs=_set(b["old"], VALID, float("nan")))
    assert seen == [0]


def _hidden_call(b, ref_vocab, **over):
    """policy_loss from hidden states (H = 12, V = 33) with a reference head of ``ref_vocab`` rows."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(B, G, T, 12, generator=g).to(DEVICE)
    weight = (torch.randn(V, 12, generator=g) / 3).to(DEVICE)
    ref_weight = (torch.randn(ref_vocab, 12, generator=g) / 3).to(DEVICE)
    kw = dict(old_logprobs=b["old"], beta=0.04, rewards=b["rewards"])
    kw.update(over)
    return gspo_kernels.policy_loss(
        hidden=hidden,
        weight=weight,
        tokens=kw.pop("tokens", b["y"]),
        advantages="group_norm",
        mask=b["mask"],
        ref_hidden=hidden,
        ref_weight=ref_weight,
        **kw,
    )


def test_reference_head_of_another_vocabulary_checks_the_ids_again():
    """An id valid for the policy's head but past the reference's is refused, on both paths."""
    b = _batch()
    y = _set(b["y"], VALID, 12)
    for ctx in (contextlib.nullcontext(), torch_composition()):
        with ctx, pytest.raises(ValueError, match=r"tokens must lie in \[0, V\) = \[0, 8\)"):
            _hidden_call(b, 8, tokens=y)
        _hidden_call(b, V, tokens=y)  # the same vocabulary: one check, passed


def test_queue_order_across_kernel_and_torch_checks():
    """A failed check the kernel computes (old, queued first) is raised before a later one
    evaluated with torch ops (the reference's ids), as on the torch composition."""
    b = _batch()
    kw = dict(tokens=_set(b["y"], VALID, 12), old_logprobs=_set(b["old"], VALID, float("nan")))
    for ctx in (contextlib.nullcontext(), torch_composition()):
        with ctx, pytest.raises(ValueError, match="old_logprobs must be finite"):
            _hidden_call(b, 8, **kw)


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("own_fails", [False, True])
def test_value_checks_merge_kernel_and_torch_flags(own_fails, per_sequence):
    """ValueChecks itself: checks evaluated with torch ops and checks a kernel took (a 0-d flag,
    or per-sequence flags ORed) raise the first failure in queue order, or nothing."""
    from gspo_kernels._checks import ValueChecks

    for kernel_fails in (False, True):
        c = ValueChecks()
        c.require_not(torch.tensor(own_fails), "first")
        c.require_not(lambda: torch.tensor(False), "second", kind="a")
        c.require_not(torch.tensor(False), "third", kind="b")
        c.require_not(torch.tensor(False), "fourth")
        assert sorted(c.take({"a", "b", "c"})) == ["a", "b"]
        bit = 2 if kernel_fails else 0  # bit 1: kind "b"
        flag = torch.tensor([0, bit, 0], dtype=torch.int32) if per_sequence else torch.tensor(bit, dtype=torch.int32)
        c.from_kernel(flag, {"a": 0, "b": 1})
        want = "first" if own_fails else "third" if kernel_fails else None
        if want is None:
            assert c.finish(torch.ones(())) == 1
        else:
            with pytest.raises(ValueError, match=want):
                c.finish(torch.ones(()))


def test_sequence_logprobs_edges_of_the_in_kernel_checks():
    """T = 0 still checks lengths; an empty sequence's gradient is 0 whatever its upstream
    gradient (inf, NaN), and a masked token's too."""
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\] = \[0, 0\]"):
        gspo_kernels.sequence_logprobs(
            torch.randn(2, 0, 5, device=DEVICE),
            torch.zeros(2, 0, dtype=torch.long, device=DEVICE),
            lengths=torch.tensor([3, 0], device=DEVICE),
        )
    x = torch.randn(3, 4, 5, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 5, (3, 4), device=DEVICE)
    out = gspo_kernels.sequence_logprobs(x, y, lengths=torch.tensor([3, 0, 4], device=DEVICE))
    (gx,) = torch.autograd.grad(out, x, torch.tensor([float("nan"), float("inf"), 1.0], device=DEVICE))
    assert torch.equal(gx[1], torch.zeros_like(gx[1])) and torch.equal(gx[0, 3], torch.zeros_like(gx[0, 3]))
    assert torch.isfinite(gx[2]).all()
