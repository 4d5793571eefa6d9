"""The fused tail's launch plan: which compiled variant a call needs (:class:`TailSpec`, its
``tl.constexpr`` switches and dtypes), the option floats the kernels read (one cached fp64
device tensor per option set, CUDA-graph safe), and the three launches (:mod:`.kernels`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..._kernels import HAS_TRITON, Launch
from ..advantages import GROUP_NORM_EPS
from ..inputs import LossInputs
from ..options import LossOptions
from . import math as tm
from .kernels import BLOCK_N, BLOCK_T, NUM_WARPS, _tail_fwd_kernel, _tail_reduce_kernel
from .kernels_bwd import _tail_bwd_kernel
from .math import K

if HAS_TRITON:
    import triton.language as tl


@dataclass(frozen=True)
class TailSpec:
    """The compile-time switches of one call (``tl.constexpr`` in the kernels) and its dtypes:
    ``acc`` the log-probs'; ``ps``/``pr`` those torch promotes the off-policy gap and the rollout
    log-ratio to; ``rd`` the correction ratio's; ``vd`` VESPO's log-weight's; ``ld`` the loss's."""

    level: int
    den: int
    adv_mode: int
    obj: int
    has_delta: bool
    has_clipc: bool
    kl: int
    bias_kl: bool
    add_kl: bool
    offpol: int
    entmask: bool
    isr_mode: int
    isr_mask: bool
    has_cmin: bool
    has_cmax: bool
    clip_tok: bool
    pass1: bool
    agg: int
    has_nib: bool
    ent_bonus: bool
    acc: torch.dtype
    ps: torch.dtype
    pr: torch.dtype
    rd: torch.dtype
    vd: torch.dtype
    ld: torch.dtype
    check: int = 0  # the value checks the forward kernel computes (.checks.BITS)


def spec_of(inp: LossInputs, opt: LossOptions, mode: str) -> TailSpec:
    N, T = inp.mask.shape
    acc = inp.logp.dtype
    level = tm.LEVELS[opt.importance_sampling_level]
    obj = tm.OBJS[opt.objective]
    if inp.advantages is not None:
        adv_mode = tm.ADV_SEQ if inp.advantages.shape[-1] == 1 else tm.ADV_TOK
    else:
        adv_mode = tm.ADV_CONTRAST if mode == "contrast" else tm.ADV_GROUP_NORM
    cmode = opt.vllm_importance_sampling_mode
    if cmode is not None:  # a sequence ratio stays one per sequence at T = 1 (its metrics count every sequence)
        isr_mode = tm.ISR_MODE_SEQ if cmode.startswith("sequence") else tm.ISR_MODE_TOK
        assert inp.old is not None and inp.sampling is not None, "inputs.resolve requires them for the mode"
        pr = torch.promote_types(inp.old.dtype, inp.sampling.dtype)
        rd = pr
    elif inp.is_ratio is not None:
        isr_mode = tm.ISR_TOK if inp.is_ratio.shape[-1] == T else tm.ISR_SEQ
        pr = acc
        rd = inp.is_ratio.dtype if inp.is_ratio.dtype in (torch.float32, torch.float64) else torch.float32
    else:
        isr_mode, pr, rd = tm.ISR_NONE, acc, acc
    offpol = 0 if opt.off_policy_mask_threshold is None else (1 if inp.sampling is not None else 2)
    ps = torch.promote_types(inp.sampling.dtype, acc) if inp.sampling is not None and offpol == 1 else acc
    vespo = obj == tm.OBJS["vespo"]
    vd = torch.promote_types(acc, rd) if vespo and isr_mode else acc
    ppo = obj == tm.OBJS["ppo_clip"]
    adv_tok = adv_mode == tm.ADV_TOK or T == 1
    clip_tok = adv_tok or (level != tm.LEVELS["sequence"] and obj in (tm.OBJS["ppo_clip"], tm.OBJS["cispo"]))
    return TailSpec(
        level=level,
        den=tm.DENS[inp.denominator],
        adv_mode=adv_mode,
        obj=obj,
        has_delta=ppo and opt.delta is not None,
        has_clipc=ppo and opt.clip_ratio_c is not None,
        kl=tm.KLS[opt.kl] if inp.ref is not None else 0,
        bias_kl=bool(opt.use_bias_correction_kl),
        add_kl=bool(opt.beta) and inp.ref is not None,
        offpol=offpol,
        entmask=opt.top_entropy_quantile < 1.0,
        isr_mode=isr_mode,
        isr_mask=bool(cmode and cmode.endswith("mask")),
        has_cmin=opt.vllm_importance_sampling_clip_min is not None,
        has_cmax=opt.vllm_importance_sampling_clip_max is not None,
        clip_tok=clip_tok,
        pass1=level != tm.LEVELS["token"] or offpol != 0 or isr_mode == tm.ISR_MODE_SEQ or vespo,
        agg=tm.AGGS[opt.aggregation],
        has_nib=inp.num_items_in_batch is not None,
        ent_bonus=bool(opt.entropy_coef),
        acc=acc,
        ps=ps,
        pr=pr,
        rd=rd,
        vd=vd,
        ld=vd if vespo else acc,
    )


# The option parameters the kernels read, one fp64 device tensor per (options, device).
#
# Lifetime (CUDA graphs): a graph captured around a loss call holds the address of the
# tensor that call read and reads it again at every replay, long after the call returned.
# So a tensor a capture has read is never freed: it moves to _PRM_PINNED, which is never
# evicted. Its bound: one tensor of N_PRM float64 (160 bytes; one 512-byte block of the
# caching allocator) per distinct option set ever captured in this process, far below what
# each capture's own graph and memory pool hold. Eager calls use _PRM_CACHE, a
# least-recently-used map of at most PRM_CACHE_SIZE entries: evicting one there is safe,
# because an eager call's kernels are ordered on its stream before any reuse of the freed
# block and its autograd node keeps its own reference (save_for_backward) until backward.
PRM_CACHE_SIZE = 64
_PRM_CACHE: OrderedDict[tuple, Tensor] = OrderedDict()
_PRM_PINNED: dict[tuple, Tensor] = {}


def _capturing(device: torch.device) -> bool:
    """Whether this call is being captured into a CUDA graph (on the current stream)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _param_values(opt: LossOptions) -> list:
    v = [0.0] * tm.N_PRM
    for slot, x in {
        tm.R_LO: 1.0 - opt.epsilon,
        tm.R_HI: 1.0 + opt.eps_high,
        tm.R_DELTA: opt.delta,
        tm.R_CLIPC: opt.clip_ratio_c,
        tm.R_EPSH: opt.eps_high,
        tm.R_BETA: opt.beta,
        tm.R_TPOS: opt.sapo_temperature_pos,
        tm.R_TNEG: opt.sapo_temperature_neg,
        tm.R_KPOS: opt.vespo_k_pos,
        tm.R_LPOS: opt.vespo_lambda_pos,
        tm.R_KNEG: opt.vespo_k_neg,
        tm.R_LNEG: opt.vespo_lambda_neg,
        tm.R_LAMMIN: 1e-4,
        tm.R_LOGLO: math.log(1e-8),
        tm.R_GNEPS: GROUP_NORM_EPS,
        tm.R_OFFTHR: opt.off_policy_mask_threshold,
        tm.R_CMIN: opt.vllm_importance_sampling_clip_min,
        tm.R_CMAX: opt.vllm_importance_sampling_clip_max,
        tm.R_Q: 1.0 - opt.top_entropy_quantile,
        tm.R_COEF: opt.entropy_coef,
    }.items():
        v[int(slot)] = float(x or 0.0)
    return v


def _build_params(v: list, device: torch.device, capturing: bool) -> Tensor:
    if not capturing:  # one host-to-device copy, once per option set
        return torch.tensor(v, dtype=torch.float64, device=device)
    # Under capture a pageable host-to-device copy is not allowed: fill on the device instead, each
    # value a kernel argument recorded in the graph (the tensor is pinned, so these run at replay
    # too and rewrite the same values).
    t = torch.zeros(len(v), dtype=torch.float64, device=device)
    for i, x in enumerate(v):
        if x != 0.0:
            t[i].fill_(x)
    return t


def _params(opt: LossOptions, device: torch.device) -> Tensor:
    """The float options as an fp64 ``(N_PRM,)`` device tensor, built once per (options, device):
    no host-to-device copy in a steady training loop nor in a captured CUDA graph, and alive as long
    as a captured graph can replay (see ``_PRM_PINNED`` above)."""
    key = (opt, device)
    capturing = _capturing(device)
    t = _PRM_PINNED.get(key)
    if t is not None:
        return t
    t = _PRM_CACHE.pop(key, None)
    if t is None:
        t = _build_params(_param_values(opt), device, capturing)
    if capturing:
        _PRM_PINNED[key] = t
        return t
    _PRM_CACHE[key] = t  # most recently used last
    while len(_PRM_CACHE) > PRM_CACHE_SIZE:
        _PRM_CACHE.popitem(last=False)
    return t


# ---------------------------------------------------------------- launches
def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _common(spec) -> dict:
    return dict(
        LEVEL=spec.level,
        DEN=spec.den,
        ADV_MODE=spec.adv_mode,
        OBJ=spec.obj,
        HAS_DELTA=spec.has_delta,
        HAS_CLIPC=spec.has_clipc,
        KL=spec.kl,
        BIAS_KL=spec.bias_kl,
        ADD_KL=spec.add_kl,
        OFFPOL=spec.offpol,
        ENTMASK=spec.entmask,
        ISR_MODE=spec.isr_mode,
        ISR_MASK=spec.isr_mask,
        HAS_CMIN=spec.has_cmin,
        HAS_CMAX=spec.has_cmax,
        ACC=_tl(spec.acc),
        PR=_tl(spec.pr),
        RD=_tl(spec.rd),
        VD=_tl(spec.vd),
        LD=_tl(spec.ld),
        BLOCK=BLOCK_T,
        NCOL=K,
        num_warps=NUM_WARPS,
    )


def fwd_launches(spec, t: dict, out: dict, N: int, T: int, G: int, div: int):
    """The forward's two launches (per-sequence pass, then the reduction) for inputs ``t``
    (name -> tensor; an absent input is any tensor, never read) and outputs ``out``."""
    x = t["lp"]
    g = lambda k: t.get(k) if t.get(k) is not None else x  # noqa: E731
    NT = N * T
    fwd = Launch(
        _tail_fwd_kernel,
        (N,),
        (
            x,
            t["ent"],
            t["mask"],
            g("old"),
            g("ref"),
            g("samp"),
            g("isr"),
            g("adv"),
            g("rew"),
            g("sorted"),
            t["prm"],
            out["part"],
            out["seqm"],
            out["ratio"],
            out["scal"],
            g("tok"),
            g("fmask"),
            g("lens"),
            T,
            G,
            NT,
            NT.bit_length() + 1,
            t.get("vocab", 0),
        ),
        dict(_common(spec), CHECK=spec.check, CLIP_TOK=spec.clip_tok, PASS1=spec.pass1, PS=_tl(spec.ps)),
    )
    red = Launch(
        _tail_reduce_kernel,
        (1,),
        (out["part"], t["prm"], g("nib"), out["loss"], out["pl"], out["met"], out["scal"], out["flag"], N, div),
        dict(
            CHECK=spec.check,
            AGG=spec.agg,
            HAS_NIB=spec.has_nib,
            ENT_BONUS=spec.ent_bonus,
            HAS_KL=spec.kl != 0,
            OBJ=spec.obj,
            CLIP_TOK=spec.clip_tok,
            ISR_MODE=spec.isr_mode,
            ACC=_tl(spec.acc),
            LD=_tl(spec.ld),
            BLOCK=BLOCK_N,
            NCOL=K,
            num_warps=NUM_WARPS,
        ),
    )
    return fwd, red


def bwd_launch(spec, t: dict, part, scal, grad, dlp, dh, N: int, T: int):
    """The backward's one launch: ``dlp`` (and ``dh`` with the entropy bonus) from ``grad``."""
    x = t["lp"]
    g = lambda k: t.get(k) if t.get(k) is not None else x  # noqa: E731
    return Launch(
        _tail_bwd_kernel,
        (N,),
        (
            x,
            t["ent"],
            t["mask"],
            g("old"),
            g("ref"),
            g("samp"),
            g("isr"),
            g("adv"),
            t["prm"],
            part,
            scal,
            grad,
            dlp,
            dh if dh is not None else dlp,
            T,
        ),
        dict(_common(spec), AGG=spec.agg, ENT_GRAD=dh is not None),
    )
