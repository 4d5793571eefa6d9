"""Policy-gradient losses on the fused log-prob op: one composable core, thin presets.

:func:`policy_loss` takes TRL 1.16's ``GRPOConfig`` option names (and verl's for
what only verl has; see :class:`LossOptions`); :func:`gspo_loss` and
:func:`grpo_loss` are presets over it. Whatever the options, a call reads the
logits once forward (the policy's per-token log-probs and entropies, one call
of the fused kernel) and once backward, writing their gradient once; everything
between is O(N*T) per-token math (:mod:`.core`).
"""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from .._checks import ValueChecks
from ..errors import OptionError
from .advantages import GROUP_NORM_EPS, contrast_advantage, group_norm_advantage
from .core import compose
from .inputs import IGNORE_INDEX, resolve
from .masks import rollout_correction
from .options import AGGREGATIONS, LOSS_TYPES, OPTION_NAMES, LossOptions, unknown_option_error

__all__ = [
    "ARTICLE_GSPO",
    "GRPOLoss",
    "GSPOLoss",
    "LossOptions",
    "PolicyLoss",
    "contrast_advantage",
    "group_norm_advantage",
    "grpo_loss",
    "gspo_loss",
    "policy_loss",
    "rollout_correction",
    "GROUP_NORM_EPS",
    "LOSS_TYPES",
    "AGGREGATIONS",
]

# The source article's form of GSPO, one argument away: gspo_loss(..., **ARTICLE_GSPO) with ref_logprobs.
ARTICLE_GSPO = dict(advantage="contrast", denominator="ref", beta=0.05, kl="k1", epsilon=0.2, epsilon_high=0.2)
# The GSPO paper's sequence-level setting (Zheng et al. 2025): clip range 3e-4 / 4e-4, no KL.
GSPO_DEFAULTS = dict(loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4, beta=0.0, kl="k3", use_bias_correction_kl=False)
GRPO_DEFAULTS = dict(epsilon=0.2, beta=0.0, kl="k3", use_bias_correction_kl=False)
GRPO_AGG_TO_LOSS_TYPE = {
    "seq-mean-token-mean": "grpo",
    "token-mean": "bnpo",
    "seq-mean-token-sum": "luspo",
    "dr_grpo": "dr_grpo",
}
GSPO_LEVELS = ("sequence", "sequence_token")


def _options(options: dict) -> LossOptions:
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise unknown_option_error(unknown)
    return LossOptions(**options)


def policy_loss(
    logits: Optional[Tensor] = None,
    tokens: Optional[Tensor] = None,
    advantages: Union[Tensor, str, None] = None,
    mask: Optional[Tensor] = None,
    *,
    rewards: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    ref_logits: Optional[Tensor] = None,
    sampling_logprobs: Optional[Tensor] = None,
    importance_sampling_ratio: Optional[Tensor] = None,
    num_items_in_batch=None,
    hidden: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    ref_hidden: Optional[Tensor] = None,
    ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    group_size: Optional[int] = None,
    ignore_index: Optional[int] = IGNORE_INDEX,
    chunk_size: Optional[int] = None,
    vocab_group=None,
    process_group=None,
    check_inputs: bool = True,
    inplace_backward: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    max_seqlen: Optional[int] = None,
    memory_budget: Optional[int] = None,
    **options,
):
    """Every policy loss of TRL 1.16's ``GRPOTrainer`` (and verl's), over logits or hidden states.

    Per token ``t`` of sequence ``i`` (``lp`` the policy's log-prob, ``m`` the mask, ``L = sum_t m``)::

        log w   = lp - old (token) | (1/L) sum_t m (lp - old) (sequence) | GSPO-token
        l_t     = objective(w, A, lp)               by loss_type (see LossOptions)
        l_t    *= off-policy mask, high-entropy mask, rollout-correction ratio
        l_t    += beta * KL_t(ref, lp)  (* w with use_bias_correction_kl)
        loss    = aggregate(l, m) - entropy_coef * mean entropy over the kept tokens

    Args:
        logits: ``(B, G, T, V)`` or ``(N, T, V)`` (any leading strides, stride 1 on V); or
            ``hidden`` ``(..., T, H)`` with ``weight`` ``(V, H)`` (and ``bias``) instead.
        tokens: ``(B, G, T)`` / ``(N, T)`` int32/int64 sampled ids; ids equal to
            ``ignore_index`` (default -100, Hugging Face's label padding) count as masked.
        advantages: ``(B, G)`` / ``(N,)`` per sequence or ``(B, G, T)`` / ``(N, T)`` per token
            (TRL's ``inputs["advantages"]``), detached; or ``"group_norm"`` / ``"contrast"``
            (or None: ``options["advantage"]``, default "group_norm") computed from ``rewards``
            ``(B, G)`` per group (flat input needs ``group_size``).
        mask: ``(B, G, T)`` bool, integer or 0/1 float (other float values are refused), or
            ``lengths`` ``(B, G)``.
        old_logprobs: the behaviour policy's per-token log-probs; without them the weight's
            denominator is the detached current policy (as TRL).
        ref_logprobs / ref_logits / ref_hidden (+ref_weight, ref_bias): the reference, for the KL.
        sampling_logprobs: the rollout engine's per-token log-probs (NaN: not scored), for the
            off-policy mask and ``vllm_importance_sampling_mode``.
        importance_sampling_ratio: a precomputed rollout-correction ratio, per token or per
            sequence (TRL's ``inputs["importance_sampling_ratio"]``).
        num_items_in_batch: the valid-token count of the whole generation batch, for the
            ``token-sum-norm`` aggregation (dapo, cispo, vespo); default this batch's count.
        group_size: G for flat or packed input (only needed to compute advantages from rewards).
        cu_seqlens: packed sequences (padding-free; see :mod:`gspo_kernels.sequences`): logits
            ``(total, V)`` or ``(1, total, V)`` (hidden ``(total, H)``), per-token tensors
            ``(total,)`` or ``(1, total)``, per-sequence ones ``(N,)``; sequence i is rows
            ``[cu[i], cu[i+1])``, a group ``group_size`` consecutive sequences; the mask selects
            each sequence's completion tokens. ``max_seqlen`` (its longest sequence) saves a host read.
        vocab_group: the vocabulary is sharded over this process group (tensor parallel).
        process_group: data parallel with a group's completions split across ranks (advantages
            from rewards are computed over the whole group).
        memory_budget: bytes of the hidden-state path's one self-sized buffer (chunk of logits, dz
            slice); default 256 MiB on a GPU, 64 MiB elsewhere (see :func:`linear_token_logprobs`).
        inplace_backward: write the logits' gradient into their storage (logits source only; see
            :func:`token_logprobs`): the loss then needs no logits-sized gradient buffer.
        check_inputs: check values (ids in ``[0, V)`` and finite old/ref/advantages/correction
            ratio at valid positions, lengths in ``[0, T]``, a 0/1 float mask, finite rewards) on
            one device flag read once after the kernels (on the Triton path computed inside the
            fused tail's forward kernel: no launch of their own). ``False``: nothing checked,
            no host sync. Shapes are always checked.
        **options: :class:`LossOptions` fields (TRL's names and defaults: ``loss_type="dapo"``,
            ``importance_sampling_level="token"``, ``epsilon=0.2``, ``beta=0.0``, ...).

    Returns:
        ``(loss, metrics)``: a scalar and a dict of detached tensors: ``ratio`` (the importance
        weight, per sequence or per token), ``advantage`` (B, G), ``seq_logprobs`` (B, G),
        ``policy_loss`` (the aggregated loss before the entropy bonus), ``kl`` (mean over valid
        tokens; 0 without a reference), ``entropy`` (mean over valid tokens, same pass),
        TRL's ``clip_ratio/{low_mean,high_mean,region_mean,low_min,high_max}`` (PPO-clip types;
        ``clip_fraction`` = region_mean), ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, and
        ``sampling/importance_sampling_ratio/{min,mean,max}`` when a correction ratio is used.
    """
    opt = _options(options)
    checks = ValueChecks(enabled=check_inputs)
    mode = advantages if isinstance(advantages, str) else opt.advantage
    inp = resolve(
        opt,
        logits=logits,
        tokens=tokens,
        mask=mask,
        lengths=lengths,
        advantages=advantages,
        rewards=rewards,
        hidden=hidden,
        weight=weight,
        bias=bias,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
        ref_logits=ref_logits,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        sampling_logprobs=sampling_logprobs,
        importance_sampling_ratio=importance_sampling_ratio,
        num_items_in_batch=num_items_in_batch,
        group_size=group_size,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        vocab_group=vocab_group,
        inplace_backward=inplace_backward,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        checks=checks,
        memory_budget=memory_budget,
    )
    loss, metrics = compose(inp, opt, mode, process_group, checks=checks)
    return checks.finish(loss), metrics


def gspo_loss(
    logits: Optional[Tensor] = None,
    tokens: Optional[Tensor] = None,
    rewards: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    advantage: Union[str, Tensor] = "group_norm",
    level: str = "sequence",
    **kwargs,
):
    """GSPO (Zheng et al. 2025): sequence-level importance weight and clipping.

    ``s_i = exp((1/L) sum_t m (lp - old))``, ``policy_i = -min(s A, clip(s, 1-eps, 1+eps_high) A)``,
    ``loss = mean_i (policy_i + beta * (1/L) sum_t m KL_t)``: :func:`policy_loss` with
    ``loss_type="grpo"``, ``importance_sampling_level=level`` ("sequence", or
    "sequence_token" for GSPO-token), and the paper's defaults ``epsilon=3e-4``,
    ``epsilon_high=4e-4``, ``beta=0``, ``advantage="group_norm"``. The source article's form
    is one argument away: ``gspo_loss(..., ref_logprobs=ref, **gspo_kernels.ARTICLE_GSPO)``.

    Shapes: logits ``(B, G, T, V)`` (or ``(N, T, V)`` with ``group_size``), tokens/mask
    ``(B, G, T)``, rewards ``(B, G)``; ``advantage`` a mode or a ``(B, G)`` (``(B, G, T)`` at
    ``sequence_token`` level) tensor. Every other keyword: see :func:`policy_loss`.
    """
    if level not in GSPO_LEVELS:
        raise OptionError(f"level must be one of {GSPO_LEVELS}, got {level!r}")
    kwargs = {**GSPO_DEFAULTS, **kwargs, "importance_sampling_level": level}
    return policy_loss(logits, tokens, advantage, mask, rewards=rewards, **kwargs)


def grpo_loss(
    logits: Optional[Tensor] = None,
    tokens: Optional[Tensor] = None,
    rewards: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    advantage: Union[str, Tensor] = "group_norm",
    loss_agg: str = "seq-mean-token-mean",
    **kwargs,
):
    """GRPO: token-level importance ratio and clipping, ``l_t = -min(r_t A, clip(r_t) A) + beta KL_t``,
    aggregated by ``loss_agg``: "seq-mean-token-mean" (default; TRL's grpo), "token-mean" (bnpo),
    "seq-mean-token-sum" (luspo), "dr_grpo" (divide by ``N * T``). :func:`policy_loss` with
    ``importance_sampling_level="token"``, ``epsilon=0.2``, ``beta=0``; same shapes as :func:`gspo_loss`."""
    if loss_agg not in GRPO_AGG_TO_LOSS_TYPE:
        raise OptionError(f"loss_agg must be one of {tuple(GRPO_AGG_TO_LOSS_TYPE)}, got {loss_agg!r}")
    kwargs = {
        **GRPO_DEFAULTS,
        **kwargs,
        "loss_type": GRPO_AGG_TO_LOSS_TYPE[loss_agg],
        "importance_sampling_level": "token",
    }
    return policy_loss(logits, tokens, advantage, mask, rewards=rewards, **kwargs)


_CALL_ARGS = (
    "chunk_size",
    "group_size",
    "ignore_index",
    "check_inputs",
    "vocab_group",
    "process_group",
    "inplace_backward",
    "max_seqlen",
    "memory_budget",
)


class _LossModule(nn.Module):
    """Holds a loss's options, checked at construction; ``forward`` takes the tensors."""

    _defaults: dict = {}
    _choices: dict = {}  # preset-only options and their allowed values

    def __init__(self, **options):
        super().__init__()
        for k, allowed in self._choices.items():
            if k in options and options[k] not in allowed:
                raise OptionError(f"{k} must be one of {tuple(allowed)}, got {options[k]!r}")
        unknown = sorted(set(options) - OPTION_NAMES - set(_CALL_ARGS) - set(self._choices))
        if unknown:
            raise unknown_option_error(unknown)
        _options({**self._defaults, **{k: v for k, v in options.items() if k in OPTION_NAMES}})
        self.options = options


class PolicyLoss(_LossModule):
    """``nn.Module`` over :func:`policy_loss`: ``PolicyLoss(loss_type="dapo", beta=0.04)(logits, tokens,
    advantages, mask, old_logprobs=..., ref_logprobs=...)``; takes every option the call takes."""

    def forward(self, logits=None, tokens=None, advantages=None, mask=None, **tensors):
        return policy_loss(logits, tokens, advantages, mask, **{**self.options, **tensors})


class GSPOLoss(_LossModule):
    """``nn.Module`` over :func:`gspo_loss`; takes every option the call takes."""

    _defaults = GSPO_DEFAULTS
    _choices = {"level": GSPO_LEVELS}

    def forward(self, logits=None, tokens=None, rewards=None, mask=None, **tensors):
        return gspo_loss(logits, tokens, rewards, mask, **{**self.options, **tensors})


class GRPOLoss(_LossModule):
    """``nn.Module`` over :func:`grpo_loss`; takes every option the call takes."""

    _defaults = GRPO_DEFAULTS
    _choices = {"loss_agg": tuple(GRPO_AGG_TO_LOSS_TYPE)}

    def forward(self, logits=None, tokens=None, rewards=None, mask=None, **tensors):
        return grpo_loss(logits, tokens, rewards, mask, **{**self.options, **tensors})
