"""The main job: the fused op against the naive one, on this machine's device.

    python -m benchmarks.compare [--B 2 --G 4 --T 256 --V 32000 --dtype float32] [--json out.json]

Runs ``gspo_kernels.sequence_logprobs`` (forward + backward), the same with
``inplace_backward=True``, and the naive ``log_softmax -> gather -> masked
mean`` of ``reference/`` on the same inputs, and prints per provider the time
of its first fwd+bwd in the process (imports, compilation), its steady time,
its peak extra memory and its max error against a float64 reference; then, per
fused provider, the paired time ratio against ``naive``.

Timing: one process, the providers interleaved (round i runs all of them, the
order rotated by one each round, so each comes first equally often), after one
untimed warm-up round. A round's runs are back to back, so load that comes and
goes hits each provider alike, and the ratio of a round's two times (fused /
naive) cancels most of it: the verdict is the median of those per-round
ratios, with their interquartile range (IQR). Inside the timed region there is
only the provider's fwd+bwd (the autograd call included): the inputs, the
in-place provider's fresh copy of the logits and garbage collection come
before the clock starts; on CUDA the region is timed by CUDA events.

Peak memory (bytes beyond the inputs, the gradient included), measured apart
from the timing: on CUDA ``torch.cuda.max_memory_allocated`` after a reset, in
this process. On CPU torch keeps no allocator statistics (and tracemalloc does
not see torch's allocations), so each provider runs once more in a fresh
subprocess whose C allocator returns every block of 64 KiB or more to the
system when it is freed (``MALLOC_MMAP_THRESHOLD_``); after a warm-up step the
peak-resident mark (VmHWM) is reset through /proc/self/clear_refs and the
figure is the peak resident memory one fwd+bwd adds, helper threads included.

Defaults: CUDA, the main workload B=2, G=8, T=1024, V=151,936 in bf16 (the
float64 reference is then taken on the first two sequences only, it would not
fit for all); CPU, N*T = 2048 rows, V = 32,000, fp32 (the CPU runs the chunked
PyTorch path; TRITON_INTERPRET must not be set).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import gspo_kernels
from reference import naive_sequence_logprobs

PROVIDERS = {
    "gspo_kernels": lambda x, y, m: gspo_kernels.sequence_logprobs(x, y, m),
    "gspo_kernels_inplace": lambda x, y, m: gspo_kernels.sequence_logprobs(x, y, m, inplace_backward=True),
    "naive": lambda x, y, m: naive_sequence_logprobs(x, y, m),
}
BASE = "naive"


def make_inputs(B, G, T, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(B, G, T, V, generator=g, device=device, dtype=torch.float32).mul_(2).to(dtype)
    tokens = torch.randint(0, V, (B, G, T), generator=g, device=device)
    lengths = torch.randint(T // 2, T + 1, (B, G), generator=g, device=device)
    mask = torch.arange(T, device=device) < lengths.unsqueeze(-1)
    return logits, tokens, mask


def _step(fn, x, tokens, mask, grad_out):
    """One fwd+bwd of ``fn`` on the leaf ``x``: (value, gradient)."""
    out = fn(x, tokens, mask)
    (gx,) = torch.autograd.grad(out, x, grad_out)
    return out, gx


class Inputs:
    """The shared inputs; ``leaf(provider)`` gives the tensor a run differentiates: a view of the
    logits, or for the in-place provider (whose backward overwrites its logits) a fresh copy of
    them in a buffer of its own. Called before the clock starts."""

    def __init__(self, B, G, T, V, dtype, device):
        self.logits, self.tokens, self.mask = make_inputs(B, G, T, V, dtype, device)
        self.grad_out = torch.ones(B, G, device=device)
        self.scratch = None

    def leaf(self, provider):
        if provider.endswith("_inplace"):
            if self.scratch is None:
                self.scratch = torch.empty_like(self.logits)
            return self.scratch.copy_(self.logits).detach().requires_grad_(True)
        return self.logits.detach().requires_grad_(True)


def _timed(fn, x, inp, device) -> float:
    """ms of one fwd+bwd; nothing else inside the timed region."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        _step(fn, x, inp.tokens, inp.mask, inp.grad_out)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    _step(fn, x, inp.tokens, inp.mask, inp.grad_out)
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(providers, inp, device, repeats):
    """{provider: {"first_ms", "times" (one per round, in round order)}}; one warm-up round untimed."""
    res = {p: {"times": []} for p in providers}
    for p in providers:  # first call in the process: imports, compilation, allocator
        res[p]["first_ms"] = _timed(PROVIDERS[p], inp.leaf(p), inp, device)
    for p in providers:  # warm-up round
        _timed(PROVIDERS[p], inp.leaf(p), inp, device)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeats):
            k = i % len(providers)
            for p in providers[k:] + providers[:k]:
                x = inp.leaf(p)
                gc.collect()
                res[p]["times"].append(_timed(PROVIDERS[p], x, inp, device))
                del x
    finally:
        if gc_was:
            gc.enable()
    return res


def _quartiles(v):
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return q[0], q[1], q[2]


def paired(times, base):
    """Per-round ratios provider / base: median and interquartile range."""
    r = [a / b for a, b in zip(times, base)]
    q1, med, q3 = _quartiles(r)
    return {"ratio_median": med, "ratio_q1": q1, "ratio_q3": q3, "ratio_min": min(r), "ratio_max": max(r), "ratios": r}


def verdict(name, pr, mem_ratio):
    """One plain line: the median paired ratio as faster/slower, its IQR, and whether the IQR
    settles the order (both quartiles on one side of 1)."""
    m, q1, q3 = pr["ratio_median"], pr["ratio_q1"], pr["ratio_q3"]
    speed = f"{1 / m:.2f}x faster" if m <= 1 else f"{m:.2f}x slower"
    settled = (
        "the IQR lies on one side of 1"
        if q3 < 1 or q1 > 1
        else "the IQR straddles 1: no settled difference on this machine"
    )
    mem = f", {mem_ratio:.2f}x the peak extra memory" if mem_ratio is not None else ""
    return f"{name} vs {BASE}: {speed} (paired time ratio {m:.3f}, IQR {q1:.3f}-{q3:.3f}; {settled}){mem}"


# ---------------------------------------------------------------- peak memory
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def peak_extra_mb(provider, inp, device) -> float:
    """Peak memory one fwd+bwd adds beyond the inputs (after a warm-up step), in MiB."""
    fn = PROVIDERS[provider]
    x = inp.leaf(provider)
    _step(fn, x, inp.tokens, inp.mask, inp.grad_out)
    x = inp.leaf(provider)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _status("VmRSS")
    _step(fn, x, inp.tokens, inp.mask, inp.grad_out)
    if device == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (_status("VmHWM") - base) / 2**20


def _memory_worker(args):
    inp = Inputs(args.B, args.G, args.T, args.V, getattr(torch, args.dtype), args.device)
    inp.leaf(args.memory_worker)  # the in-place provider's own copy is an input, made before the mark
    print(json.dumps({"peak_extra_mb": peak_extra_mb(args.memory_worker, inp, args.device)}))


def cpu_peak_extra_mb(provider, args) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, "-m", "benchmarks.compare", "--memory-worker", provider] + [
        f"--{k}={getattr(args, k)}" for k in ("device", "B", "G", "T", "V", "dtype")
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_mb"]


def errors(provider, B, G, T, V, dtype, device):
    """Max abs error of values and gradients vs float64, on at most two sequences."""
    logits, tokens, mask = make_inputs(B, G, T, V, dtype, device)
    n = min(G, 2)
    logits, tokens, mask = logits[:1, :n], tokens[:1, :n], mask[:1, :n]
    grad_out = torch.ones(1, n, device=device)
    xr = logits.detach().double().requires_grad_(True)  # before the provider: in-place backward overwrites logits
    ref = naive_sequence_logprobs(xr, tokens, mask, dtype=torch.float64)
    (gr,) = torch.autograd.grad(ref, xr, grad_out.double())
    out, gx = _step(PROVIDERS[provider], logits.clone().requires_grad_(True), tokens, mask, grad_out)
    return {"value_err": (out.double() - ref).abs().max().item(), "grad_err": (gx.double() - gr).abs().max().item()}


def _load():
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--G", type=int, default=8 if cuda else 4)
    p.add_argument("--T", type=int, default=1024 if cuda else 256)
    p.add_argument("--V", type=int, default=151_936 if cuda else 32_000)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--repeats", type=int, default=20 if cuda else 15, help="timed rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker:
        return _memory_worker(args)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter is for tests, not for timing")
    dtype = getattr(torch, args.dtype)
    names = list(PROVIDERS)
    cores, load0 = _cores(), _load()
    inp = Inputs(args.B, args.G, args.T, args.V, dtype, args.device)
    timing = time_interleaved(names, inp, args.device, args.repeats)
    load1 = _load()
    mem = {}
    if not args.no_memory:
        for n in names:
            if args.device == "cuda":
                mem[n] = peak_extra_mb(n, inp, args.device)
            else:
                mem[n] = cpu_peak_extra_mb(n, args)
    del inp
    rows = []
    for n in names:
        t = timing[n]["times"]
        q1, med, q3 = _quartiles(t)
        rows.append(
            {
                "provider": n,
                "first_ms": timing[n]["first_ms"],
                "ms": med,
                "ms_q1": q1,
                "ms_q3": q3,
                "ms_min": min(t),
                "ms_max": max(t),
                "times_ms": t,
                "peak_extra_mb": mem.get(n),
                **errors(n, args.B, args.G, args.T, args.V, dtype, args.device),
            }
        )
    base = next(r for r in rows if r["provider"] == BASE)
    for r in rows:
        if r is not base:
            r.update(paired(r["times_ms"], base["times_ms"]))
    dev = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    meta = {
        "device": dev,
        "torch": torch.__version__,
        "shape": [args.B, args.G, args.T, args.V],
        "dtype": args.dtype,
        "logits_mb": args.B * args.G * args.T * args.V * dtype.itemsize / 2**20,
        "threads": torch.get_num_threads(),
        "cores": cores,
        "load_avg_start": load0,
        "load_avg_end": load1,
        "rounds": args.repeats,
    }
    print(
        f"device {dev} | torch {meta['torch']} | (B, G, T, V) = {tuple(meta['shape'])} {args.dtype}"
        f" | logits {meta['logits_mb']:.0f} MiB | fwd+bwd of sequence_logprobs"
    )
    loads = " -> ".join(" / ".join(map(str, la)) for la in (load0, load1) if la)
    print(f"torch threads {meta['threads']} | {cores} cores | load average (1/5/15 min) at start -> end: {loads}")
    worst = max((la[0] for la in (load0, load1) if la), default=0)
    if worst > cores:
        print(
            f"WARNING: the load average ({worst}) exceeds the {cores} cores: other processes took CPU time "
            "during the runs; the absolute times are inflated and uneven, read the paired ratios"
        )
    print(
        f"{'provider':<22}{'first call ms':>14}{'steady ms median [IQR]':>28}{'peak extra MiB':>16}"
        f"{'value err':>11}{'grad err':>11}"
    )
    for r in rows:
        spread = f"{r['ms']:.1f} [{r['ms_q1']:.1f}-{r['ms_q3']:.1f}]"
        pk = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.1f}"
        print(
            f"{r['provider']:<22}{r['first_ms']:>14.1f}{spread:>28}{pk:>16}{r['value_err']:>11.2e}"
            f"{r['grad_err']:>11.2e}"
        )
    print(
        f"({args.repeats} timed rounds after a warm-up round, the providers interleaved in one process, "
        "the order rotated each round)"
    )
    for r in rows:
        if r is not base:
            mr = (
                r["peak_extra_mb"] / base["peak_extra_mb"]
                if r["peak_extra_mb"] is not None and base["peak_extra_mb"]
                else None
            )
            print(verdict(r["provider"], r, mr))
    if args.device == "cpu":
        print(
            "What the CPU figure means: it times the chunked PyTorch path that CPU tensors run (the Triton "
            "kernels need a GPU); it shows the op usable and memory-bounded on a CPU, not the GPU kernels' "
            "speed: on one H100 at the GPU default shape those ran 11x faster than naive (benchmarks/NOTES.md)."
        )
    else:
        print(
            "What the GPU figure means: the Triton kernels themselves; a CPU run of this command times "
            "the chunked PyTorch fallback instead, a different code path."
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
