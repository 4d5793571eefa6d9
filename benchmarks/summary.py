"""Summarise runner CSVs against the bandwidth ceiling measured in the same run, and check
the goals the figures are owed against.

    python -m benchmarks.summary benchmarks/results/gpu.csv benchmarks/results/gpu_v.csv
    python -m benchmarks.summary OUT/*.csv --junit OUT/pytest.xml --budgets OUT/test_budgets.txt

For each fused row: median ms, GB/s under the byte model (fwd 1 pass, bwd 2,
full 3 over the logits), and that rate over the same run's contiguous copy
rate (``of copy``); for each op at each shape, speed-ups of the fused op over
the other providers in ``full`` mode. Rows whose ``timing`` says the timed
region held more than the op (``*clone_inside``: a copy of the input timed
with an in-place provider, from runs before the fair timing) are shown as
superseded and enter no ratio.

Goals (each line: the measured value, the goal, met or not; "not measured" where a row
is missing): ``gspo_loss`` full >= 90% of the three-pass bound and >= 1.25x Liger-Kernel's
sequence-level loss, ``grpo_loss`` >= 1.05x Liger's token-level one (main workload, V =
151,936), ``gspo_loss`` at V = 32,000 >= 85%; the hidden-state op (weight gradient on) at
each H measured: fused <= 1.15x the ``gemm`` row and >= 1.5x faster than the chunked path;
the whole step per provider against TRL's own path (``trl``). With ``--junit``: the test
suite's result per file against its time budget.
"""

from __future__ import annotations

import argparse
import csv
import os
import xml.etree.ElementTree as ET

MAIN_V, SMALL_V = "151936", "32000"


def fair(r) -> bool:
    return "clone_inside" not in r.get("timing", "")


def key(r):
    return r["op"], r["B"], r["G"], r["T"], r["V"], r["dtype"], r.get("H", "")


def tables(rows):
    copy = {key(r): float(r["gbps"]) for r in rows if r["provider"] == "copy"}
    unfair = [r for r in rows if not fair(r)]
    if unfair:
        print(
            "Superseded rows (their timed region included a copy of the input; no ratio uses them): "
            + "; ".join(f"{r['op']}/{r['provider']}/{r['mode']} {float(r['ms']):.3f} ms" for r in unfair)
            + "."
        )
        print()
    print("| op | provider | mode | V | ms | GB/s | of copy | timing |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["provider"].startswith("gspo_kernels") and key(r) in copy and r["op"] != "linear":
            frac = float(r["gbps"]) / copy[key(r)]
            note = f"{frac:.1%}" if fair(r) else "superseded"
            print(
                f"| {r['op']} | {r['provider']} | {r['mode']} | {r['V']} | {float(r['ms']):.3f} | "
                f"{float(r['gbps']):.0f} | {note} | {r.get('timing', '')} |"
            )
    print()
    full = {}
    for r in rows:
        if r["mode"] == "full" and fair(r):
            full.setdefault(key(r), {})[r["provider"]] = float(r["ms"])
    print("| op | V | H | fused full ms | speed-up over (fair rows only) |")
    print("|---|---|---|---|---|")
    for k, prov in full.items():
        if "gspo_kernels" in prov:
            ours = prov["gspo_kernels"]
            others = ", ".join(f"{p} {ms / ours:.2f}x" for p, ms in prov.items() if not p.startswith("gspo_kernels"))
            print(f"| {k[0]} | {k[4]} | {k[6] or '-'} | {ours:.3f} | {others or '-'} |")
    print()


def _ms(rows, op, provider, V, H=""):
    got = [
        float(r["ms"])
        for r in rows
        if r["op"] == op
        and r["provider"] == provider
        and r["mode"] == "full"
        and r["V"] == V
        and r.get("H", "") == H
        and fair(r)
    ]
    return got[-1] if got else None


def _frac(rows, op, provider, V):
    copy = [float(r["gbps"]) for r in rows if r["op"] == op and r["provider"] == "copy" and r["V"] == V]
    got = [
        float(r["gbps"])
        for r in rows
        if r["op"] == op and r["provider"] == provider and r["mode"] == "full" and r["V"] == V and fair(r)
    ]
    return got[-1] / copy[-1] if got and copy else None


def goal_lines(rows, main_v=MAIN_V, small_v=SMALL_V):
    """(goal, measured text, met: True/False/None) for every goal the rows can speak to."""
    out = []

    def check(name, value, target, higher=True, fmt="{:.2f}x"):
        if value is None:
            out.append((name, "not measured", None))
        else:
            out.append((name, fmt.format(value), value >= target if higher else value <= target))

    for op, liger, target in (("gspo_loss", "liger_seq", 1.25), ("grpo_loss", "liger_token", 1.05)):
        for ours in ("gspo_kernels", "gspo_kernels_inplace"):
            if op == "gspo_loss":
                check(
                    f"{op} {ours} full >= 90% of the three-pass bound (V = {main_v})",
                    _frac(rows, op, ours, main_v),
                    0.90,
                    fmt="{:.1%}",
                )
            a, b = _ms(rows, op, liger, main_v), _ms(rows, op, ours, main_v)
            check(f"{op} {ours} full >= {target}x {liger}", a / b if a and b else None, target)
    for op in ("gspo_loss", "sequence_logprobs"):
        check(
            f"{op} gspo_kernels full >= 85% of the three-pass bound at V = {small_v}",
            _frac(rows, op, "gspo_kernels", small_v),
            0.85,
            fmt="{:.1%}",
        )
    widths = sorted({r.get("H", "") for r in rows if r["op"] == "linear" and r.get("H")}, key=int) or ["4096", "896"]
    for H in widths:
        fused, gemm, chunked = (_ms(rows, "linear", p, main_v, H) for p in ("gspo_kernels", "gemm", "chunked"))
        check(
            f"hidden-state op H = {H}: fused fwd+bwd (grad weight on) <= 1.15x the gemm row",
            fused / gemm if fused and gemm else None,
            1.15,
            higher=False,
        )
        check(
            f"hidden-state op H = {H}: fused >= 1.5x faster than the chunked path",
            chunked / fused if fused and chunked else None,
            1.5,
        )
        for other in ("trl_chunked", "liger", "materialized"):
            t = _ms(rows, "linear", other, main_v, H)
            if t and fused:
                out.append((f"hidden-state op H = {H}: fused vs {other} (no goal)", f"{t / fused:.3g}x faster", None))
    return out


def step_lines(rows):
    """The whole step: per (config, T, checkpointing), each provider's ms and peak against ``trl``."""
    by = {}
    for r in rows:
        if r.get("op") == "step" and r["mode"] == "step" and r["ms"]:
            by.setdefault((r["config"], r["T"], r["grad_ckpt"]), {})[r["provider"]] = r
    if not by:
        return
    print("| config | T | ckpt | provider | ms | peak GiB | vs trl (time, peak) |")
    print("|---|---|---|---|---|---|---|")
    for (cfg, T, ck), prov in by.items():
        base = prov.get("trl")
        for name, r in prov.items():
            rel = "-"
            if base and name != "trl":
                rel = f"{float(base['ms']) / float(r['ms']):.2f}x faster"
                if r["peak_mb"] and base["peak_mb"]:
                    rel += f", {float(r['peak_mb']) / float(base['peak_mb']):.2f}x peak"
            peak = f"{float(r['peak_mb']) / 1024:.2f}" if r["peak_mb"] else "-"
            print(f"| {cfg} | {T} | {ck} | {name} | {float(r['ms']):.1f} | {peak} | {rel} |")
    print()


def test_lines(junit, budgets):
    """Per test file: tests passed / failed / skipped, seconds against the file's budget."""
    budget = {}
    for line in open(budgets):
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            budget[parts[0]] = float(parts[1])

    def file_of(case):  # classname "tests.test_x" or "tests.test_x.TestClass"
        parts = case.get("classname", "").split(".")
        for i in range(len(parts), 0, -1):
            f = "/".join(parts[:i]) + ".py"
            if f in budget or os.path.exists(f):
                return f
        return case.get("classname", "?")

    files = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        f = file_of(case)
        d = files.setdefault(f, dict(passed=0, failed=0, skipped=0, s=0.0))
        d["s"] += float(case.get("time") or 0)
        kinds = {child.tag for child in case}
        d["failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"] += 1
    print("| test file | passed | failed | skipped | s | budget s | within |")
    print("|---|---|---|---|---|---|---|")
    for f in sorted(set(files) | set(budget)):
        d = files.get(f)
        if d is None:
            print(f"| {f} | - | - | - | - | {budget[f]:g} | not run |")
            continue
        b = budget.get(f)
        within = "no budget" if b is None else ("yes" if d["s"] <= b else "OVER")
        print(
            f"| {f} | {d['passed']} | {d['failed']} | {d['skipped']} | {d['s']:.1f} | "
            f"{'-' if b is None else f'{b:g}'} | {within} |"
        )
    print()


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_gpu_session.py parses gpu_session.sh's steps with it)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csvs", nargs="*", default=["benchmarks/results/gpu.csv"])
    p.add_argument("--junit", default=None, help="pytest --junitxml report of the compiled test run")
    p.add_argument("--budgets", default=None, help="'file seconds' per line (gpu_session.sh writes it)")
    p.add_argument("--main-v", default=MAIN_V, help="V of the main workload's goals (a dry run: its tiny V)")
    p.add_argument("--small-v", default=SMALL_V, help="V of the small-vocabulary goal")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if args.junit:
        if os.path.exists(args.junit):
            test_lines(args.junit, args.budgets)
        else:
            print(f"no test report at {args.junit} (the test step did not finish)\n")
    rows = [r for path in args.csvs if os.path.exists(path) for r in csv.DictReader(open(path))]
    ops = [r for r in rows if r.get("op") != "step"]
    if ops:
        tables(ops)
        print("| goal | measured | met |")
        print("|---|---|---|")
        for name, value, met in goal_lines(ops, args.main_v, args.small_v):
            print(f"| {name} | {value} | {'-' if met is None else ('yes' if met else 'NO')} |")
        print()
    step_lines(rows)


if __name__ == "__main__":
    main()
