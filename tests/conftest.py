"""Test set-up: without a CUDA GPU, the Triton kernels run in Triton's CPU
interpreter. TRITON_INTERPRET must be set before triton is first imported,
hence here, before any test module imports gspo_kernels."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_terminal_summary(terminalreporter):
    """Registers per thread and global accesses of the compiled kernels (sm_90, bf16/fp16/fp32,
    V = 151,936, a [:, :-1] slice), read from their PTX/cubin by tests/test_codegen.py."""
    import sys

    mod = sys.modules.get("tests.test_codegen") or sys.modules.get("test_codegen")
    lines = getattr(mod, "SUMMARY", None)
    if lines and len(lines) > 1:
        terminalreporter.section("generated code, sm_90 (no GPU needed)")
        for line in lines:
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
