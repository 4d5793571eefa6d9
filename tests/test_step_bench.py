"""The whole-step benchmark (``benchmarks/step.py``) on a tiny Qwen2 on the CPU.

Every provider that can run here gives the same loss and the same parameter
gradients as ``naive`` (the materialised route), from the same fp32 weights
and inputs. Tolerance: the loss to rtol 1e-5 (atol 1e-7); each parameter's
gradient to within 1e-5 of the largest entry of naive's gradient for that
parameter (``atol = 1e-5 * max|g|``, rtol 1e-5). Seen on a 2-core x86_64 CPU
(torch 2.13): at most 5.2e-7 relative on the loss and 5.0e-7 of max|g| on any
gradient, Liger-Kernel 0.8.5 included. Providers that cannot be
imported (Liger-Kernel) are skipped with the reason printed; the core ones
(naive, compile and this package's) must run. The Triton kernels run in the
interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
"""

from __future__ import annotations

import csv

import pytest
import torch

from benchmarks import step

pytestmark = pytest.mark.slow  # a benchmark harness's checks (~1 min on 2 cores): the full suite

CORE = ("naive", "trl", "compile", "gspo_logits", "gspo_logits_inplace", "gspo_hidden")
EPS, EPS_HIGH = 0.2, 0.28


@pytest.fixture(scope="module")
def tiny():
    model = step.build_model("tiny", "cpu", torch.float32)
    state = step.snapshot(model)
    batch = step.make_batch(model, B=2, G=2, P=6, T=8, offset=0.6)
    fns, skipped = step.providers("cpu", EPS, EPS_HIGH)
    return model, state, batch, fns, skipped


def _loss_and_grads(model, state, fn, batch):
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def naive(tiny):
    model, state, batch, fns, _ = tiny
    return _loss_and_grads(model, state, fns["naive"], batch)


def test_inputs_clip_some_sequences_and_not_others(tiny):
    """The comparison covers both branches of the clipped objective."""
    model, state, batch, _, _ = tiny
    model.load_state_dict(state)
    with torch.no_grad():
        logp = step.selective_log_softmax(step._logits(model, batch)[:, :-1], batch.tokens)
    m = batch.mask.float()
    w = torch.exp(((logp - batch.old) * m).sum(-1) / m.sum(-1))
    clipped = ((batch.adv > 0) & (w > 1 + EPS_HIGH)) | ((batch.adv < 0) & (w < 1 - EPS))
    assert 0 < int(clipped.sum()) < clipped.numel(), (w, batch.adv)


@pytest.mark.parametrize("name", [p for p in step.PROVIDERS if p != "naive"])
def test_provider_matches_naive(tiny, naive, name):
    model, state, batch, fns, skipped = tiny
    if name not in fns:
        assert name not in CORE, f"core provider {name} did not run: {skipped.get(name)}"
        print(f"{name}: skipped ({skipped[name]})")
        pytest.skip(skipped[name])
    loss, grads = _loss_and_grads(model, state, fns[name], batch)
    ref_loss, ref_grads = naive
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert grads.keys() == ref_grads.keys()
    assert any(g.abs().max() > 0 for g in ref_grads.values())
    for n, g in grads.items():
        scale = float(ref_grads[n].abs().max())
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-5 * scale + 1e-12, msg=lambda m: f"{n}: {m}")


def test_main_writes_csv_and_plot(tmp_path, capsys):
    """``python -m benchmarks.step --device cpu --tiny`` end to end (two providers, one step each)."""
    out = tmp_path / "step.csv"
    liger = "liger_hidden" in step.providers("cpu", EPS, EPS_HIGH)[0]
    step.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--providers",
            "naive,gspo_logits,liger_hidden",
            "--cases",
            "8:off,8:on",
            "--warmup",
            "1",
            "--reps",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = list(csv.DictReader(open(out)))
    assert {r["provider"] for r in rows} == {"naive", "gspo_logits"} | ({"liger_hidden"} if liger else set())
    assert {r["grad_ckpt"] for r in rows} == {"False", "True"}
    for r in rows:
        assert r["mode"] == "step" and r["timing"] == "perf_counter" and float(r["ms"]) > 0
        assert r["B"] == "2" and r["G"] == "2" and r["T"] == "8" and r["V"] == "512"
    losses = {(r["provider"], r["grad_ckpt"]): float(r["loss"]) for r in rows}
    assert losses[("gspo_logits", "False")] == pytest.approx(losses[("naive", "False")], rel=1e-5)
    printed = capsys.readouterr().out
    assert "gspo_logits vs naive:" in printed
    if not liger:
        assert "liger_hidden: skipped (" in printed
