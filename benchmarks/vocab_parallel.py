"""Vocab-parallel cost on one GPU: each shard's kernels timed alone against the unsharded op.

    python -m benchmarks.vocab_parallel [--P 2] [--out benchmarks/results/vocab_parallel.csv]

P shards of the main workload (B=2, G=8, T=1024, V=151,936, bf16, a [:, :-1]
slice) are contiguous column slices of one logits buffer, as rank r of a
tensor-parallel group would hold them. For each shard: the forward kernel
(its statistics: max, rescaled sum, target logit, entropy partial) and the
backward kernel (from the global logsumexp, no collective), with
``triton.testing.do_bench`` medians; the unsharded op beside them. The
collectives move O(N*T) floats per step, written out (not timed here: one
GPU has no peer to talk to):

    forward: all_reduce MAX of N*T fp32 + all_reduce SUM of 2*N*T fp32 (3*N*T with entropy)
    backward: none
"""

from __future__ import annotations

import argparse
import csv
import os

import torch

from gspo_kernels import _kernels


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--P", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/vocab_parallel.csv")
    args = p.parse_args(argv)
    import triton.testing

    bench = lambda f: triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median")  # noqa: E731
    N, T, V = 16, 1024, 151_936
    buf = torch.randn(N, T + 1, V, device="cuda", dtype=torch.bfloat16)
    x = buf[:, :-1]
    y = torch.randint(0, V, (N, T), device="cuda")
    g = torch.randn(N, T, device="cuda")
    rows = []
    w = V // args.P
    shards = [("full", x, y)] + [
        (f"shard {r}/{args.P}", x[..., r * w : (r + 1) * w], (y - r * w)) for r in range(args.P)
    ]
    for name, xs, ys in shards:
        _, c, ent = _kernels.triton_fwd(xs, ys, 1.0, True)
        out = torch.empty(xs.shape, device="cuda", dtype=xs.dtype)
        for kind, fn in (
            ("fwd", lambda: _kernels.triton_fwd(xs, ys, 1.0, False)),
            ("fwd_entropy", lambda: _kernels.triton_fwd(xs, ys, 1.0, True)),
            ("bwd", lambda: _kernels.triton_bwd(xs, ys, c, g, None, None, 1.0, out)),
        ):
            ms = bench(fn)
            passes = 2 if kind == "bwd" else 1
            gbps = passes * xs.numel() * 2 / ms / 1e6
            rows.append(
                dict(
                    device=torch.cuda.get_device_name(),
                    part=name,
                    kernel=kind,
                    V=xs.shape[-1],
                    ms=f"{ms:.4f}",
                    gbps=f"{gbps:.0f}",
                    timing="do_bench",
                )
            )
            print(f"{name:<12} {kind:<12} V={xs.shape[-1]:<7} {ms:8.3f} ms {gbps:7.0f} GB/s")
    nt = N * T
    print(
        f"collectives per step: forward {nt * 4} B (MAX) + {2 * nt * 4} B (SUM; {3 * nt * 4} B with entropy); "
        "backward 0 B"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


if __name__ == "__main__":
    main()
