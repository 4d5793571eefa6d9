"""The main job: the fused op against the naive one, on this machine's device.

    python -m benchmarks.compare [--B 2 --G 4 --T 256 --V 32000 --dtype float32] [--json out.json]

Runs ``gspo_kernels.sequence_logprobs`` (forward + backward) and the naive
``log_softmax -> gather -> masked mean`` of ``reference/`` on the same inputs and
prints, per provider (``gspo_kernels``, the same with ``inplace_backward=True``,
``naive``): the time of the process's first fwd+bwd (imports, compilation) and
the median, min and max of the following ones (each run timed alone: inputs
are made before the clock starts), peak extra memory (bytes beyond the inputs,
the logits' gradient included), and the max error of values and gradients
against a float64 reference. It also prints the torch thread count and the
machine's load, and says "faster" or "slower" as measured, with whether the
two providers' run ranges overlap (then the order is not settled on this
machine).

Defaults: CUDA, the main workload B=2, G=8, T=1024, V=151,936 in bf16 (the
float64 reference is then taken on the first two sequences only, it would not
fit for all); CPU, N*T = 2048 rows, V = 32,000, fp32 (the CPU runs the chunked
PyTorch path; TRITON_INTERPRET must not be set).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after a reset, minus
what the inputs hold. On CPU each provider runs in a fresh subprocess: the
kernel's peak-RSS mark (VmHWM) is reset through /proc/self/clear_refs after the
inputs are built and one warm-up step is done, so the figure is the peak
resident memory one fwd+bwd adds over the resident inputs.
"""
from __future__ import annotations

import argparse
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


def make_inputs(B, G, T, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(B, G, T, V, generator=g, device=device, dtype=torch.float32).mul_(2).to(dtype)
    tokens = torch.randint(0, V, (B, G, T), generator=g, device=device)
    lengths = torch.randint(T // 2, T + 1, (B, G), generator=g, device=device)
    mask = torch.arange(T, device=device) < lengths.unsqueeze(-1)
    return logits, tokens, mask


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _step(fn, logits, tokens, mask, grad_out):
    x = logits.detach().requires_grad_(True)
    out = fn(x, tokens, mask)
    (gx,) = torch.autograd.grad(out, x, grad_out)
    return out, gx


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def measure(provider, B, G, T, V, dtype, device, repeats):
    """Time (ms, median) and peak extra bytes of one fwd+bwd of ``provider``."""
    fn = PROVIDERS[provider]
    logits, tokens, mask = make_inputs(B, G, T, V, dtype, device)
    grad_out = torch.ones(B, G, device=device)
    _sync(device)
    t0 = time.perf_counter()
    _step(fn, logits, tokens, mask, grad_out)  # the process's first call: imports, compilation, allocator
    _sync(device)
    first = (time.perf_counter() - t0) * 1e3
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss("VmRSS")
    _step(fn, logits, tokens, mask, grad_out)
    _sync(device)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _rss("VmHWM")) - base
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        _step(fn, logits, tokens, mask, grad_out)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "first_ms": first,
            "peak_extra_mb": peak / 2**20, "threads": torch.get_num_threads()}


def errors(provider, B, G, T, V, dtype, device):
    """Max abs error of values and gradients vs float64, on at most two sequences."""
    logits, tokens, mask = make_inputs(B, G, T, V, dtype, device)
    n = min(G, 2)
    logits, tokens, mask = logits[:1, :n], tokens[:1, :n], mask[:1, :n]
    grad_out = torch.ones(1, n, device=device)
    xr = logits.detach().double().requires_grad_(True)  # before the provider: in-place backward overwrites logits
    ref = naive_sequence_logprobs(xr, tokens, mask, dtype=torch.float64)
    (gr,) = torch.autograd.grad(ref, xr, grad_out.double())
    out, gx = _step(PROVIDERS[provider], logits, tokens, mask, grad_out)
    return {"value_err": (out.double() - ref).abs().max().item(), "grad_err": (gx.double() - gr).abs().max().item()}


def verdict(r, base):
    """One plain line: faster or slower (median against median), by how much, and whether the
    two providers' [min, max] run ranges overlap (then the order is not settled by these runs)."""
    ratio = base["ms"] / r["ms"]
    speed = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
    overlap = r["ms_min"] <= base["ms_max"] and base["ms_min"] <= r["ms_max"]
    note = ("the run ranges overlap: not a settled difference on this machine" if overlap
            else "the run ranges do not overlap")
    mem = (f", {r['peak_extra_mb'] / base['peak_extra_mb']:.2f}x the peak extra memory"
           if base["peak_extra_mb"] > 0 else "")
    return (f"{r['provider']} vs {base['provider']}: {speed} (median {r['ms']:.2f} vs {base['ms']:.2f} ms; "
            f"{note}){mem}")


def _worker(args):
    res = measure(args.worker, args.B, args.G, args.T, args.V, getattr(torch, args.dtype), args.device, args.repeats)
    res.update(errors(args.worker, args.B, args.G, args.T, args.V, getattr(torch, args.dtype), args.device))
    print(json.dumps(res))


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--G", type=int, default=8 if cuda else 4)
    p.add_argument("--T", type=int, default=1024 if cuda else 256)
    p.add_argument("--V", type=int, default=151_936 if cuda else 32_000)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--repeats", type=int, default=20 if cuda else 9)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter is for tests, not for timing")
    rows = []
    for prov in PROVIDERS:
        cmd = [sys.executable, "-m", "benchmarks.compare", "--worker", prov] + [
            f"--{k}={getattr(args, k)}" for k in ("device", "B", "G", "T", "V", "dtype", "repeats")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append({"provider": prov, **json.loads(out)})
    dev = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    meta = {"device": dev, "torch": torch.__version__, "shape": [args.B, args.G, args.T, args.V],
            "dtype": args.dtype, "logits_mb": args.B * args.G * args.T * args.V * getattr(torch, args.dtype).itemsize / 2**20,
            "threads": sorted({r["threads"] for r in rows}), "cpus": os.cpu_count(),
            "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    print(f"device {meta['device']} | torch {meta['torch']} | (B, G, T, V) = {tuple(meta['shape'])} {args.dtype}"
          f" | logits {meta['logits_mb']:.0f} MiB | fwd+bwd of sequence_logprobs")
    print(f"torch threads {', '.join(map(str, meta['threads']))} of {meta['cpus']} CPUs"
          + (f" | load average (1/5/15 min) {meta['load_avg'][0]} / {meta['load_avg'][1]} / {meta['load_avg'][2]}"
             if meta["load_avg"] else ""))
    print(f"{'provider':<22}{'first call ms':>14}{'steady ms (median [min-max])':>30}{'spread':>8}"
          f"{'peak extra MiB':>16}{'value err':>12}{'grad err':>12}")
    for r in rows:
        spread = f"{r['ms']:.2f} [{r['ms_min']:.2f}-{r['ms_max']:.2f}]"
        rel = f"{(r['ms_max'] - r['ms_min']) / r['ms']:.0%}"
        print(f"{r['provider']:<22}{r['first_ms']:>14.2f}{spread:>30}{rel:>8}{r['peak_extra_mb']:>16.1f}"
              f"{r['value_err']:>12.2e}{r['grad_err']:>12.2e}")
    print(f"({args.repeats} steady-state runs each after the first call, every provider in a fresh process;"
          " spread = (max - min) / median)")
    naive = rows[-1]
    for r in rows[:-1]:
        print(verdict(r, naive))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
