"""Test set-up: without a CUDA GPU, the Triton kernels run in Triton's CPU
interpreter. TRITON_INTERPRET must be set before triton is first imported,
hence here, before any test module imports gspo_kernels."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
