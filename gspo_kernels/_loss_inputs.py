"""Input resolution of the losses: shapes, masks, advantages, reference and old
log-probs, the ratio's denominator, and the one pass over the logits that gives
the policy's per-token log-probs and entropies. Everything at a masked
position is replaced by exact zeros here, before any loss math."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._validate import check_index_dtype, check_logits, finite_where, resolve_mask
from .logprobs import token_logprobs


def _check_float(t: Optional[Tensor], name: str, shape, flat_ok: bool, device) -> Optional[Tensor]:
    """A per-token float tensor of shape ``(B, G, T)``; ``(N, T)`` only when the
    logits came as ``(N, T, V)`` (``flat_ok``): no other reshape is guessed."""
    if t is None:
        return None
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor of shape {tuple(shape)}, got "
                        f"{type(t).__name__ if not isinstance(t, Tensor) else t.dtype}")
    B, G, T = shape
    if flat_ok and tuple(t.shape) == (B * G, T):
        t = t.reshape(shape)
    if tuple(t.shape) != tuple(shape):
        want = f"{tuple(shape)}" + (f" or {(B * G, T)}" if flat_ok else "")
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the logits are on {device}; put them on one device")
    return t


DENOMINATORS = ("old", "ref", "detached")


def _resolve_denominator(denominator, has_old: bool, has_ref: bool) -> str:
    """Which per-token log-probs divide the policy's in the importance ratio (see README, "Behaviour")."""
    if denominator is None:
        if has_old:
            return "old"
        if has_ref:
            raise ValueError(
                "ambiguous ratio denominator: a reference is given but no old_logprobs. Pass "
                "denominator='ref' (ratio against the reference policy, the article's form) or "
                "denominator='detached' (ratio against the detached current policy, = 1 on-policy, as TRL, "
                "verl and Liger-Kernel do; the reference then enters only through the KL term)"
            )
        return "detached"
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {DENOMINATORS} or None, got {denominator!r}")
    if denominator == "old" and not has_old:
        raise ValueError("denominator='old' needs old_logprobs (B, G, T)")
    if denominator == "ref" and not has_ref:
        raise ValueError("denominator='ref' needs a reference: ref_logprobs, ref_logits or ref_hidden")
    return denominator


class _Inputs:
    """Resolved per-token quantities of one loss call, all shaped ``(B, G, T)``.
    Everything at a masked position (logits, old/ref log-probs, per-token
    advantages) is replaced by exact zeros before use, so it never reaches a
    value or a gradient; the same quantities at valid positions must be finite."""

    def __init__(self, logits, tokens, rewards, mask, lengths, ref_logprobs, ref_logits, old_logprobs,
                 advantage, beta, temperature, group_size, hidden, weight, bias, ref_hidden, ref_weight,
                 ref_bias, chunk_size, adv_modes, adv_token_ok, denominator, vocab_group=None):
        if (logits is None) == (hidden is None):
            raise ValueError("give exactly one of logits (..., T, V) or hidden (..., T, H) with weight (V, H)")
        if hidden is not None and weight is None:
            raise ValueError("hidden needs weight, the (V, H) LM head")
        src_name, src = ("logits", logits) if logits is not None else ("hidden", hidden)
        if logits is not None:
            check_logits(logits)
        elif not isinstance(hidden, Tensor):
            raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
        if tokens is None:
            raise ValueError("tokens (B, G, T) are required")
        lead = tuple(src.shape[:-1])
        if len(lead) == 3:
            B, G, T = lead
            if group_size is not None and group_size != G:
                raise ValueError(f"group_size={group_size!r} does not match G = {G} of {src_name} of shape "
                                 f"{tuple(src.shape)}; omit group_size for 4-D input")
        elif len(lead) == 2:
            if group_size is None:
                raise ValueError(f"(N, T, V) input of shape {tuple(src.shape)} needs group_size=G")
            if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 \
                    or lead[0] % group_size:
                raise ValueError(f"group_size must be a positive divisor of N = {lead[0]}, got {group_size!r}")
            G, T = group_size, lead[1]
            B = lead[0] // G
        else:
            raise ValueError(f"{src_name} must be (B, G, T, {'V' if logits is not None else 'H'}) or "
                             f"(N, T, {'V' if logits is not None else 'H'}), got shape {tuple(src.shape)}")
        if B * G == 0:
            raise ValueError(f"{src_name} of shape {tuple(src.shape)} holds no sequence (B * G = 0): "
                             "the loss is a mean over sequences")
        check_index_dtype(tokens, "tokens")
        if tuple(tokens.shape) != lead:
            raise ValueError(f"tokens must have shape {lead} ({src_name}.shape[:-1]), got {tuple(tokens.shape)}")
        self.shape = (B, G, T)
        self.vocab_group = vocab_group
        flat = len(lead) == 2
        dev = src.device
        if ref_logprobs is not None and ref_logits is not None:
            raise ValueError("give ref_logprobs or ref_logits, not both")
        if ref_logits is not None and ref_hidden is not None:
            raise ValueError("give ref_logits or ref_hidden, not both")
        if ref_logits is not None:
            check_logits(ref_logits, name="ref_logits")
            if logits is not None and tuple(ref_logits.shape) != tuple(logits.shape):
                raise ValueError(f"ref_logits must have the logits' shape {tuple(logits.shape)}, "
                                 f"got {tuple(ref_logits.shape)}")
        has_ref = ref_logprobs is not None or ref_logits is not None or ref_hidden is not None
        if beta > 0 and not has_ref:
            raise ValueError("beta > 0 needs a reference: ref_logprobs, ref_logits or ref_hidden (or set beta=0)")
        self.denominator = _resolve_denominator(denominator, old_logprobs is not None, has_ref)
        mask_b = resolve_mask(mask, lengths, tokens)  # checks shapes against the given tokens
        self.mask = (torch.ones((B, G, T), dtype=torch.bool, device=tokens.device) if mask_b is None
                     else mask_b.reshape(B, G, T))
        nonempty = self.mask.any(-1)
        # advantage mode / rewards
        if isinstance(advantage, Tensor):
            ok = [(B, G)] + ([(B, G, T)] if adv_token_ok else [])
            if tuple(advantage.shape) not in ok:
                raise ValueError(f"advantage tensor must have shape {' or '.join(map(str, ok))}, "
                                 f"got {tuple(advantage.shape)}")
            if not advantage.dtype.is_floating_point:
                raise TypeError(f"advantage tensor must be float, got {advantage.dtype}")
            if advantage.device != dev:
                raise ValueError(f"advantage is on {advantage.device} but the logits are on {dev}")
            valid = self.mask if advantage.dim() == 3 else nonempty
            self.advantage = finite_where(advantage.detach(), valid, "advantage")
        elif isinstance(advantage, str) and advantage in adv_modes:
            self.advantage = advantage
            if rewards is None:
                raise ValueError(f"advantage={advantage!r} needs rewards (B, G)")
        else:
            raise ValueError(f"advantage must be one of {adv_modes} or a tensor, got {advantage!r}")
        if rewards is not None:
            if not isinstance(rewards, Tensor) or not (rewards.dtype.is_floating_point or
                                                       rewards.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"rewards must be a float tensor of shape {(B, G)}, got "
                                f"{type(rewards).__name__ if not isinstance(rewards, Tensor) else rewards.dtype}")
            if flat and tuple(rewards.shape) == (B * G,):
                rewards = rewards.reshape(B, G)
            if tuple(rewards.shape) != (B, G):
                want = f"{(B, G)}" + (f" or {(B * G,)}" if flat else "")
                raise ValueError(f"rewards must have shape {want}, got {tuple(rewards.shape)}")
            if rewards.device != dev:
                raise ValueError(f"rewards is on {rewards.device} but the logits are on {dev}; put them on one device")
            rewards = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
            rewards = finite_where(rewards, torch.ones((), dtype=torch.bool, device=dev), "rewards")
        self.rewards = rewards
        ref_tok = _check_float(ref_logprobs, "ref_logprobs", (B, G, T), flat, dev)
        old_tok = _check_float(old_logprobs, "old_logprobs", (B, G, T), flat, dev)
        self.ref_tok = None if ref_tok is None else finite_where(ref_tok.detach(), self.mask, "ref_logprobs")
        self.old_tok = None if old_tok is None else finite_where(old_tok.detach(), self.mask, "old_logprobs")
        # the policy's per-token log-probs and entropies: the only pass over the logits
        self.logp, self.entropy = self._logprobs(logits, tokens, hidden, weight, bias, temperature, chunk_size,
                                                 grad=True)
        if ref_logits is not None or ref_hidden is not None:
            with torch.no_grad():
                self.ref_tok = self._logprobs(ref_logits, tokens, ref_hidden, ref_weight if ref_weight is not None
                                              else weight, ref_bias, temperature, chunk_size, grad=False)[0]
        self.tokens = tokens.reshape(B, G, T)

    def _logprobs(self, logits, tokens, hidden, weight, bias, temperature, chunk_size, grad):
        """``(logp, entropy)`` per token, ``(B, G, T)``, exact zeros at masked positions;
        the entropy comes from the same pass (for the policy; None for the reference)."""
        valid = self.mask.reshape(tokens.shape)
        kw = dict(temperature=temperature, valid=valid, return_entropy=grad, vocab_group=self.vocab_group)
        if logits is not None:
            out = token_logprobs(logits, tokens, **kw)
        else:
            from .linear import linear_token_logprobs  # local: the linear path is optional

            out = linear_token_logprobs(hidden, weight, tokens, bias=bias, chunk_size=chunk_size, **kw)
        lp, ent = out if grad else (out, None)
        zero = lambda x: torch.where(self.mask, x.reshape(self.shape), torch.zeros((), dtype=x.dtype,  # noqa: E731
                                                                                   device=x.device))
        return zero(lp), None if ent is None else zero(ent)
