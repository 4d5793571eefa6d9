"""The whole-step benchmark's plot (``benchmarks/step.py``): peak memory against completion length."""

from __future__ import annotations

COLORS = {
    "naive": "tab:red",
    "trl": "tab:green",
    "compile": "tab:orange",
    "liger_logits": "tab:purple",
    "liger_hidden": "tab:pink",
    "gspo_logits": "tab:cyan",
    "gspo_logits_inplace": "tab:blue",
    "gspo_hidden": "navy",
}


def plot(rows, out):
    """Peak memory against completion length: one panel per config, one line per provider and
    checkpointing setting (solid: checkpointing on, frontier tries included; dashed: off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = {}
    for r in rows:
        if r["peak_mb"] and r["mode"] in ("step", "try"):
            series = pts.setdefault(r["config"], {}).setdefault((r["provider"], str(r["grad_ckpt"]) == "True"), {})
            series[int(r["T"])] = float(r["peak_mb"]) / 1024
    if not pts:
        print("no peak memory figures: plot skipped")
        return
    fig, axes = plt.subplots(len(pts), 1, figsize=(8, 3.4 * len(pts)), squeeze=False)
    for ax, (cfg, series) in zip(axes[:, 0], sorted(pts.items())):
        for (prov, ckpt), by_t in sorted(series.items()):
            ts = sorted(by_t)
            ax.plot(
                ts,
                [by_t[t] for t in ts],
                "o-" if ckpt else "s--",
                ms=3,
                color=COLORS.get(prov),
                mfc=None if ckpt else "none",
                label=f"{prov}{'' if ckpt else ' (no checkpointing)'}",
            )
        for b in {r["budget_gb"] for r in rows if r["config"] == cfg and r["budget_gb"]}:
            ax.axhline(float(b) * 1e9 / 2**30, ls=":", color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"completion length T (B*G = {int(rows[0]['B']) * int(rows[0]['G'])}, prompt {rows[0]['P']})")
        ax.set_ylabel("peak memory GiB")
        ax.set_title(
            f"{cfg}: one step, fwd + loss + bwd + AdamW - {rows[0]['device']}, torch {rows[0]['torch']}", fontsize=8
        )
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
