"""Summarise runner CSVs against the bandwidth ceiling measured in the same run.

    python -m benchmarks.summary benchmarks/results/gpu.csv benchmarks/results/gpu_v.csv

For each fused row: median ms, GB/s under the byte model (fwd 1 pass, bwd 2,
full 3 over the logits), and that rate over the same run's contiguous copy
rate (``of copy``); for each op at each shape, speed-ups of the fused op over
the other providers in ``full`` mode. Rows whose ``timing`` says the timed
region held more than the op (``*clone_inside``: a copy of the input timed
with an in-place provider, from runs before the fair timing) are shown as
superseded and enter no ratio.
"""
from __future__ import annotations

import csv
import sys


def fair(r) -> bool:
    return "clone_inside" not in r.get("timing", "")


def main(paths):
    rows = [r for p in paths for r in csv.DictReader(open(p))]
    key = lambda r: (r["op"], r["B"], r["G"], r["T"], r["V"], r["dtype"])  # noqa: E731
    copy = {key(r): float(r["gbps"]) for r in rows if r["provider"] == "copy"}
    unfair = [r for r in rows if not fair(r)]
    if unfair:
        print("Superseded rows (their timed region included a copy of the input; no ratio uses them): "
              + "; ".join(f"{r['op']}/{r['provider']}/{r['mode']} {float(r['ms']):.3f} ms" for r in unfair) + ".")
        print()
    print("| op | provider | mode | V | ms | GB/s | of copy | timing |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["provider"].startswith("gspo_kernels") and key(r) in copy and r["op"] != "linear":
            frac = float(r["gbps"]) / copy[key(r)]
            note = f"{frac:.1%}" if fair(r) else "superseded"
            print(f"| {r['op']} | {r['provider']} | {r['mode']} | {r['V']} | {float(r['ms']):.3f} | "
                  f"{float(r['gbps']):.0f} | {note} | {r.get('timing', '')} |")
    print()
    full = {}
    for r in rows:
        if r["mode"] == "full" and fair(r):
            full.setdefault(key(r), {})[r["provider"]] = float(r["ms"])
    print("| op | V | fused full ms | speed-up over (fair rows only) |")
    print("|---|---|---|---|")
    for k, prov in full.items():
        if "gspo_kernels" in prov:
            ours = prov["gspo_kernels"]
            others = ", ".join(f"{p} {ms / ours:.2f}x" for p, ms in prov.items() if not p.startswith("gspo_kernels"))
            print(f"| {k[0]} | {k[4]} | {ours:.3f} | {others or '-'} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["benchmarks/results/gpu.csv"])
