"""``benchmarks/gpu_session.sh``, the one prepared script for a lent GPU, cannot fail there on
a typo: it is valid bash, every test file has its time budget in it, every python step it
runs (GPU and dry-run variants) parses its arguments with the module's own parser, and
(slow) the whole dry run completes on this CPU and writes every result file."""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import shlex
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def _bash(*args, env=None, timeout=60):
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_test_file_has_a_budget():
    text = SCRIPT.read_text()
    block = re.search(r"TEST_BUDGETS='\n(.*?)'", text, re.S).group(1)
    budgets = dict(line.split() for line in block.splitlines() if line.strip())
    files = sorted(str(p.relative_to(ROOT)) for d in ("tests", "benchmarks") for p in (ROOT / d).glob("test_*.py"))
    missing = [f for f in files if f not in budgets]
    assert not missing, f"add a line 'FILE SECONDS' to TEST_BUDGETS in benchmarks/gpu_session.sh for {missing}"
    stale = [f for f in budgets if not (ROOT / f).exists()]
    assert not stale, f"TEST_BUDGETS in benchmarks/gpu_session.sh lists files that do not exist: {stale}"
    assert all(float(s) > 0 for s in budgets.values())


@pytest.mark.parametrize("mode", [[], ["--dry-run"]], ids=["gpu", "dry_run"])
def test_python_steps_parse_their_arguments(mode):
    r = _bash("--list", *mode)
    assert r.returncode == 0, r.stderr
    steps = [line for line in r.stdout.splitlines() if "-m benchmarks." in line]
    modules = set()
    for line in steps:
        words = shlex.split(line)
        i = words.index("-m")
        name, args = words[i + 1], [w.replace("OUT/", "/tmp/") for w in words[i + 2 :]]
        modules.add(name)
        importlib.import_module(name).parser().parse_args(args)  # a typo exits here (SystemExit)
    assert modules == {"benchmarks.gpu", "benchmarks.step", "benchmarks.summary"}
    assert sum("-m benchmarks.gpu" in s for s in steps) == 3  # loss, V = 32,000, hidden states


def test_a_typo_in_a_step_fails_at_parse_time():
    gpu = importlib.import_module("benchmarks.gpu")
    step = importlib.import_module("benchmarks.step")
    for mod, args in (
        (gpu, ["--providers", "gspo_kernel"]),
        (gpu, ["--ops", "gspo_los"]),
        (gpu, ["--hidden", "4096,8g6"]),
        (step, ["--providers", "tlr"]),
        (step, ["--cases", "1024:of"]),
    ):
        with pytest.raises(SystemExit):
            mod.parser().parse_args(args)


@pytest.mark.slow
def test_dry_run_completes_and_writes_every_result(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), GSPO_SESSION_SECONDS="580", PYTHONPATH=str(ROOT))
    r = _bash("--dry-run", env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = (tmp_path / "steps.txt").read_text()
    for name in ("tests_collect", "tests", "loss", "loss_v32k", "hidden", "step"):
        assert f"== {name} rc=0" in steps, steps
    for f in ("env.txt", "pytest.xml", "loss.csv", "loss_v32k.csv", "linear.csv", "step.csv", "summary.md"):
        assert (tmp_path / f).stat().st_size > 0, f
    summary = (tmp_path / "summary.md").read_text()
    assert "| goal | measured | met |" in summary and "tests/test_graph_safety.py" in summary
    assert "hidden-state op H = 64: fused fwd+bwd (grad weight on) <= 1.15x the gemm row" in summary
    assert "| tiny | 8 | False | trl |" in summary
