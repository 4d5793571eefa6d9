"""Block-size / warp sweep of the log-prob kernels on a CUDA GPU.

    python -m benchmarks.tune --out benchmarks/results/tune.csv

Times the forward and backward kernels alone (launchers called directly, no
autograd), with and without the entropy output, for each (BLOCK_V, num_warps)
candidate, at the main workload and over the V sweep, beside a copy of the
logits (the bandwidth ceiling, same run). ``frac`` is the kernel's rate under
the byte model (fwd: one read; bwd: one read + one write) over the copy rate.
"""

from __future__ import annotations

import argparse
import csv
import os

import torch

from gspo_kernels import _kernels

CANDIDATES = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16)]


TIMING = "do_bench" if torch.cuda.is_available() else "perf_counter_once"  # the rows' ``timing`` column


def bench(fn):
    if not torch.cuda.is_available():  # CPU smoke run (interpreter): one timed call
        import time

        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/tune.csv")
    p.add_argument("--vs", default="151936,32000,128256,262144")
    p.add_argument("--rows", type=int, default=16_384)
    p.add_argument("--candidates", default=None, help="e.g. 4096x4,4096x8 (default: CANDIDATES)")
    p.add_argument("--kernels", default="fwd,fwd_ent,bwd,bwd_ent")
    p.add_argument("--mid-rows", default="2", help="rows per program for V <= MID_V, e.g. 1,2,4")
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out_rows = []
    saved, saved_mid = dict(_kernels.LARGE_V), _kernels.MID_ROWS
    best = {}
    for V in map(int, args.vs.split(",")):
        N = args.rows
        T = min(N, 1024)
        buf = torch.randn(N // T, T + 1, V, device=dev, dtype=torch.bfloat16)
        x = buf[:, :-1]
        y = torch.randint(0, V, x.shape[:-1], device=dev)
        nbytes = x.numel() * 2
        flat = buf.view(-1)[: x.numel()]  # contiguous: the copy ceiling (a strided clone runs slower)
        copy_ms = bench(lambda: flat.clone())
        copy_gbps = 2 * nbytes / copy_ms / 1e6
        out_rows.append(
            dict(
                V=V,
                block_v="",
                warps="",
                rows="",
                kernel="copy",
                ms=f"{copy_ms:.4f}",
                gbps=f"{copy_gbps:.1f}",
                frac="1.000",
                timing=TIMING,
            )
        )
        print(f"V={V} copy {copy_ms:.3f} ms {copy_gbps:.0f} GB/s")
        g = torch.randn(x.shape[:-1], device=dev)
        h = torch.randn(x.shape[:-1], device=dev)
        grad = torch.empty(x.shape, device=dev, dtype=x.dtype)
        cands = (
            CANDIDATES
            if args.candidates is None
            else [tuple(map(int, c.split("x"))) for c in args.candidates.split(",")]
        )
        for (bv, w), mr in [(c, int(r)) for c in cands for r in args.mid_rows.split(",")]:
            _kernels.LARGE_V.update(fwd=(bv, w), bwd=(bv, w))
            _kernels.MID_ROWS = mr
            _, lse, ent = _kernels.triton_fwd(x, y, 1.0, True)
            runs = {
                "fwd": (lambda: _kernels.triton_fwd(x, y, 1.0, False), 1),
                "fwd_ent": (lambda: _kernels.triton_fwd(x, y, 1.0, True), 1),
                "bwd": (lambda: _kernels.triton_bwd(x, y, lse, g, None, None, 1.0, grad), 2),
                "bwd_ent": (lambda: _kernels.triton_bwd(x, y, lse, g, ent, h, 1.0, grad), 2),
            }
            for name, (fn, passes) in runs.items():
                if name not in args.kernels.split(","):
                    continue
                ms = bench(fn)
                gbps = passes * nbytes / ms / 1e6
                frac = gbps / copy_gbps
                out_rows.append(
                    dict(
                        V=V,
                        block_v=bv,
                        warps=w,
                        rows=mr,
                        kernel=name,
                        ms=f"{ms:.4f}",
                        gbps=f"{gbps:.1f}",
                        frac=f"{frac:.3f}",
                        timing=TIMING,
                    )
                )
                print(
                    f"V={V} BLOCK_V={bv:<6} warps={w:<3} rows={mr} {name:<8} {ms:8.3f} ms {gbps:7.0f} GB/s "
                    f"{frac:6.3f} of copy"
                )
                if V == 151_936 and name in ("fwd", "bwd") and ms < best.get(name, (None, float("inf")))[1]:
                    best[name] = ((bv, w), ms)
        _kernels.LARGE_V.clear()
        _kernels.LARGE_V.update(saved)
        _kernels.MID_ROWS = saved_mid
        buf = x = grad = flat = None  # free the buffers before the next V
        torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["V", "block_v", "warps", "rows", "kernel", "ms", "gbps", "frac", "timing"])
        wr.writeheader()
        wr.writerows(out_rows)
    print(f"wrote {len(out_rows)} rows to {args.out}")
    if best:  # the fastest tile at the main V, in the form GSPO_KERNELS_LARGE_V takes
        spec = ",".join(f"{k}={v[0][0]}x{v[0][1]}" for k, v in sorted(best.items()))
        print(f"best at V=151936: {spec}")
        with open(os.path.splitext(args.out)[0] + "_best.txt", "w") as f:
            f.write(spec + "\n")


if __name__ == "__main__":
    main()
