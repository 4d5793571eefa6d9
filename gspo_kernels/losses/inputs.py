"""Input resolution of the losses: every tensor checked once and laid out as
``(N, T)`` per-token / ``(N, 1)`` per-sequence values, then the one pass over
the logits (or hidden states) that gives the policy's log-probs and entropies.

Checks run in the order a user needs: shapes, dtypes and devices of every
argument first (raised at once), then values (finite inputs at valid positions,
a 0/1 float mask, ids, lengths: queued on one device flag, see :mod:`gspo_kernels._checks`;
the fused tail computes them in its forward kernel, :mod:`.tail.checks`), then
option combinations (a reference for ``beta > 0``, rewards for a named advantage,
...). What sits at a masked position is left as given: the fused tail selects by
the mask, and :meth:`LossInputs.zeroed` gives the torch composition exact zeros.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._checks import ValueChecks, not_finite
from .._validate import check_index_dtype, check_logits, resolve_mask, tokens_shape_message
from ..errors import DeviceError, DTypeError, OptionError, ShapeError, reshape_hint
from ..linear import linear_token_logprobs_checked
from ..logprobs import token_logprobs_checked
from ..sequences import Packed, resolve_packed
from .options import LossOptions

IGNORE_INDEX = -100  # Hugging Face's label padding: such positions count as masked


@dataclass(frozen=True)
class LossInputs:
    """What the loss math sees. ``N`` sequences of ``T`` tokens; ``lead`` the caller's
    leading shape (``(B, G, T)`` or ``(N, T)``) for reporting per-token metrics."""

    logp: Tensor  # (N, T) policy log-probs, differentiable (anything at masked positions)
    entropy: Tensor  # (N, T) entropies from the same pass
    mask: Tensor  # (N, T) bool
    old: Optional[Tensor]  # (N, T) behaviour policy (detached), or None
    ref: Optional[Tensor]  # (N, T) reference policy, or None
    sampling: Optional[Tensor]  # (N, T) rollout engine's log-probs (NaN allowed: "not scored")
    is_ratio: Optional[Tensor]  # (N, T) or (N, 1) rollout-correction ratio, or None
    advantages: Optional[Tensor]  # (N, 1) or (N, T) given advantages, or None (from rewards)
    rewards: Optional[Tensor]  # (B, G) float, or None
    group_size: int
    denominator: str  # "old" | "ref" | "detached"
    num_items_in_batch: Optional[Tensor]
    lead: tuple[int, ...]  # per-token metrics' shape ((total,) for packed input)
    packed: Optional[Packed] = None  # packed input: how its tokens map to the (N, T) rows
    # what only the value checks read (a fused tail computes them beside its own reads):
    tokens: Optional[Tensor] = None  # the caller's ids (caller's layout) and V
    vocab: int = 0
    lengths: Optional[Tensor] = None  # (N,) given lengths
    float_mask: Optional[Tensor] = None  # a float mask as given (caller's layout)

    def rows(self, t: Tensor) -> Tensor:
        """A per-token tensor in the caller's layout -> ``(N, T)`` rows (packed: padded)."""
        if self.packed is not None:
            return self.packed.pad(t.reshape(-1))
        return t.reshape(self.mask.shape)

    def zeroed(self) -> LossInputs:
        """The same inputs with exact zeros at masked positions in every per-token tensor (what sits
        there, NaN included, then never reaches a value or a gradient of the torch composition), and
        in a per-sequence correction ratio of an empty sequence; an empty sequence's per-sequence
        advantage is kept when finite (TRL's metrics count it), else 0."""
        m = self.mask

        def z(t: Tensor) -> Tensor:
            return torch.where(m, t, 0.0)

        def zo(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else z(t)

        some = lambda t: m if t.shape[-1] == m.shape[-1] else m.any(-1, keepdim=True)  # noqa: E731
        isr, adv = self.is_ratio, self.advantages
        if isr is not None:
            isr = torch.where(some(isr), isr, 0.0)
        if adv is not None:
            adv = (
                torch.where(m, adv, 0.0)
                if adv.shape[-1] == m.shape[-1]
                else torch.where(some(adv) | torch.isfinite(adv), adv, 0.0)
            )
        return dataclasses.replace(
            self,
            logp=z(self.logp),
            entropy=z(self.entropy),
            old=zo(self.old),
            ref=zo(self.ref),
            sampling=zo(self.sampling),
            is_ratio=isr,
            advantages=adv,
        )

    def per_token(self, x: Tensor) -> Tensor:
        """(N, T) rows -> the caller's per-token layout."""
        return self.packed.unpad(x) if self.packed is not None else x.reshape(self.lead)

    def per_sequence(self, x: Tensor) -> Tensor:
        """(N, 1) -> the caller's per-sequence layout ((B, G) or (N,))."""
        return x.reshape(self.lead[:-1] if self.packed is None else (-1,))


def _float_tensor(t, name: str, shapes, dev) -> Optional[Tensor]:
    """A float tensor whose shape is one of ``shapes`` (the first is canonical); reshaped to it."""
    if t is None:
        return None
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise DTypeError(f"{name} must be a float tensor of shape {shapes[0]}, got {got}")
    if tuple(t.shape) not in [tuple(s) for s in shapes]:
        raise ShapeError(
            f"{name} must have shape {' or '.join(str(tuple(s)) for s in shapes)}, got {tuple(t.shape)}"
            + reshape_hint(name, t.shape, shapes)
        )
    if t.device != dev:
        raise DeviceError(f"{name} is on {t.device} but the logits are on {dev}; put them on one device")
    return t.detach()


def _layout(src: Tensor, src_name: str, tokens, group_size, packed_n=None) -> tuple[int, int, int, tuple[int, ...]]:
    lead = tuple(src.shape[:-1])
    last = "V" if src_name == "logits" else "H"
    if packed_n is not None:
        if len(lead) not in (1, 2) or (len(lead) == 2 and lead[0] != 1):
            raise ShapeError(
                f"with cu_seqlens, {src_name} must be (total, {last}) or (1, total, {last}), "
                f"got shape {tuple(src.shape)}"
            )
        G = group_size or 1
        B, T = packed_n // G, lead[-1]
    elif len(lead) == 3:
        B, G, T = lead
        if group_size is not None and group_size != G:
            raise OptionError(
                f"group_size={group_size!r} does not match G = {G} of {src_name} of shape "
                f"{tuple(src.shape)}; omit group_size for 4-D input"
            )
    elif len(lead) == 2:
        N, T = lead
        if group_size is None:
            group_size = 1 if N else 0
        elif isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or N % group_size:
            raise OptionError(f"group_size must be a positive divisor of N = {N}, got {group_size!r}")
        G = group_size
        B = N // G if G else 0
    else:
        raise ShapeError(f"{src_name} must be (B, G, T, {last}) or (N, T, {last}), got shape {tuple(src.shape)}")
    if B * G == 0:
        raise ShapeError(
            f"{src_name} of shape {tuple(src.shape)} holds no sequence (B * G = 0): the loss is a mean over sequences"
        )
    check_index_dtype(tokens, "tokens")
    if tuple(tokens.shape) != lead:
        raise ShapeError(tokens_shape_message("tokens", tokens.shape, lead, src_name))
    if tokens.device != src.device:
        raise DeviceError(f"tokens is on {tokens.device} but {src_name} is on {src.device}; put them on one device")
    return B, G, T, lead


def resolve(
    opt: LossOptions,
    *,
    logits=None,
    tokens=None,
    mask=None,
    lengths=None,
    advantages=None,
    rewards=None,
    hidden=None,
    weight=None,
    bias=None,
    old_logprobs=None,
    ref_logprobs=None,
    ref_logits=None,
    ref_hidden=None,
    ref_weight=None,
    ref_bias=None,
    sampling_logprobs=None,
    importance_sampling_ratio=None,
    num_items_in_batch=None,
    group_size=None,
    ignore_index=IGNORE_INDEX,
    chunk_size=None,
    vocab_group=None,
    inplace_backward=False,
    cu_seqlens=None,
    max_seqlen=None,
    checks: ValueChecks,
    memory_budget=None,
) -> LossInputs:
    """Check everything, run the one pass over the logits, return :class:`LossInputs`."""
    # ---- shapes, dtypes, devices
    if (logits is None) == (hidden is None):
        raise OptionError("give exactly one of logits (..., T, V) or hidden (..., T, H) with weight (V, H)")
    if logits is not None:
        check_logits(logits)
        src_name, src = "logits", logits
    else:
        if not isinstance(hidden, Tensor):
            raise DTypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
        if weight is None:
            raise OptionError("hidden needs weight, the (V, H) LM head")
        src_name, src = "hidden", hidden
    if tokens is None:
        raise OptionError("tokens (B, G, T) are required")
    packed = None
    if cu_seqlens is not None:
        if lengths is not None:
            raise OptionError("with cu_seqlens, give a mask (total,) or none, not lengths")
        packed = resolve_packed(cu_seqlens, src.shape[-2], max_seqlen, group_size, checks=checks)
    B, G, T, lead = _layout(src, src_name, tokens, group_size, None if packed is None else packed.n)
    N, dev = B * G, src.device
    flat = len(lead) <= 2
    mask_b = resolve_mask(mask, lengths, tokens, checks=checks)
    # exact shapes only: the caller's layout, nothing reshaped by guess
    tok_shapes = [lead] if packed is None else [(lead[-1],), (1, lead[-1])]
    seq_shapes = [(N,), (N, 1)] if flat else [(B, G)]
    old = _float_tensor(old_logprobs, "old_logprobs", tok_shapes, dev)
    ref = _float_tensor(ref_logprobs, "ref_logprobs", tok_shapes, dev)
    samp = _float_tensor(sampling_logprobs, "sampling_logprobs", tok_shapes, dev)
    isr = _float_tensor(importance_sampling_ratio, "importance_sampling_ratio", tok_shapes + seq_shapes, dev)
    adv = None
    if isinstance(advantages, Tensor):
        adv = _float_tensor(advantages, "advantages", seq_shapes + tok_shapes, dev)
    elif advantages is not None and not isinstance(advantages, str):
        raise DTypeError(
            f"advantages must be a float tensor of shape {seq_shapes[0]} or {lead}, or one of "
            f"('group_norm', 'contrast'), got {type(advantages).__name__}"
        )
    if rewards is not None:
        if not isinstance(rewards, Tensor) or not (
            rewards.dtype.is_floating_point or rewards.dtype in (torch.int32, torch.int64)
        ):
            got = rewards.dtype if isinstance(rewards, Tensor) else type(rewards).__name__
            raise DTypeError(f"rewards must be a float tensor of shape {seq_shapes[0]}, got {got}")
        if tuple(rewards.shape) not in [(B, G), (N,)] or (not flat and tuple(rewards.shape) == (N,) and G > 1):
            raise ShapeError(
                f"rewards must have shape {seq_shapes[0]}, got {tuple(rewards.shape)}"
                + reshape_hint("rewards", rewards.shape, seq_shapes)
            )
        if rewards.device != dev:
            raise DeviceError(f"rewards is on {rewards.device} but the logits are on {dev}; put them on one device")
    if ref_logprobs is not None and ref_logits is not None:
        raise OptionError("give ref_logprobs or ref_logits, not both")
    if ref_logits is not None and ref_hidden is not None:
        raise OptionError("give ref_logits or ref_hidden, not both")
    if ref_logits is not None:
        check_logits(ref_logits, name="ref_logits")
        if logits is not None and tuple(ref_logits.shape) != tuple(logits.shape):
            raise ShapeError(
                f"ref_logits must have the logits' shape {tuple(logits.shape)}, got {tuple(ref_logits.shape)}"
            )
    if num_items_in_batch is not None and not isinstance(num_items_in_batch, (int, float, Tensor)):
        raise DTypeError(
            f"num_items_in_batch must be a number or a 0-d tensor, got {type(num_items_in_batch).__name__}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, type(None))):
        raise DTypeError(f"ignore_index must be an int or None, got {ignore_index!r}")

    # ---- values (one device flag; queued here, computed by the fused tail or in checks.finish)
    float_mask = mask if mask is not None and mask.dtype.is_floating_point else None
    if float_mask is not None:
        checks.require_not(
            lambda: ((float_mask != 0) & (float_mask != 1)).any(),
            "mask must hold only 0 and 1 (a float mask is not a weight); got other values",
            kind="binary_mask",
        )
    valid = torch.ones(lead, dtype=torch.bool, device=dev) if mask_b is None else mask_b
    if ignore_index is not None:
        valid = valid & (tokens != ignore_index)
    if packed is None:
        rows = lambda t: t.reshape(N, T)  # noqa: E731
    else:  # packed: the O(total) per-token values laid out as (N, T_max) rows (the logits stay packed)
        T = packed.t_max
        rows = lambda t: packed.pad(t.reshape(-1))  # noqa: E731
    m = rows(valid)
    tok = lambda t: None if t is None else rows(t)  # noqa: E731
    seq = lambda t: t.reshape(N, 1) if t.numel() == N else rows(t)  # noqa: E731
    # per-token inputs stay as given at masked positions here (the fused tail selects, never
    # multiplies, by the mask); LossInputs.zeroed() gives the torch composition exact zeros there
    old, ref, samp = tok(old), tok(ref), tok(samp)
    isr = None if isr is None else seq(isr)
    adv = None if adv is None else seq(adv)
    if checks.enabled:
        some = lambda t: m if t.shape[-1] == T else m.any(-1, keepdim=True)  # noqa: E731
        for t, name, kind in (
            (old, "old_logprobs", "old"),
            (ref, "ref_logprobs", "ref"),
            (isr, "importance_sampling_ratio", "isr"),
            (adv, "advantages", "adv"),
        ):
            if t is not None:
                checks.finite(t, (lambda t: lambda: some(t))(t), name, kind=kind)  # noqa: B023 (t bound by the call)
    if rewards is not None:
        rewards = rewards.detach().reshape(B, G).to(torch.promote_types(rewards.dtype, torch.float32))
        checks.require_not(
            (lambda r: lambda: not_finite(r).any())(rewards), "rewards must be finite, got NaN/inf", kind="rewards"
        )

    # ---- option combinations
    has_ref = ref is not None or ref_logits is not None or ref_hidden is not None
    if opt.beta > 0 and not has_ref:
        raise OptionError("beta > 0 needs a reference: ref_logprobs, ref_logits or ref_hidden (or set beta=0)")
    mode = advantages if isinstance(advantages, str) else opt.advantage
    if adv is None:
        if mode not in ("group_norm", "contrast"):
            raise OptionError(f"advantages must be a tensor or one of ('group_norm', 'contrast'), got {mode!r}")
        if rewards is None:
            raise OptionError(
                f"advantages={mode!r} computes the advantage from rewards: pass rewards {(B, G)} "
                "(or an advantages tensor)"
            )
        if flat and group_size is None and N > 1:
            raise OptionError(
                f"(N, T, V) input of shape {tuple(src.shape)} needs group_size=G to compute "
                f"advantages={mode!r} from rewards per group"
            )
    denominator = _resolve_denominator(opt, old is not None, has_ref)
    if opt.loss_type == "vespo" and opt.vllm_importance_sampling_mode in ("sequence_truncate", "sequence_mask"):
        raise OptionError(
            "loss_type='vespo' needs a token-level vllm_importance_sampling_mode "
            f"('token_truncate' or 'token_mask'), got {opt.vllm_importance_sampling_mode!r}"
        )
    if opt.vllm_importance_sampling_mode is not None and (samp is None or old is None):
        raise OptionError(
            f"vllm_importance_sampling_mode={opt.vllm_importance_sampling_mode!r} needs "
            "old_logprobs and sampling_logprobs (the rollout engine's), or pass "
            "importance_sampling_ratio instead"
        )
    if opt.vllm_importance_sampling_mode is not None and isr is not None:
        raise OptionError("give importance_sampling_ratio or vllm_importance_sampling_mode, not both")

    # ---- the one pass over the logits
    kw = dict(temperature=opt.temperature, valid=valid, vocab_group=vocab_group)
    extra = dict(inplace_backward=True) if inplace_backward and logits is not None else {}
    kw["memory_budget"] = memory_budget
    logp, ent = _logprobs(logits, tokens, hidden, weight, bias, chunk_size, grad=True, checks=checks, **kw, **extra)
    logp, ent = rows(logp), rows(ent)
    vocab = src.shape[-1] if logits is not None else weight.shape[0]
    if ref_logits is not None or ref_hidden is not None:
        rw = ref_weight if ref_weight is not None else weight
        ref_vocab = (
            ref_logits.shape[-1]
            if ref_logits is not None
            else (rw.shape[0] if isinstance(rw, Tensor) and rw.dim() == 2 else None)
        )
        # the same ids and mask over the same vocabulary: checked once, above (else checked again)
        ref_checks = ValueChecks(False) if ref_vocab == vocab else checks
        with torch.no_grad():
            ref = rows(
                _logprobs(ref_logits, tokens, ref_hidden, rw, ref_bias, chunk_size, grad=False, checks=ref_checks, **kw)
            )
    nib = num_items_in_batch
    if nib is not None and not isinstance(nib, Tensor):
        nib = torch.tensor(float(nib), device=dev)
    return LossInputs(
        logp=logp,
        entropy=ent,
        mask=m,
        old=old,
        ref=ref,
        sampling=samp,
        is_ratio=isr,
        advantages=adv,
        rewards=rewards,
        group_size=G,
        denominator=denominator,
        num_items_in_batch=nib,
        lead=lead if packed is None else (packed.total,),
        packed=packed,
        tokens=tokens,
        vocab=vocab,
        lengths=None if lengths is None else lengths.reshape(N),
        float_mask=float_mask,
    )


def _resolve_denominator(opt: LossOptions, has_old: bool, has_ref: bool) -> str:
    """Which log-probs divide the policy's in the importance weight: ``opt.denominator``, or
    (None) the old policy's when given, else the detached current policy (as TRL and verl)."""
    d = opt.denominator
    if d is None:
        return "old" if has_old else "detached"
    if d == "old" and not has_old:
        raise OptionError("denominator='old' needs old_logprobs (B, G, T)")
    if d == "ref" and not has_ref:
        raise OptionError("denominator='ref' needs a reference: ref_logprobs, ref_logits or ref_hidden")
    return d


def _logprobs(logits, tokens, hidden, weight, bias, chunk_size, grad, checks, memory_budget=None, **kw):
    """The policy's (``grad``: log-probs and entropies) or the reference's log-probs, one pass
    (``chunk_size``, ``memory_budget``: the hidden-state path's)."""
    if logits is not None:
        return token_logprobs_checked(logits, tokens, checks, return_entropy=grad, **kw)
    return linear_token_logprobs_checked(
        hidden,
        weight,
        tokens,
        checks,
        bias=bias,
        chunk_size=chunk_size,
        return_entropy=grad,
        memory_budget=memory_budget,
        **kw,
    )
