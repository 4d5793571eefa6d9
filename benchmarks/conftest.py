"""As in tests/: without CUDA, the Triton kernels run in the interpreter (set before triton is imported).

Inside the test suite the pytest-benchmark functions run once each, as
correctness checks, and print no timing table: on a CPU their timings would be
interpreter timings, meaningless next to GPU figures. Time them with
``python -m pytest benchmarks --benchmark-enable`` (the table's header then
says which device ran them)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    if hasattr(config.option, "benchmark_disable") and not getattr(config.option, "benchmark_enable", False):
        config.option.benchmark_disable = True


def pytest_report_header(config):
    mode = (
        "Triton interpreter + chunked PyTorch path on the CPU"
        if not torch.cuda.is_available()
        else f"CUDA: {torch.cuda.get_device_name()}"
    )
    return f"gspo-kernels benchmarks device: {mode}"
