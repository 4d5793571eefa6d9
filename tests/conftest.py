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
