"""GPU benchmark runner: ops x providers x modes x shapes -> one CSV row per measurement.

    python -m benchmarks.gpu --out benchmarks/results/gpu.csv            # on a CUDA GPU: every sweep
    python -m benchmarks.gpu --device cpu --tiny --out /tmp/smoke.csv    # end-to-end smoke run on CPU

Ops: ``sequence_logprobs``, ``token_entropy`` (per-token log-prob alone, and with the
entropy, both differentiated), ``gspo_loss`` (sequence level), ``grpo_loss`` (token level),
``linear`` (hidden states + LM head, the gradients of both hidden and weight; at each
``--hidden`` width H).
Providers: ``gspo_kernels`` (this package), ``gspo_kernels_inplace`` (``inplace_backward=True``),
``naive`` (the ``reference/`` implementation, eager), ``compile`` (the same under
``torch.compile``), Liger-Kernel when importable on CUDA (otherwise skipped with
the reason printed): ``liger_seq`` and ``liger_token`` (``triton_grpo_loss``,
``loss_type="grpo"``, ``importance_sampling_level`` "sequence" / "token"; the
token level makes three passes over the logits like this package, the sequence
level a log-prob pass more; ``gspo_loss`` is timed against ``liger_seq``, ``grpo_loss`` against
``liger_token``), ``liger`` on the linear op (``LigerFusedLinearGRPOLoss``, sequence
level). Linear only: ``materialized`` (logits by one matmul, then this package's op),
``chunked`` (this package's chunked path, ``linear.FUSED = False``), ``trl_chunked`` (TRL 1.16's
``ChunkedLogProbFunction``, what ``GRPOTrainer`` runs; ``benchmarks/trl_path.py``) and ``gemm``
(cuBLAS alone: ``hidden @ weight.T`` forward, ``dz @ weight`` and ``dz.T @ hidden`` backward with
the logits buffer standing in for dz: the 6 R V H FLOPs any route needs, no softmax; the fused
kernels do 8 R V H, recomputing the logits in backward). And ``copy`` (a device-to-device copy
of the logits: the bandwidth ceiling, measured in the same run).

Byte model (``gbps``): fwd moves one read of the logits; bwd one read and one
write; full both (three passes); copy one read and one write. ``gbps`` = model
bytes / median time, whatever the provider really moves, so providers compare
on one scale and ``gbps / copy_gbps`` is the fraction of the copy rate.
Timing (the ``timing`` column of each row): every timed region holds the
measured op and nothing else. ``do_bench``: ``triton.testing.do_bench`` (warm-up,
then the median of many runs, L2 flushed before each). ``events_clone_outside``:
the providers whose backward overwrites their input (``gspo_kernels_inplace``,
Liger's ``inplace=True``) need a fresh copy of the logits per fwd+bwd; the copy
is made before each run's start event, the L2 is flushed as do_bench does, and
CUDA events around fwd+bwd alone give the per-run times (median). On CPU:
``perf_counter`` (median of a few runs) and ``perf_counter_clone_outside``.
``peak_extra_mb``: ``torch.cuda.max_memory_allocated`` during one run of the mode,
minus what was allocated before it (inputs, and the fresh copy of an in-place
provider), in MiB; empty on CPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch

import gspo_kernels
from reference import (
    grpo_loss_reference,
    gspo_loss_reference,
    naive_sequence_logprobs,
    naive_token_entropy,
    naive_token_logprobs,
)

COLUMNS = [
    "device",
    "torch",
    "triton",
    "provider",
    "op",
    "mode",
    "B",
    "G",
    "T",
    "V",
    "dtype",
    "ms",
    "gbps",
    "peak_extra_mb",
    "timing",
    "H",
]
# GSPO_BENCH_STRICT=1 (gpu_session.sh --dry-run): a provider that fails stops the run instead of
# being reported and skipped, so a rehearsal cannot pass over a broken provider.
STRICT = os.environ.get("GSPO_BENCH_STRICT") == "1"
INPLACE = ("gspo_kernels_inplace", "liger_seq", "liger_token")  # their backward overwrites the input
HIDDEN = 4096  # H of the linear op's main workload (a 7-8B model's hidden size)


def shapes(sweeps, tiny):
    """(B, G, T, V) per sweep; tiny: a CPU-sized stand-in for each."""
    if tiny:
        return [(1, 2, 8, 256)]
    out = []
    if "main" in sweeps:
        out.append((2, 8, 1024, 151_936))
    if "v32k" in sweeps:  # the V = 32,000 roofline goal alone
        out.append((2, 8, 1024, 32_000))
    if "v" in sweeps:  # N*T = 16,384
        out += [(2, 8, 1024, v) for v in (32_000, 128_256, 262_144)]
    if "nt" in sweeps:  # V = 151,936
        out += [(1, 4, 512, 151_936), (1, 8, 1024, 151_936), (4, 8, 1024, 151_936)]
    return out


def _liger():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        return triton_grpo_loss, LigerFusedLinearGRPOLoss
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        print(f"liger providers skipped: liger_kernel not importable ({type(e).__name__}: {e})")
        return None


class Case:
    """Inputs of one shape: a (N, T+1, V) logits buffer (trainers slice [:, :-1]; Liger takes it whole)."""

    def __init__(self, B, G, T, V, dtype, device, H=None):
        g = torch.Generator(device=device).manual_seed(0)
        N = B * G
        self.B, self.G, self.T, self.V, self.device = B, G, T, V, device
        if H is None:
            self.buf = torch.randn(N, T + 1, V, generator=g, device=device, dtype=dtype)
            self.logits = self.buf[:, :-1].view(B, G, T, V)  # strided: stride 1 on V only
        else:
            self.hidden = torch.randn(B, G, T, H, generator=g, device=device, dtype=dtype)
            self.weight = (torch.randn(V, H, generator=g, device=device, dtype=dtype) / H**0.5).requires_grad_(True)
        self.tokens = torch.randint(0, V, (B, G, T), generator=g, device=device)
        lengths = torch.randint(T // 2, T + 1, (B, G), generator=g, device=device)
        self.mask = torch.arange(T, device=device) < lengths.unsqueeze(-1)
        self.rewards = torch.randint(0, 3, (B, G), generator=g, device=device).float()
        self.old = -torch.rand(B, G, T, generator=g, device=device) * 3
        self.ref = self.old - 0.1 * torch.rand(B, G, T, generator=g, device=device)
        self.adv = torch.randn(B, G, generator=g, device=device)
        self.bytes = N * T * V * torch.empty((), dtype=dtype).element_size()

    def wrt(self, x):
        """What a mode differentiates: the input, and the LM head's weight on the linear op."""
        return (x, self.weight) if hasattr(self, "weight") else (x,)


class _Gemm(torch.autograd.Function):
    """The ``gemm`` row: ``z = hidden @ weight.T`` forward; backward ``dz @ weight`` and
    ``dz.T @ hidden`` with ``z`` standing in for dz (cuBLAS's share of the op, nothing else)."""

    @staticmethod
    def forward(ctx, h, w):
        z = h @ w.t()
        ctx.save_for_backward(h, w, z)
        return z.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        h, w, z = ctx.saved_tensors
        return z @ w, z.t() @ h


def _chunked_path(fn):
    """``fn`` through this package's chunked hidden-state path (``linear.FUSED = False``)."""
    from gspo_kernels import linear

    def run(x):
        saved, linear.FUSED = linear.FUSED, False
        try:
            return fn(x)
        finally:
            linear.FUSED = saved

    return run


def providers(op, case, liger, compile_ok, only=None):
    """name -> callable(x) returning a scalar to backpropagate (x: the differentiable input)."""
    c = case
    # Liger's settings (clip 0.2 both sides, k3 KL at beta 0.04) on every provider: the same work
    kw = dict(ref_logprobs=c.ref, old_logprobs=c.old, advantage=c.adv, beta=0.04, epsilon=0.2, epsilon_high=0.2)
    out = {}
    if op == "sequence_logprobs":
        out["gspo_kernels"] = lambda x: gspo_kernels.sequence_logprobs(x, c.tokens, c.mask).sum()
        out["gspo_kernels_inplace"] = lambda x: gspo_kernels.sequence_logprobs(
            x, c.tokens, c.mask, inplace_backward=True
        ).sum()
        naive = lambda x: naive_sequence_logprobs(x, c.tokens, c.mask).sum()  # noqa: E731
    elif op == "token_entropy":  # per-token log-prob + entropy, both differentiated

        def fused_ent(x):
            lp, ent = gspo_kernels.token_logprobs(x, c.tokens, return_entropy=True)
            return lp.sum() + ent.sum()

        out["gspo_kernels"] = lambda x: gspo_kernels.token_logprobs(x, c.tokens).sum()  # log-prob alone
        out["gspo_kernels_entropy"] = fused_ent
        naive = lambda x: naive_token_logprobs(x, c.tokens).sum() + naive_token_entropy(x).sum()  # noqa: E731
    elif op in ("gspo_loss", "grpo_loss"):
        loss_fn = getattr(gspo_kernels, op)
        out["gspo_kernels"] = lambda x: loss_fn(x, c.tokens, None, c.mask, **kw)[0]
        out["gspo_kernels_inplace"] = lambda x: loss_fn(x, c.tokens, None, c.mask, inplace_backward=True, **kw)[0]
        level = "sequence" if op == "gspo_loss" else "token"
        ref_fn = gspo_loss_reference if op == "gspo_loss" else grpo_loss_reference
        naive = lambda x: ref_fn(x, c.tokens, None, c.mask, dtype=torch.float32, **kw)[0]  # noqa: E731
        if liger is not None and case.device == "cuda":
            tgl = liger[0]
            N = c.B * c.G

            def liger_fn(level):  # Liger takes the (N, T+1, V) buffer whole and drops the last position
                def fn(x):
                    loss, _ = tgl(
                        x,
                        c.old.reshape(N, -1),
                        c.ref.reshape(N, -1),
                        c.tokens.reshape(N, -1),
                        c.adv.reshape(N),
                        c.mask.reshape(N, -1).int(),
                        temperature=1.0,
                        beta=0.04,
                        eps_low=0.2,
                        eps_high=0.2,
                        inplace=True,
                        loss_type="grpo",
                        importance_sampling_level=level,
                        reduce=True,
                    )
                    return loss

                return fn

            out["liger_seq" if level == "sequence" else "liger_token"] = ("buf", liger_fn(level))
    else:  # linear
        out["gspo_kernels"] = lambda x: gspo_kernels.linear_sequence_logprobs(x, c.weight, c.tokens, c.mask).sum()
        out["materialized"] = lambda x: gspo_kernels.sequence_logprobs(x @ c.weight.T, c.tokens, c.mask).sum()
        out["chunked"] = _chunked_path(out["gspo_kernels"])
        out["gemm"] = lambda x: _Gemm.apply(x.reshape(-1, x.shape[-1]), c.weight)
        try:
            from benchmarks.trl_path import chunked_logprobs
        except Exception as e:  # noqa: BLE001
            print(f"trl_chunked skipped: trl not importable ({type(e).__name__}: {e})")
        else:
            out["trl_chunked"] = lambda x: chunked_logprobs(x, c.weight, c.tokens, c.mask).sum()
        naive = lambda x: naive_sequence_logprobs(x @ c.weight.T, c.tokens, c.mask).sum()  # noqa: E731
        if liger is not None and case.device == "cuda":
            mod = liger[1](beta=0.0, use_ref_model=False, loss_type="grpo", importance_sampling_level="sequence")
            N = c.B * c.G
            out["liger"] = lambda x: mod(
                x.reshape(N, c.T, -1),
                c.weight,
                c.tokens.reshape(N, -1),
                c.mask.reshape(N, -1).int(),
                c.adv.reshape(N),
                old_per_token_logps=c.old.reshape(N, -1),
            )[0]
    out["naive"] = naive
    if compile_ok and op != "linear":
        out["compile"] = torch.compile(naive)
    return {k: v for k, v in out.items() if only is None or k in only}


def _time(fn, device, reps):
    """Median ms of ``fn()``, and how it was timed."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), "do_bench"
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), "perf_counter"


def _l2_cache():
    try:
        import triton

        return triton.runtime.driver.active.get_empty_cache_for_benchmark()
    except Exception:  # noqa: BLE001 - older Triton: the buffer do_bench used (256 MB)
        return torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")


def _time_fresh(prepare, fn, device, reps, warmup_ms=25, rep_ms=100):
    """Median ms of ``fn(x)`` with ``x = prepare()`` made outside the timed region, and how it was
    timed. CUDA: the run counts and the L2 flush of ``do_bench``, one pair of events per run around
    ``fn`` alone; CPU: ``perf_counter`` around ``fn`` alone."""
    if device != "cuda":
        fn(prepare())
        ts = []
        for _ in range(reps):
            x = prepare()
            t0 = time.perf_counter()
            fn(x)
            ts.append((time.perf_counter() - t0) * 1e3)
            x = None
        return statistics.median(ts), "perf_counter_clone_outside"
    cache = _l2_cache()

    def runs(n):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends):
            x = prepare()  # enqueued before the start event: not timed
            cache.zero_()
            s.record()
            fn(x)
            e.record()
            x = None
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    runs(1)
    est = statistics.mean(runs(5))
    runs(max(1, int(warmup_ms / est)))
    return statistics.median(runs(max(1, int(rep_ms / est)))), "events_clone_outside"


def _peak(fn, device):
    if device != "cuda":
        return ""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f}"


def run_op(op, case, liger, modes, device, compile_ok, reps, only=None):
    """Yield (provider, mode, ms, peak_extra_mb, timing) for one op on one case."""
    src = case.hidden if op == "linear" else case.logits
    for name, fn in providers(op, case, liger, compile_ok, only).items():
        on_buf = isinstance(fn, tuple)
        if on_buf:
            fn = fn[1]
        inplace = name in INPLACE  # these overwrite their input in backward

        def fresh():
            base = case.buf if on_buf else src
            return (base.clone() if inplace else base).detach().requires_grad_(True)

        for mode in modes:
            if inplace and mode == "bwd":
                continue  # a second backward through an overwritten input is refused by design
            try:
                if mode == "full" and inplace:  # a fresh input per run, made before the timed region
                    full = lambda xi: torch.autograd.grad(fn(xi), case.wrt(xi))  # noqa: E731
                    ms, how = _time_fresh(fresh, full, device, reps)
                    x = fresh()
                    peak = _peak(lambda: full(x), device)
                else:
                    x = fresh()
                    if mode == "fwd":
                        step = lambda: fn(x)  # noqa: E731
                    elif mode == "bwd":
                        loss = fn(x)
                        step = lambda: torch.autograd.grad(loss, case.wrt(x), retain_graph=True)  # noqa: E731
                    else:
                        step = lambda: torch.autograd.grad(fn(x), case.wrt(x))  # noqa: E731
                    ms, how = _time(step, device, reps)
                    peak = _peak(step, device)
                yield name, mode, ms, peak, how
            except Exception as e:  # noqa: BLE001 - report and go on with the other providers
                if STRICT:
                    raise
                print(f"  {op}/{name}/{mode}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


OPS = ("sequence_logprobs", "token_entropy", "gspo_loss", "grpo_loss", "linear")
SWEEPS = ("main", "v32k", "v", "nt")
PROVIDER_NAMES = (
    "gspo_kernels",
    "gspo_kernels_inplace",
    "gspo_kernels_entropy",
    "naive",
    "compile",
    "liger_seq",
    "liger_token",
    "liger",
    "materialized",
    "chunked",
    "gemm",
    "trl_chunked",
)


def names(choices, kind=str):
    """An argparse type: a comma-separated list of ``choices`` (a typo fails at parse time, not as
    a silently missing row); ``choices=None``: any values of ``kind``."""

    def parse(text):
        try:
            got = [kind(x) for x in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
        bad = [x for x in got if choices is not None and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return text

    return parse


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_gpu_session.py parses gpu_session.sh's steps with it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="one CPU-sized shape (smoke run)")
    p.add_argument("--ops", default=",".join(OPS), type=names(OPS))
    p.add_argument(
        "--hidden", default=str(HIDDEN), type=names(None, int), help="comma-separated H of the linear op (tiny: 64)"
    )
    p.add_argument("--sweeps", default="main,v,nt", type=names(SWEEPS))
    p.add_argument("--modes", default="fwd,bwd,full", type=names(("fwd", "bwd", "full")))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument(
        "--providers", default=None, type=names(PROVIDER_NAMES), help="comma-separated subset (default: all)"
    )
    p.add_argument("--reps", type=int, default=3, help="CPU timing repetitions")
    p.add_argument(
        "--out",
        default=None,
        help="default: benchmarks/results/gpu.csv on CUDA, benchmarks/results/cpu_smoke.csv on CPU",
    )
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    dev = args.device
    args.out = args.out or f"benchmarks/results/{'gpu' if dev == 'cuda' else 'cpu_smoke'}.csv"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("CPU run: the fused ops use their chunked PyTorch path")
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    import triton

    meta = dict(device=device_name, torch=torch.__version__, triton=triton.__version__)
    liger = _liger()
    if liger is not None and dev != "cuda":
        print("liger providers skipped: Liger-Kernel's Triton kernels run on CUDA only")
    dtype = getattr(torch, args.dtype)
    modes = args.modes.split(",")
    rows = []
    widths = [64] if args.tiny else [int(h) for h in args.hidden.split(",")]
    for B, G, T, V in shapes(args.sweeps.split(","), args.tiny):
        for op, H in [(o, H) for o in args.ops.split(",") for H in (widths if o == "linear" else [None])]:
            if op == "linear" and (B, G, T, V) != (2, 8, 1024, 151_936) and not args.tiny:
                continue  # the linear op is measured at the main workload only
            case = Case(B, G, T, V, dtype, dev, H=H)
            # The ceiling: a contiguous device-to-device copy of as many bytes as the logits
            # (a clone of the strided [:, :-1] slice would run a slower strided copy).
            copy_src = case.hidden if op == "linear" else case.buf.view(-1)[: case.logits.numel()]
            copy_ms, how = _time(lambda: copy_src.clone(), dev, args.reps)
            copy_gbps = 2 * copy_src.numel() * copy_src.element_size() / copy_ms / 1e6
            rows.append(
                dict(
                    meta,
                    provider="copy",
                    op=op,
                    mode="copy",
                    B=B,
                    G=G,
                    T=T,
                    V=V,
                    dtype=args.dtype,
                    H=H or "",
                    ms=f"{copy_ms:.4f}",
                    gbps=f"{copy_gbps:.4g}",
                    peak_extra_mb="",
                    timing=how,
                )
            )
            for name, mode, ms, peak, how in run_op(
                op,
                case,
                liger,
                modes,
                dev,
                not args.no_compile,
                args.reps,
                None if args.providers is None else args.providers.split(","),
            ):
                passes = {"fwd": 1, "bwd": 2, "full": 3}[mode]
                rows.append(
                    dict(
                        meta,
                        provider=name,
                        op=op,
                        mode=mode,
                        B=B,
                        G=G,
                        T=T,
                        V=V,
                        dtype=args.dtype,
                        H=H or "",
                        ms=f"{ms:.4f}",
                        gbps=f"{passes * case.bytes / ms / 1e6:.4g}",
                        peak_extra_mb=peak,
                        timing=how,
                    )
                )
                shape = f"B={B} G={G} T={T} V={V}" + (f" H={H}" if H else "")
                print(
                    f"{op:<18}{name:<22}{mode:<5} {shape}: {ms:9.3f} ms {rows[-1]['gbps']:>9} GB/s"
                    f" peak+ {peak or '-'} MiB  [{how}]"
                )
            del case
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
