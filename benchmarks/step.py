"""One policy-update step of a causal LM, per loss provider: time, peak memory, memory frontier.

    python -m benchmarks.step                            # CUDA: Qwen2 ~0.5B and ~1.5B, completions 1024 and 8192
    python -m benchmarks.step --device cpu --tiny        # CPU smoke run of every provider on a tiny config

The step: forward of ``transformers.Qwen2ForCausalLM`` (random weights, built from a
config: the shapes of Qwen2.5-0.5B / -1.5B, V = 151,936, tied embeddings; bf16
weights, SDPA attention) over prompt + completion, the GSPO loss, backward, and
``torch.optim.AdamW.step`` (bf16 states). B*G = 16 sequences of a 256-token prompt
and a completion of T tokens; the long case (T = 8192) runs with gradient
checkpointing (``--cases`` says which). Every provider gets the same token ids,
mask, advantages, old log-probs and initial weights, in the same run.

The loss is TRL 1.16's at ``importance_sampling_level="sequence"``,
``loss_type="grpo"``, ``beta=0`` (GSPO): ``w = exp(masked mean of (logp - old))``
per sequence, ``-min(w A, clip(w, 1 - eps, 1 + eps_high) A)``, the masked token
mean per sequence, the mean over sequences. Old log-probs are the initial
policy's own, shifted by a per-sequence offset, so some sequences clip and some
do not. Providers:

  naive                the materialised route: the model's logits for the completion, per-token log-probs
                       with TRL's ``selective_log_softmax`` semantics (its PyTorch path), the loss in plain PyTorch
  trl                  TRL 1.16's default path in ``GRPOTrainer``: ``add_fused_lm_head`` and
                       ``fused_lm_head=True`` (its chunked Triton LM head, ``trl/kernels/chunked_logprob.py``;
                       ``benchmarks/trl_path.py``), the loss in plain PyTorch: what a TRL user compares against
  compile              the same loss (log-probs included) under ``torch.compile``
  liger_logits         Liger-Kernel ``triton_grpo_loss`` on the (N, T+1, V) logits, sequence level, in place
  liger_hidden         Liger-Kernel ``LigerFusedLinearGRPOLoss`` on hidden states + LM head, sequence level
  gspo_logits          the model's logits -> ``gspo_kernels.gspo_loss(inplace_backward=True)``
  gspo_logits_inplace  the model's logits -> ``gspo_kernels.token_logprobs(inplace_backward=True)`` -> the loss
                       in plain PyTorch (what ``gspo_kernels.integrations.trl`` does with ``logprob_source="logits"``)
  gspo_hidden          backbone hidden states + LM head weight -> ``gspo_kernels.gspo_loss(hidden=, weight=)``

Timing (``timing`` column): CUDA, ``cuda_events_l2_flushed``: per step, the
gradients are set to None and the L2 flushed (as ``triton.testing.do_bench``)
before a start event, an end event after ``optimizer.step()``; nothing of the
harness (no copy, allocation or host sync of its own) lies between them. CPU,
``perf_counter`` around the same region. Median and [min, max] of ``--reps``
steps after ``--warmup`` steps (compilation, optimizer state). Peak memory:
``torch.cuda.max_memory_allocated`` over the timed steps (``peak_mb``: weights,
gradients, AdamW state, activations, everything), and ``peak_extra_mb``: that
minus what was allocated at the first timed step's start; on CPU the process's
peak resident set (VmHWM), a smoke figure only. Frontier (CUDA only): the longest
completion T (multiple of ``--frontier-step``) whose warm step fits the memory
budget (``--budget-gb``, enforced with ``torch.cuda.set_per_process_memory_fraction``),
gradient checkpointing on, found by doubling then bisection; every try is a row
(``mode`` = ``try``). Output: a CSV with the op benchmark's columns that apply
and a plot of peak memory against completion length per provider.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import gspo_kernels
from benchmarks.gpu import COLUMNS as OP_COLUMNS
from benchmarks.gpu import STRICT, names
from benchmarks.step_plot import plot

COLUMNS = OP_COLUMNS + [
    "config",
    "params",
    "P",
    "grad_ckpt",
    "ms_min",
    "ms_max",
    "peak_mb",
    "budget_gb",
    "loss",
    "note",
    "transformers",
]
SHAPES = {  # Qwen2.5-0.5B / -1.5B shapes; tiny for CPU runs and tests
    "qwen2-0.5b": dict(
        vocab_size=151_936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
    ),
    "qwen2-1.5b": dict(
        vocab_size=151_936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}
PROVIDERS = (
    "naive",
    "trl",
    "compile",
    "liger_logits",
    "liger_hidden",
    "gspo_logits",
    "gspo_logits_inplace",
    "gspo_hidden",
)
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


# ---------------------------------------------------------------- model and inputs
def build_model(name, device, dtype, seed=0):
    """``Qwen2ForCausalLM`` with random weights, in train mode (dropout is 0 in these configs)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        **SHAPES[name],
        tie_word_embeddings=True,
        max_position_embeddings=131_072,
        attention_dropout=0.0,
        use_cache=False,
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.train()


def set_checkpointing(model, on):
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name in transformers >= 5.2x
        return model.activation_checkpointing_enable(kw) if on else model.activation_checkpointing_disable()
    return model.gradient_checkpointing_enable(kw) if on else model.gradient_checkpointing_disable()


def snapshot(model):
    """The weights, on the CPU, to start every provider from the same point."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass
class Batch:
    ids: torch.Tensor  # (N, P + T) prompt + completion
    tokens: torch.Tensor  # (N, T) the completion
    mask: torch.Tensor  # (N, T) bool, valid completion tokens (lengths T/2 .. T)
    old: torch.Tensor  # (N, T) fp32 old (behaviour) log-probs
    adv: torch.Tensor  # (N,) = (B*G,) fp32 advantages, group by group
    B: int
    G: int
    P: int
    T: int


def selective_log_softmax(logits, index):
    """TRL 1.16's ``selective_log_softmax`` (temperature 1) on its PyTorch path: fp32/fp64 logits,
    the gathered logit minus a row-by-row logsumexp; other dtypes, ``log_softmax`` row by row in the
    logits' dtype, then the gather."""
    if logits.dtype in (torch.float32, torch.float64):
        sel = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        return sel - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return torch.stack(
        [F.log_softmax(row, dim=-1).gather(-1, ix.unsqueeze(-1)).squeeze(-1) for row, ix in zip(logits, index)]
    )


def make_batch(model, B, G, P, T, seed=0, offset=1e-3):
    """Random ids, lengths, advantages; old log-probs = the model's own (under no_grad, one
    sequence at a time) + a per-sequence offset uniform in [-offset, offset]."""
    g = torch.Generator().manual_seed(seed)
    N, V, dev = B * G, model.config.vocab_size, model.device
    ids = torch.randint(0, V, (N, P + T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (N,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(-1)
    adv = torch.randn(B, G, generator=g).reshape(N)
    shift = (torch.rand(N, 1, generator=g) * 2 - 1) * offset
    ids, mask, adv, shift = ids.to(dev), mask.to(dev), adv.to(dev), shift.to(dev)
    with torch.no_grad():
        old = torch.cat(
            [
                selective_log_softmax(
                    model(input_ids=ids[i : i + 1], logits_to_keep=T + 1).logits[:, :-1], ids[i : i + 1, P:]
                ).float()
                for i in range(N)
            ]
        )
    return Batch(ids, ids[:, P:].contiguous(), mask, old + shift, adv, B, G, P, T)


# ---------------------------------------------------------------- losses
def gspo_from_logps(logp, old, mask, adv, eps, eps_high):
    """TRL 1.16's loss at importance_sampling_level="sequence", loss_type="grpo", beta=0, from
    per-token log-probs (N, T); ``adv`` (N,)."""
    m = mask.to(torch.float32)
    n_tok = m.sum(-1).clamp(min=1.0)
    log_w = ((logp - old) * m).sum(-1) / n_tok
    coef_1 = torch.exp(log_w).unsqueeze(-1)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps_high)
    a = adv.unsqueeze(-1)
    per_token = -torch.min(coef_1 * a, coef_2 * a)
    return ((per_token * m).sum(-1) / n_tok).mean()


def naive_loss(logits, tokens, old, mask, adv, eps, eps_high):
    return gspo_from_logps(selective_log_softmax(logits, tokens), old, mask, adv, eps, eps_high)


def _logits(model, b):
    """(N, T+1, V): the positions P-1 .. P+T-1; [:, :-1] predicts the completion."""
    return model(input_ids=b.ids, logits_to_keep=b.T + 1).logits


def _hidden(model, b):
    """(N, T, H): the backbone's final hidden states at the positions that predict the completion."""
    return model.model(input_ids=b.ids).last_hidden_state[:, b.P - 1 : -1]


def providers(device, eps, eps_high, only=None):
    """(name -> loss_fn(model, batch), name -> why it cannot run here)."""
    fns, skipped = {}, {}
    fns["naive"] = lambda m, b: naive_loss(_logits(m, b)[:, :-1], b.tokens, b.old, b.mask, b.adv, eps, eps_high)
    try:
        import trl.kernels  # noqa: F401

        from benchmarks import trl_path
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        skipped["trl"] = f"trl not importable ({type(e).__name__}: {e})"
    else:
        fns["trl"] = lambda m, b: gspo_from_logps(
            trl_path.step_logprobs(m, b.ids, b.mask, b.P), b.old, b.mask, b.adv, eps, eps_high
        )
    compiled = torch.compile(naive_loss)
    fns["compile"] = lambda m, b: compiled(_logits(m, b)[:, :-1], b.tokens, b.old, b.mask, b.adv, eps, eps_high)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        reason = f"liger_kernel not importable ({type(e).__name__}: {e})"
        skipped["liger_logits"] = skipped["liger_hidden"] = reason
    else:
        if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            fns["liger_logits"] = lambda m, b: triton_grpo_loss(
                _logits(m, b),
                b.old,
                None,
                b.tokens,
                b.adv,
                b.mask.int(),
                temperature=1.0,
                beta=0.0,
                eps_low=eps,
                eps_high=eps_high,
                inplace=True,
                loss_type="grpo",
                importance_sampling_level="sequence",
                reduce=True,
            )[0]
        else:
            skipped["liger_logits"] = "Liger's Triton kernels need CUDA (or TRITON_INTERPRET=1)"
        liger_mod = LigerFusedLinearGRPOLoss(
            beta=0.0,
            use_ref_model=False,
            loss_type="grpo",
            epsilon_low=eps,
            epsilon_high=eps_high,
            importance_sampling_level="sequence",
            temperature=1.0,
            compiled=device == "cuda",
        )
        fns["liger_hidden"] = lambda m, b: liger_mod(
            _hidden(m, b), m.lm_head.weight, b.tokens, b.mask.int(), b.adv, old_per_token_logps=b.old
        )[0]
    inplace = {"inplace_backward": True}  # the logits' gradient written into their own storage
    hyper = dict(rewards=None, beta=0.0, epsilon=eps, epsilon_high=eps_high)
    fns["gspo_logits"] = lambda m, b: gspo_kernels.gspo_loss(
        logits=_logits(m, b)[:, :-1],
        tokens=b.tokens,
        mask=b.mask,
        advantage=b.adv,
        old_logprobs=b.old,
        group_size=b.G,
        **hyper,
        **inplace,
    )[0]
    fns["gspo_logits_inplace"] = lambda m, b: gspo_from_logps(
        gspo_kernels.token_logprobs(_logits(m, b)[:, :-1], b.tokens, inplace_backward=True),
        b.old,
        b.mask,
        b.adv,
        eps,
        eps_high,
    )
    fns["gspo_hidden"] = lambda m, b: gspo_kernels.gspo_loss(
        hidden=_hidden(m, b),
        weight=m.lm_head.weight,
        tokens=b.tokens,
        mask=b.mask,
        advantage=b.adv,
        old_logprobs=b.old,
        group_size=b.G,
        **hyper,
    )[0]
    keep = set(only or PROVIDERS)
    return ({k: fns[k] for k in PROVIDERS if k in fns and k in keep}, {k: v for k, v in skipped.items() if k in keep})


# ---------------------------------------------------------------- measurement
def _rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _peak_begin(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        return _rss("VmRSS")
    except OSError:
        return None


def _peak_end(device, base):
    """(peak MiB, peak extra MiB) since _peak_begin."""
    if base is None:
        return None, None
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss("VmHWM")
    return peak / 2**20, (peak - base) / 2**20


def measure(model, state, fn, batch, device, warmup, reps, lr=1e-6):
    """Run warmup + reps steps from ``state``; return per-step ms of the timed ones, the first step's
    loss (initial weights), the peak memory of the timed steps, and the timing method."""
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    cuda = device == "cuda"
    cache = None
    if cuda:
        from benchmarks.gpu import _l2_cache

        cache = _l2_cache()
    ms, losses, events, base = [], [], [], None
    for i in range(warmup + reps):
        opt.zero_grad(set_to_none=True)
        if i == warmup:
            base = _peak_begin(device)
        if cuda:
            cache.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
        else:
            t0 = time.perf_counter()
        loss = fn(model, batch)
        loss.backward()
        opt.step()
        if cuda:
            e.record()
            if i >= warmup:
                events.append((s, e))
        elif i >= warmup:
            ms.append((time.perf_counter() - t0) * 1e3)
        losses.append(loss.detach())
    if cuda:
        torch.cuda.synchronize()
        ms = [s.elapsed_time(e) for s, e in events]
    peak, extra = _peak_end(device, base)
    opt.zero_grad(set_to_none=True)
    return ms, float(losses[0]), peak, extra, "cuda_events_l2_flushed" if cuda else "perf_counter"


def _cleanup(model, device):
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def try_step(model, state, fn, batch, device, warmup, reps):
    """measure(), or None when the step runs out of device memory (freed before returning)."""
    try:
        res = measure(model, state, fn, batch, device, warmup, reps)
    except OOM:
        res = None
    _cleanup(model, device)
    return res


def frontier(model, state, fn, B, G, P, device, start, step, max_T, on_try):
    """Longest completion T (a multiple of ``step``, <= max_T) whose warm step fits; doubling from
    ``start``, then bisection. ``on_try(T, result)`` sees every try. Returns (T or 0, result at T)."""

    def fits(T):
        try:
            res = try_step(model, state, fn, make_batch(model, B, G, P, T), device, 1, 1)
        except OOM:  # the inputs' own set-up did not fit
            res = None
        _cleanup(model, device)
        on_try(T, res)
        return res

    lo, hi, best = 0, None, None
    T = start
    while max_T >= T:
        res = fits(T)
        if res is None:
            hi = T
            break
        lo, best = T, res
        T *= 2
    if hi is None:
        hi = min(T, max_T + step)
    while hi - lo > step:
        mid = max((lo + hi) // 2 // step * step, lo + step)
        res = fits(mid)
        if res is None:
            hi = mid
        else:
            lo, best = mid, res
    return lo, best


# ---------------------------------------------------------------- main
def _cases(spec):
    """ "1024:off,8192:on" -> [(1024, False), (8192, True)] (completion length, gradient checkpointing)."""
    return [(int(t), ck == "on") for t, _, ck in (part.partition(":") for part in spec.split(","))]


def _case_list(text):
    if not all(t.isdigit() and ck in ("on", "off") for t, _, ck in (c.partition(":") for c in text.split(","))):
        raise argparse.ArgumentTypeError(f"cases must be T:on|off[,T:on|off...], got {text!r}")
    return text


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_gpu_session.py parses gpu_session.sh's steps with it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny config and shapes (a CPU smoke run)")
    p.add_argument(
        "--configs", default=None, type=names(tuple(SHAPES)), help=f"comma-separated, of {', '.join(SHAPES)}"
    )
    p.add_argument(
        "--cases",
        default=None,
        type=_case_list,
        help='completion length:gradient checkpointing, e.g. "1024:off,8192:on"',
    )
    p.add_argument("--B", type=int, default=None)
    p.add_argument("--G", type=int, default=None)
    p.add_argument("--prompt", type=int, default=None)
    p.add_argument("--dtype", default=None, help="weights and activations (default: bfloat16; tiny: float32)")
    p.add_argument("--eps", type=float, default=3e-4)
    p.add_argument("--eps-high", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=None, help="timed steps per provider (default 5; tiny 3)")
    p.add_argument("--providers", default=None, type=names(PROVIDERS), help="comma-separated subset (default: all)")
    p.add_argument("--no-frontier", action="store_true")
    p.add_argument("--budget-gb", type=float, default=80.0, help="frontier memory budget, 1e9 bytes")
    p.add_argument("--frontier-start", type=int, default=1024)
    p.add_argument("--frontier-step", type=int, default=512)
    p.add_argument("--frontier-max", type=int, default=65_536)
    p.add_argument("--out", default=None, help="CSV (default benchmarks/results/step.csv; CPU: step_cpu_smoke.csv)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    dev, tiny = args.device, args.tiny
    configs = (args.configs or ("tiny" if tiny else "qwen2-0.5b,qwen2-1.5b")).split(",")
    cases = _cases(args.cases or ("16:off,32:on" if tiny else "1024:off,8192:on"))
    B, G = args.B or 2, args.G or (2 if tiny else 8)
    P = args.prompt or (8 if tiny else 256)
    dtype_name = args.dtype or ("float32" if tiny else "bfloat16")
    dtype = getattr(torch, dtype_name)
    reps = args.reps or (3 if tiny else 5)
    out = args.out or f"benchmarks/results/{'step' if dev == 'cuda' else 'step_cpu_smoke'}.csv"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("CPU run: the fused ops use their chunked PyTorch path")
    import transformers
    import triton

    meta = dict(
        device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        transformers=transformers.__version__,
        op="step",
        B=B,
        G=G,
        P=P,
        dtype=dtype_name,
        gbps="",
    )
    fns, skipped = providers(dev, args.eps, args.eps_high, args.providers and args.providers.split(","))
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    threads = (
        ""
        if dev != "cpu"
        else (
            f", {torch.get_num_threads()} torch threads of {os.cpu_count()} CPUs, load "
            f"average {os.getloadavg()[0]:.2f}: CPU times are a smoke figure"
        )
    )
    print(
        f"device {meta['device']} | torch {meta['torch']} | transformers {meta['transformers']} | "
        f"triton {meta['triton']}{threads}"
    )
    rows = []

    def row(**kw):
        rows.append({**meta, **{k: "" for k in COLUMNS if k not in meta}, **kw})
        return rows[-1]

    for cfg in configs:
        model = build_model(cfg, dev, dtype)
        state = snapshot(model)
        n_params = sum(t.numel() for t in model.parameters())
        V = model.config.vocab_size
        print(
            f"\n{cfg}: {n_params / 1e6:.1f}M parameters, V = {V}, {dtype_name}, attention "
            f"{model.config._attn_implementation}, AdamW; B*G = {B}x{G}, prompt {P}"
        )
        common = dict(config=cfg, params=n_params, V=V)
        for T, ckpt in cases:
            set_checkpointing(model, ckpt)
            batch = make_batch(model, B, G, P, T)
            print(
                f"  completion T = {T}, gradient checkpointing {'on' if ckpt else 'off'}: median ms of {reps} "
                f"steps [min-max] after {args.warmup}, peak memory"
            )
            res = {}
            for name, fn in fns.items():
                try:
                    r = try_step(model, state, fn, batch, dev, args.warmup, reps)
                except Exception as e:  # noqa: BLE001 - report and go on with the other providers
                    if STRICT:
                        raise
                    print(f"    {name:<21} skipped ({type(e).__name__}: {str(e).splitlines()[0][:150]})")
                    _cleanup(model, dev)
                    continue
                if r is None:
                    print(f"    {name:<21} out of memory")
                    row(**common, provider=name, mode="step", T=T, grad_ckpt=ckpt, note="oom")
                    continue
                ms, loss, peak, extra, how = r
                med = statistics.median(ms)
                res[name] = (med, peak, loss)
                row(
                    **common,
                    provider=name,
                    mode="step",
                    T=T,
                    grad_ckpt=ckpt,
                    ms=f"{med:.2f}",
                    ms_min=f"{min(ms):.2f}",
                    ms_max=f"{max(ms):.2f}",
                    timing=how,
                    peak_mb="" if peak is None else f"{peak:.1f}",
                    peak_extra_mb="" if extra is None else f"{extra:.1f}",
                    loss=f"{loss:.9g}",
                )
                mem = "" if peak is None else f" peak {peak / 1024:8.2f} GiB (step +{extra:.0f} MiB)"
                print(f"    {name:<21}{med:10.1f} ms [{min(ms):.1f}-{max(ms):.1f}]{mem} loss {loss:.7g}")
            batch = None
            _cleanup(model, dev)
            if "naive" in res:
                base = res["naive"]
                for name, r in res.items():
                    if name == "naive":
                        continue
                    speed = base[0] / r[0]
                    speed = f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower"
                    mem = f", peak memory {r[1] / base[1]:.2f}x" if r[1] and base[1] else ""
                    rel = abs(r[2] - base[2]) / max(abs(base[2]), 1e-30)
                    print(f"    {name} vs naive: {speed}{mem}, loss rel. diff {rel:.1e}")
        if dev == "cuda" and not args.no_frontier:
            budget = args.budget_gb * 1e9
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
            set_checkpointing(model, True)
            print(
                f"  frontier: longest completion whose step fits {args.budget_gb:g} GB "
                f"(gradient checkpointing on, step {args.frontier_step}, at most {args.frontier_max})"
            )
            for name, fn in fns.items():

                def on_try(T, r, name=name):
                    row(
                        **common,
                        provider=name,
                        mode="try",
                        T=T,
                        grad_ckpt=True,
                        budget_gb=args.budget_gb,
                        peak_mb="" if r is None else f"{r[2]:.1f}",
                        note="oom" if r is None else "fits",
                    )

                try:
                    T, r = frontier(
                        model,
                        state,
                        fn,
                        B,
                        G,
                        P,
                        dev,
                        args.frontier_start,
                        args.frontier_step,
                        args.frontier_max,
                        on_try,
                    )
                except Exception as e:  # noqa: BLE001
                    if STRICT:
                        raise
                    print(f"    {name:<21} skipped ({type(e).__name__}: {str(e).splitlines()[0][:150]})")
                    continue
                capped = " (the search's maximum)" if args.frontier_max <= T else ""
                row(
                    **common,
                    provider=name,
                    mode="frontier",
                    T=T,
                    grad_ckpt=True,
                    budget_gb=args.budget_gb,
                    peak_mb="" if r is None else f"{r[2]:.1f}",
                    note="at max" if capped else "",
                )
                print(f"    {name:<21} T = {T}{capped}" + ("" if r is None else f", peak {r[2] / 1024:.2f} GiB"))
            torch.cuda.set_per_process_memory_fraction(1.0)
        model = state = None
        _cleanup(torch.nn.Module(), dev)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")
    plot(rows, os.path.splitext(out)[0] + ".png")


if __name__ == "__main__":
    main()
