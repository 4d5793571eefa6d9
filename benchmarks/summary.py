"""Summarise runner CSVs against the bandwidth ceiling measured in the same run.

    python -m benchmarks.summary benchmarks/results/gpu.csv benchmarks/results/gpu_v.csv

For each fused row: median ms, GB/s under the byte model (fwd 1 pass, bwd 2,
full 3 over the logits), and that rate over the same run's contiguous copy
rate (``of copy``); for each op at each shape, speed-ups of the fused op over
the other providers in ``full`` mode.
"""
from __future__ import annotations

import csv
import sys


def main(paths):
    rows = [r for p in paths for r in csv.DictReader(open(p))]
    key = lambda r: (r["op"], r["B"], r["G"], r["T"], r["V"], r["dtype"])  # noqa: E731
    copy = {key(r): float(r["gbps"]) for r in rows if r["provider"] == "copy"}
    print("| op | provider | mode | V | ms | GB/s | of copy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["provider"].startswith("gspo_kernels") and key(r) in copy and r["op"] != "linear":
            frac = float(r["gbps"]) / copy[key(r)]
            print(f"| {r['op']} | {r['provider']} | {r['mode']} | {r['V']} | {float(r['ms']):.3f} | "
                  f"{float(r['gbps']):.0f} | {frac:.1%} |")
    print()
    full = {}
    for r in rows:
        if r["mode"] == "full":
            full.setdefault(key(r), {})[r["provider"]] = float(r["ms"])
    print("| op | V | fused full ms | speed-up over |")
    print("|---|---|---|---|")
    for k, prov in full.items():
        if "gspo_kernels" in prov:
            ours = prov["gspo_kernels"]
            others = ", ".join(f"{p} {ms / ours:.2f}x" for p, ms in prov.items() if not p.startswith("gspo_kernels"))
            print(f"| {k[0]} | {k[4]} | {ours:.3f} | {others or '-'} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["benchmarks/results/gpu.csv"])
