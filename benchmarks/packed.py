"""Packed (padding-free) batches against padding them back, on this machine's device.

    python -m benchmarks.packed [--device cpu|cuda] [--repeats 7] [--out benchmarks/results/packed_cpu.csv]

One ``gspo_loss`` forward + backward on a packed batch: ``packed`` passes the
``(total, V)`` logits with ``cu_seqlens``; ``padded`` first copies them into
``(N, T_max, V)`` rows (what a user without ``cu_seqlens`` support must do: the
copy is part of that provider's work and inside its timed region) and calls the
padded loss. Inputs (logits, ids, mask, old log-probs, rewards) are built before
the clock starts; each run is timed alone (``perf_counter``, CUDA synchronised).
Default shapes: CPU, 8 sequences of random lengths totalling 1,174 tokens,
V = 32,000, fp32; CUDA, 16 sequences totalling 16,384 tokens (the main
workload's token count), V = 151,936, bf16.

Peak memory: CUDA ``max_memory_allocated`` beyond the inputs; CPU, each provider
in a fresh subprocess with its peak-RSS mark (VmHWM) reset after a warm-up step
(as ``benchmarks.compare``). Both providers' losses and gradients are compared.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time

import torch

import gspo_kernels


def make_batch(n, total, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(total - 1, generator=g)[: n - 1] + 1).values
    cu = torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]).to(torch.int32)
    x = (torch.randn(total, V, generator=g) * 2).to(dtype).to(device)
    y = torch.randint(0, V, (total,), generator=g).to(device)
    m = (torch.rand(total, generator=g) > 0.1).to(device)
    old = (-torch.rand(total, generator=g) * 4).to(device)
    rewards = torch.randn(n, generator=g).to(device)
    return cu.to(device), x, y, m, old, rewards


def padded_index(cu):
    """(N, T_max) row of each packed token: the padding a loss without cu_seqlens needs."""
    lengths = (cu[1:] - cu[:-1]).long()
    n, t_max = lengths.numel(), int(lengths.max())
    seq = torch.repeat_interleave(torch.arange(n, device=cu.device), lengths)
    pos = torch.arange(int(cu[-1]), device=cu.device) - cu[:-1].long()[seq]
    return n, t_max, seq, pos


def step(provider, batch, index):
    cu, x, y, m, old, rewards = batch
    x = x.detach().requires_grad_(True)
    kw = dict(old_logprobs=old, group_size=4, beta=0.0)
    if provider == "packed":
        loss, _ = gspo_kernels.gspo_loss(x, y, rewards, m, cu_seqlens=cu, **kw)
        return loss, torch.autograd.grad(loss, x)[0]
    n, t_max, seq, pos = index

    def pad(t, fill=0):
        out = torch.full((n, t_max) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device)
        return out.index_put((seq, pos), t)

    xp = pad(x)  # the copy of the logits
    loss, _ = gspo_kernels.gspo_loss(xp, pad(y), rewards, pad(m, False), group_size=4, old_logprobs=pad(old), beta=0.0)
    return loss, torch.autograd.grad(loss, x)[0]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _vmhwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def measure(provider, n, total, V, dtype, device, repeats):
    batch = make_batch(n, total, V, getattr(torch, dtype), device)
    index = padded_index(batch[0])
    loss, grad = step(provider, batch, index)  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step(provider, batch, index)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(provider, batch, index)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _vmhwm()
        step(provider, batch, index)
        peak = _vmhwm() - base
    return dict(
        provider=provider,
        ms_median=statistics.median(times),
        ms_min=min(times),
        ms_max=max(times),
        peak_extra_mb=peak / 2**20,
        loss=float(loss),
        grad_sum=float(grad.double().abs().sum()),
        timing="perf_counter_synchronised",
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one provider, JSON out
    a = p.parse_args(argv)
    cpu = a.device == "cpu"
    n, total, V, dtype = (8, 1174, 32_000, "float32") if cpu else (16, 16_384, 151_936, "bfloat16")
    if a.one:
        print(json.dumps(measure(a.one, n, total, V, dtype, a.device, a.repeats)))
        return
    rows = []
    for provider in ("packed", "padded"):
        if cpu:  # a fresh process each: the peak-RSS mark belongs to one provider
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.packed",
                    "--device",
                    "cpu",
                    "--repeats",
                    str(a.repeats),
                    "--one",
                    provider,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        else:
            rows.append(measure(provider, n, total, V, dtype, a.device, a.repeats))
    print(
        f"device {a.device} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"{n} sequences, {total} tokens, V = {V}, {dtype}"
    )
    for r in rows:
        print(
            f"{r['provider']:<8} {r['ms_median']:9.1f} ms [{r['ms_min']:.1f}-{r['ms_max']:.1f}]  "
            f"peak extra {r['peak_extra_mb']:8.1f} MiB  loss {r['loss']:.7f}"
        )
    pk, pd = rows
    speed = pd["ms_median"] / pk["ms_median"]
    print(
        f"packed vs padded: {speed:.2f}x {'faster' if speed >= 1 else 'slower'} (medians), "
        f"{pk['peak_extra_mb'] / max(pd['peak_extra_mb'], 1e-9):.2f}x the peak extra memory; "
        f"same loss to {abs(pk['loss'] - pd['loss']):.1e}, gradient |sum| {pk['grad_sum']:.6g} vs {pd['grad_sum']:.6g}"
    )
    if a.out:
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["device", "dtype", "n", "total", "V", *rows[0]])
            w.writeheader()
            for r in rows:
                w.writerow(dict(device=a.device, dtype=dtype, n=n, total=total, V=V, **r))


if __name__ == "__main__":
    main()
