"""Plot a runner CSV: median ms per provider and mode, one panel per (op, shape).

python -m benchmarks.plot benchmarks/results/gpu.csv [--out benchmarks/results/gpu.png]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("csv")
    p.add_argument("--out")
    args = p.parse_args(argv)
    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    panels = defaultdict(list)
    for r in rows:
        panels[(r["op"], r["B"], r["G"], r["T"], r["V"], r["dtype"])].append(r)
    n = len(panels)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.8 * n), squeeze=False)
    for ax, (key, rs) in zip(axes[:, 0], sorted(panels.items())):
        labels = [
            f"{r['provider']}\n{r['mode']}"
            + (" (clone timed: superseded)" if "clone_inside" in r.get("timing", "") else "")
            for r in rs
        ]
        ax.barh(
            range(len(rs)),
            [float(r["ms"]) for r in rs],
            color=[
                "tab:gray"
                if r["provider"] == "copy"
                else "tab:blue"
                if r["provider"].startswith("gspo")
                else "tab:orange"
                for r in rs
            ],
        )
        ax.set_yticks(range(len(rs)), labels, fontsize=6)
        ax.set_xlabel("median ms (lower is better)")
        op, B, G, T, V, dt = key
        ax.set_title(f"{op}: B={B} G={G} T={T} V={V} {dt} - {rs[0]['device']}, torch {rs[0]['torch']}", fontsize=8)
    fig.tight_layout()
    out = args.out or args.csv.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
