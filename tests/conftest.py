"""Test set-up: without a CUDA GPU, the Triton kernels run in Triton's CPU
interpreter. TRITON_INTERPRET must be set before triton is first imported,
hence here, before any test module imports gspo_kernels."""

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---------------------------------------------------------------- test tiers
# Quick tier: ``pytest -m "not slow"``; the full suite: ``pytest``. A test is slow when
#   1. it is marked ``@pytest.mark.slow`` (a test over ~5 s on a 2-core CPU; a parametrisation
#      marked ``pytest.param(..., marks=pytest.mark.slow)``), or
#   2. it is a parametrisation of a test under tests/ whose every parameter value (argument
#      name and value) already appeared in an earlier, not-slow parametrisation of the same test
#      (collection order). So the quick tier still runs each value of each parameter once, every
#      backend, loss type, variant, layout and dtype, but not their full cross product.
def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    seen: dict = {}
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or item.get_closest_marker("slow") or not str(item.path).startswith(here):
            continue
        pairs = {(name, _value_key(value)) for name, value in callspec.params.items()}
        covered = seen.setdefault((str(item.path), item.originalname), set())
        if pairs <= covered:
            item.add_marker(pytest.mark.slow)
        covered |= pairs


def _value_key(value):
    try:
        hash(value)
        return value if not isinstance(value, float) or value == value else "nan"
    except TypeError:
        return repr(value)


# ---------------------------------------------------------------- code-generation summary
# tests/test_codegen.py appends its table to its module's SUMMARY. Each test's report carries the
# lines it added (user_properties), so the table reaches the terminal also from pytest-xdist
# workers, whose modules the controlling process never imports.
_codegen_sent = 0
_codegen_lines: list = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    global _codegen_sent
    outcome = yield
    summary = getattr(getattr(item, "module", None), "SUMMARY", None)
    if call.when == "teardown" and isinstance(summary, list) and item.module.__name__.endswith("test_codegen"):
        outcome.get_result().user_properties.append(("codegen_summary", summary[_codegen_sent:]))
        _codegen_sent = len(summary)


def pytest_runtest_logreport(report):
    for name, value in getattr(report, "user_properties", ()):
        if name == "codegen_summary":
            _codegen_lines.extend(value)


def pytest_terminal_summary(terminalreporter):
    """Registers per thread and global accesses of the compiled kernels (sm_90, bf16/fp16/fp32,
    V = 151,936, a [:, :-1] slice), read from their PTX/cubin by tests/test_codegen.py."""
    if len(_codegen_lines) > 1:
        terminalreporter.section("generated code, sm_90 (no GPU needed)")
        for line in _codegen_lines:
            terminalreporter.write_line(line)


# Errors against a float64 reference, by the logits' dtype (``torch.testing.assert_close``
# keyword arguments). Values: fp32 accumulation in the kernels (~1e-6 relative on a log-prob),
# amplified at most by exp() of ratios near 1 and advantages of order 1. Gradients: written in
# the logits' dtype, so one rounding of it (bf16: 2**-8 relative; the interpreter truncates, 2**-7).
TOLERANCE = {
    torch.float64: dict(value=dict(atol=1e-12, rtol=1e-10), grad=dict(atol=1e-13, rtol=1e-10)),
    torch.float32: dict(value=dict(atol=2e-6, rtol=1e-5), grad=dict(atol=1e-7, rtol=5e-5)),
    torch.float16: dict(value=dict(atol=2e-6, rtol=1e-5), grad=dict(atol=1e-6, rtol=2.0**-10)),
    torch.bfloat16: dict(value=dict(atol=2e-6, rtol=1e-5), grad=dict(atol=1e-6, rtol=2.0**-7)),
}


# The option variants every TRL loss type is tested under (tests/test_policy_loss.py against
# TRL itself, tests/test_tail.py the fused tail against the torch composition).
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
POLICY_VARIANTS = {
    "plain": dict(epsilon=0.15, epsilon_high=0.28),  # asymmetric: a swapped clip side shows
    "delta": dict(delta=1.3),
    "kl_bias_corrected": dict(beta=0.07, use_bias_correction_kl=True),
    "kl_k3": dict(beta=0.07, use_bias_correction_kl=False),
    "off_policy_mask": dict(off_policy_mask_threshold=0.05),
    "top_entropy": dict(top_entropy_quantile=0.4, entropy_coef=0.02),
    "token_truncate": dict(
        vllm_importance_sampling_mode="token_truncate",
        vllm_importance_sampling_clip_min=0.5,
        vllm_importance_sampling_clip_max=1.2,
    ),
    "token_mask": dict(
        vllm_importance_sampling_mode="token_mask",
        vllm_importance_sampling_clip_min=0.7,
        vllm_importance_sampling_clip_max=1.3,
    ),
    "sequence_truncate": dict(vllm_importance_sampling_mode="sequence_truncate", vllm_importance_sampling_clip_max=1.5),
    "sequence_mask": dict(
        vllm_importance_sampling_mode="sequence_mask",
        vllm_importance_sampling_clip_min=0.3,
        vllm_importance_sampling_clip_max=2.0,
    ),
}


@contextlib.contextmanager
def torch_composition():
    """Run core.compose's torch composition (same log-prob kernels) instead of the fused tail."""
    from gspo_kernels.losses.tail import autograd as tail_autograd

    saved = tail_autograd.applies
    tail_autograd.applies = lambda *a, **k: False
    try:
        yield
    finally:
        tail_autograd.applies = saved


def rl_batch(seed: int = 0, B: int = 2, G: int = 3, T: int = 8, V: int = 33) -> dict:
    """A small rollout batch: logits ``x`` (B, G, T, V), ids ``y``, ``lengths`` with an empty and a
    one-token completion (and their ``mask``), ``rewards``, old / reference / sampling log-probs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, G, T, V, generator=g)
    y = torch.randint(0, V, (B, G, T), generator=g)
    lengths = torch.tensor([[T, 0, 3], [5, T, 1]])[:B, :G]
    mask = torch.arange(T) < lengths.unsqueeze(-1)
    rewards = torch.randn(B, G, generator=g)
    old = -torch.rand(B, G, T, generator=g) * 4
    ref = old + 0.1 * torch.randn(B, G, T, generator=g)
    samp = old + 0.1 * torch.randn(B, G, T, generator=g)
    return dict(x=x, y=y, mask=mask, lengths=lengths, rewards=rewards, old=old, ref=ref, samp=samp)
