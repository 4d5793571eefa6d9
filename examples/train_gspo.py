"""A GSPO training run anyone can start: a tiny causal LM learns a digit-sum task.

    python -m examples.train_gspo                      # GSPO and GRPO, 300 steps each, PNG + figures
    python -m examples.train_gspo --loss gspo --steps 50

Task: the prompt is a target ``S`` in [0, 18] (one token); the model writes up
to ``MAX_LEN`` digits and an end token; reward ``1 - |sum(digits) - S| / 9``
(clipped at 0), 1 for an exact hit. Each step samples ``G`` completions for
each of ``B`` prompts from the current policy, records their log-probs (the
"old" policy) and then takes ``INNER`` optimiser steps on ``gspo_loss`` (or
``grpo_loss``) over the logits: the fused op computes the per-token
log-probs, the ratios against the old policy, the KL against a frozen copy
of the initial model, the clipping and the mean, in one pass over the logits
forward and one backward. Nothing is downloaded; the model is random at start.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from torch import nn

import gspo_kernels

DIGITS = 10
EOS = DIGITS  # token 10: end of completion
PAD = DIGITS + 1  # token 11: padding after EOS
TARGET0 = DIGITS + 2  # tokens 12..30: the target S = 0..18
VOCAB = TARGET0 + 19
MAX_LEN = 4


class TinyLM(nn.Module):
    """A 2-layer causal transformer, ``(N, L) ids -> (N, L, VOCAB) logits``."""

    def __init__(self, d=64, layers=2, heads=4, max_len=MAX_LEN + 2):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(max_len, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, ids):
        L = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(L, device=ids.device))
        causal = nn.Transformer.generate_square_subsequent_mask(L, device=ids.device)
        return self.head(self.norm(self.body(h, mask=causal, is_causal=True)))


def reward(targets, completions):
    """``(B, G)`` rewards of ``(B, G, MAX_LEN)`` completions for ``(B,)`` targets."""
    is_digit = completions < DIGITS
    ended = torch.cumsum((completions == EOS).int(), -1) > 0  # digits after EOS do not count
    total = (completions * (is_digit & ~ended)).sum(-1)
    return (1 - (total - targets.unsqueeze(-1)).abs() / 9).clamp(min=0)


@torch.no_grad()
def sample(model, targets, G, temperature):
    """Sample G completions per target: ``(B, G, MAX_LEN)`` tokens and their ``(B, G, MAX_LEN)`` mask."""
    B = targets.shape[0]
    ids = (targets + TARGET0).repeat_interleave(G).unsqueeze(-1)  # (B*G, 1)
    done = torch.zeros(B * G, dtype=torch.bool)
    for _ in range(MAX_LEN):
        logits = model(ids)[:, -1] / temperature
        nxt = torch.multinomial(torch.softmax(logits[:, : EOS + 1], -1), 1).squeeze(-1)  # digits or EOS
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        done |= nxt == EOS
        ids = torch.cat([ids, nxt.unsqueeze(-1)], -1)
    comp = ids[:, 1:].view(B, G, MAX_LEN)
    # valid: every token up to and including the first EOS
    mask = torch.cumsum((comp == EOS).int(), -1) - (comp == EOS).int() == 0
    mask &= comp != PAD
    return ids, comp, mask


def completion_logits(model, ids, B, G):
    """Logits predicting each completion token: ``(B, G, MAX_LEN, VOCAB)`` (a strided slice, no copy)."""
    return model(ids[:, :-1]).view(B, G, MAX_LEN, VOCAB)


def train(loss_name, steps, B=16, G=8, inner=2, lr=1e-3, beta=0.04, temperature=1.0, seed=0, log_every=10):
    torch.manual_seed(seed)
    model = TinyLM()
    ref = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_fn = gspo_kernels.gspo_loss if loss_name == "gspo" else gspo_kernels.grpo_loss
    extra = dict(advantage="group_norm", epsilon=0.2, epsilon_high=0.2) if loss_name == "gspo" else dict(epsilon=0.2)
    history = []
    t0 = time.time()
    for step in range(steps):
        targets = torch.randint(0, 19, (B,))
        ids, comp, mask = sample(model, targets, G, temperature)
        r = reward(targets, comp)
        with torch.no_grad():
            tokens = comp.clamp(max=EOS)  # PAD positions are masked; keep ids in range anyway
            old = gspo_kernels.token_logprobs(completion_logits(model, ids, B, G), tokens, temperature=temperature)
            ref_lp = gspo_kernels.token_logprobs(completion_logits(ref, ids, B, G), tokens, temperature=temperature)
        for _ in range(inner):
            logits = completion_logits(model, ids, B, G)
            loss, m = loss_fn(
                logits,
                tokens,
                r,
                mask,
                old_logprobs=old,
                ref_logprobs=ref_lp,
                beta=beta,
                kl="k3",
                temperature=temperature,
                **extra,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        history.append(
            dict(
                step=step,
                reward=r.mean().item(),
                exact=(r == 1).float().mean().item(),
                kl=m["kl"].item(),
                clip_fraction=m["clip_fraction"].item(),
                loss=loss.item(),
            )
        )
        if log_every and (step % log_every == 0 or step == steps - 1):
            h = history[-1]
            print(
                f"[{loss_name}] step {step:4d} reward {h['reward']:.3f} exact {h['exact']:.3f} "
                f"kl {h['kl']:.4f} clip {h['clip_fraction']:.3f} ({time.time() - t0:.0f}s)",
                flush=True,
            )
    return history, time.time() - t0


def summarize(history, window=10):
    first = sum(h["reward"] for h in history[:window]) / min(window, len(history))
    last = sum(h["reward"] for h in history[-window:]) / min(window, len(history))
    return first, last


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, hist in runs.items():
        for ax, key in zip(axes, ("reward", "kl", "clip_fraction")):
            ax.plot([h["step"] for h in hist], [h[key] for h in hist], label=name.upper())
            ax.set_title(key.replace("_", " "))
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", choices=["gspo", "grpo", "both"], default="both")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="examples/results")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    names = ["gspo", "grpo"] if args.loss == "both" else [args.loss]
    runs, summary = {}, {}
    for name in names:
        hist, secs = train(name, args.steps, seed=args.seed)
        runs[name] = hist
        first, last = summarize(hist)
        summary[name] = dict(
            steps=args.steps,
            seconds=round(secs, 1),
            reward_first10=round(first, 4),
            reward_last10=round(last, 4),
            exact_last10=round(sum(h["exact"] for h in hist[-10:]) / min(10, len(hist)), 4),
            clip_fraction_mean=round(sum(h["clip_fraction"] for h in hist) / len(hist), 4),
            kl_last10=round(sum(h["kl"] for h in hist[-10:]) / min(10, len(hist)), 5),
        )
        print(f"{name}: mean reward {first:.3f} (first 10 steps) -> {last:.3f} (last 10), {secs:.0f}s")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(
            {
                "command": "python -m examples.train_gspo " + " ".join(argv or []),
                "torch": torch.__version__,
                "runs": summary,
                "history": runs,
            },
            f,
            indent=1,
        )
    try:
        plot(runs, os.path.join(args.out, "gspo_vs_grpo.png"))
    except ImportError:
        print("matplotlib missing: no plot")
    return summary


if __name__ == "__main__":
    main()
