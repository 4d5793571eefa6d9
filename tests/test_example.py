"""The training example (examples/train_gspo.py), test-sized: the loop runs through
gspo_loss / grpo_loss and the policy learns. The full run is its own command
(`python -m examples.train_gspo`); here the losses use the chunked PyTorch path
(the Triton kernels are covered by the other tests; the interpreter would take
minutes for 40 training steps)."""

import pytest
import torch

from examples.train_gspo import EOS, PAD, reward, summarize, train
from gspo_kernels import _ops


def test_reward_counts_digits_before_the_end_token():
    comp = torch.tensor([[[3, 4, EOS, PAD], [9, 9, 9, 9], [EOS, PAD, PAD, PAD]]])
    r = reward(torch.tensor([7]), comp)
    torch.testing.assert_close(r, torch.tensor([[1.0, 0.0, 1 - 7 / 9]]))


@pytest.mark.parametrize("loss", ["gspo", pytest.param("grpo", marks=pytest.mark.slow)])
def test_short_run_raises_reward(monkeypatch, loss):
    monkeypatch.setattr(_ops, "CPU_BACKEND", "torch")
    history, _ = train(loss, 40, B=8, G=4, lr=3e-3, log_every=0, seed=0)
    first, last = summarize(history, 5)
    assert last > first + 0.15, (first, last)
    assert all(0.0 <= h["clip_fraction"] <= 1.0 and h["kl"] >= 0.0 for h in history)  # k3 KL is >= 0
