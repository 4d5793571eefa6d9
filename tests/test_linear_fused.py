"""The fused hidden-state kernels (``gspo_kernels._kernels_linear``) against the
float64 reference that materialises the logits: log-probs, entropy and the
gradients of hidden, weight and bias for both upstream gradients; odd H and V,
V over several tiles, forward splits and backward slices, valid rows,
temperature, bias, tied weights, determinism, gradient filtering (and its
error on a peaked head), tensor parallel over gloo. Without a GPU the kernels
run in Triton's interpreter, with small tiles (16 x 32) so that these tiny
shapes still cross several of them."""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gspo_kernels import _launch_linear as kl
from gspo_kernels import _ops, linear, linear_sequence_logprobs, linear_token_logprobs
from reference.linear import naive_linear_grads, naive_linear_sequence_logprobs, naive_linear_token_outputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not kl.HAS_TRITON or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="the fused kernels need a GPU or Triton's interpreter",
)

# Errors relative to max(1, max |reference|), against float64 on the same (rounded) inputs.
# value: the logits stay fp32 (never rounded to the input dtype), so log-probs and
#   entropy carry only fp32 error whatever the dtype.
# grad: dz is written in the input dtype (as a materialised gradient is), and the
#   gradients are rounded once more to it: two roundings of the dtype (the
#   interpreter truncates when it narrows, a unit in the last place each; GPUs
#   round to nearest). A wrong sign, temperature or missing row is off by O(1).
TOLERANCE = {
    torch.float32: dict(value=2e-6, grad=2e-5),
    torch.bfloat16: dict(value=2e-6, grad=2.0**-6),
    torch.float16: dict(value=2e-6, grad=2.0**-9),
}
DTYPES = list(TOLERANCE)


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    """Fused path on, several forward splits (3 programs' worth) and 64-column backward slices;
    counts the fused calls so that every test can check it ran them."""
    monkeypatch.setattr(_ops, "CPU_BACKEND", "triton")
    monkeypatch.setattr(linear, "FUSED", True)
    monkeypatch.setattr(linear, "MIN_SPLIT_BLOCKS", 1)
    monkeypatch.setattr(linear, "SPLIT_PROGRAMS", 3)
    monkeypatch.setattr(linear, "MAX_SLICE_COLS", 64)
    calls = {"fwd": 0, "bwd": 0}
    for name in ("fwd", "bwd"):
        real = getattr(linear, f"fused_{name}")

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(linear, f"fused_{name}", spy)
    return calls


def _close(actual, expected, rel, what):
    scale = expected.abs().max().clamp(min=1.0).item()
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=rel * scale, rtol=0, msg=lambda m: f"{what}: {m}"
    )


def _inputs(shape, H, V, dtype, seed=0, bias=True, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * scale).to(dtype).to(DEVICE)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).to(DEVICE) if bias else None
    tokens = torch.randint(0, V, shape, generator=g).to(DEVICE)
    return hidden, weight, b, tokens


def _leaves(*ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in ts]


def _upstream(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)


def _check(hidden, weight, bias, tokens, valid=None, tau=1.0, which="both", grad_filter=False):
    """Fused outputs and gradients (of the parameters that require them) against float64."""
    dtype = hidden.dtype
    tol = TOLERANCE[dtype]
    h, w, b = _leaves(hidden, weight, bias)
    lp, ent = linear_token_logprobs(
        h, w, tokens, bias=b, temperature=tau, valid=valid, return_entropy=True, grad_filter=grad_filter
    )
    h64, w64, b64 = _leaves(hidden, weight, bias, dtype=torch.float64)
    lp_r, ent_r = naive_linear_token_outputs(h64, w64, tokens, b64, tau, valid, dtype=torch.float64)
    assert lp.dtype == ent.dtype == torch.float32
    _close(lp, lp_r, tol["value"], "logp")
    _close(ent, ent_r, tol["value"], "entropy")
    outs, refs = {"both": ([lp, ent], [lp_r, ent_r]), "logp": ([lp], [lp_r]), "entropy": ([ent], [ent_r])}[which]
    ups = [_upstream(o.shape, i + 1) for i, o in enumerate(outs)]
    params = [p for p in (h, w, b) if p is not None]
    got = torch.autograd.grad(outs, params, [u.float() for u in ups])
    exp = torch.autograd.grad(refs, [p for p in (h64, w64, b64) if p is not None], ups)
    for name, a, e in zip(("hidden", "weight", "bias"), got, exp):
        assert a.dtype == dtype
        _close(a, e, tol["grad"], f"grad {name} ({which})")
    return lp, ent, got


# (leading shape, H, V, bias, tau, which): odd H and V; V = 300 over 10 column tiles, 2 forward
# splits and 5 backward slices; 21 rows over two row tiles with a partial one.
CASES = [
    ((3, 7), 37, 101, True, 0.8, "both"),
    ((21,), 16, 300, False, 1.3, "entropy"),
    ((2, 5), 48, 33, True, 1.0, "logp"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,H,V,bias,tau,which", CASES)
def test_values_and_three_grads(fused, dtype, shape, H, V, bias, tau, which):
    hidden, weight, b, tokens = _inputs(shape, H, V, dtype, bias=bias)
    valid = torch.rand(shape, generator=torch.Generator().manual_seed(3)) > 0.25
    _check(hidden, weight, b, tokens, valid.to(DEVICE), tau, which)
    assert fused == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_masked_rows_are_inert(fused, monkeypatch, path):
    """Rows that are not valid give 0, a zero gradient, and whatever their hidden states
    and ids hold (NaN, -1) reaches nothing; rows of valid tokens with zero upstream
    gradient get a zero hidden gradient. The same contract on the chunked path."""
    monkeypatch.setattr(linear, "FUSED", path == "fused")
    hidden, weight, bias, tokens = _inputs((20,), 24, 70, torch.float32, seed=4)
    valid = torch.ones(20, dtype=torch.bool, device=DEVICE)
    valid[[2, 3, 17]] = False
    bad = hidden.clone()
    bad[[2, 3, 17]] = float("nan")
    bad_tokens = tokens.clone()
    bad_tokens[[2, 3, 17]] = -1
    h, w, b = _leaves(bad, weight, bias)
    lp, ent = linear_token_logprobs(h, w, bad_tokens, bias=b, valid=valid, return_entropy=True, chunk_size=3)
    assert fused["fwd"] == (path == "fused")
    assert torch.count_nonzero(lp[~valid]) == 0 and torch.count_nonzero(ent[~valid]) == 0
    up = torch.ones(20, device=DEVICE)
    up[5] = 0.0
    gh, gw, gb = torch.autograd.grad([lp, ent], [h, w, b], [up, up])
    assert torch.isfinite(gw).all() and torch.isfinite(gb).all() and torch.isfinite(gh).all()
    assert torch.count_nonzero(gh[[2, 3, 5, 17]]) == 0 and torch.count_nonzero(gh[4]) > 0
    h64, w64, b64 = _leaves(hidden, weight, bias, dtype=torch.float64)
    lp_r, ent_r = naive_linear_token_outputs(h64, w64, tokens, b64, 1.0, valid, dtype=torch.float64)
    _close(lp, lp_r, 2e-6, "logp")
    exp = torch.autograd.grad([lp_r, ent_r], [w64, b64], [up.double(), up.double()])
    _close(gw, exp[0], 2e-5, "grad weight")
    _close(gb, exp[1], 2e-5, "grad bias")


@pytest.mark.parametrize("need", ["hidden", "weight", "bias"])
def test_one_gradient_at_a_time(fused, need):
    # Only the asked-for products run; grad_bias alone takes the product kernel's row-sum-only variant.
    hidden, weight, bias, tokens = _inputs((2, 9), 20, 90, torch.float32, seed=5)
    ts = dict(hidden=hidden, weight=weight, bias=bias)
    x = {k: v.detach().requires_grad_(k == need) for k, v in ts.items()}
    lp = linear_token_logprobs(x["hidden"], x["weight"], tokens, bias=x["bias"], temperature=0.7)
    (got,) = torch.autograd.grad(lp, x[need], _upstream(lp.shape, 6).float())
    r = {k: v.detach().double().requires_grad_(k == need) for k, v in ts.items()}
    lp_r, _ = naive_linear_token_outputs(r["hidden"], r["weight"], tokens, r["bias"], 0.7, dtype=torch.float64)
    (exp,) = torch.autograd.grad(lp_r, r[need], _upstream(lp.shape, 6))
    _close(got, exp, TOLERANCE[torch.float32]["grad"], f"grad {need}")


def test_tied_weights_and_sequence_mean(fused):
    """The LM head tied to the embedding: both uses add into one gradient; the per-sequence mean."""
    V, H = 45, 16
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(V, H, generator=g).to(DEVICE)
    ids = torch.randint(0, V, (3, 6), generator=g).to(DEVICE)
    tokens = torch.randint(0, V, (3, 6), generator=g).to(DEVICE)
    lengths = torch.tensor([6, 0, 4], device=DEVICE)
    grads = []
    for fn, dt in (
        (lambda h, w: linear_sequence_logprobs(h, w, tokens, lengths=lengths, temperature=0.9), torch.float32),
        (
            lambda h, w: naive_linear_sequence_logprobs(
                h, w, tokens, lengths=lengths, temperature=0.9, dtype=torch.float64
            ),
            torch.float64,
        ),
    ):
        w = emb.to(dt).requires_grad_(True)
        out = fn(torch.tanh(w[ids]), w)
        grads.append((out, torch.autograd.grad(out, w, torch.tensor([1.0, 2.0, -1.0], dtype=dt, device=DEVICE))[0]))
    _close(grads[0][0], grads[1][0], 2e-6, "sequence mean")
    _close(grads[0][1], grads[1][1], 2e-5, "tied weight grad")
    assert grads[0][0][1].item() == 0.0  # L = 0: 0


def test_bitwise_deterministic(fused):
    hidden, weight, bias, tokens = _inputs((2, 10), 37, 130, torch.bfloat16, seed=7)
    runs = []
    for _ in range(2):
        h, w, b = _leaves(hidden, weight, bias)
        lp, ent = linear_token_logprobs(h, w, tokens, bias=b, temperature=0.6, return_entropy=True)
        runs.append([lp, ent, *torch.autograd.grad([lp, ent], [h, w, b], [torch.ones_like(lp), -torch.ones_like(ent)])])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_fp64_and_the_switch_take_the_chunked_path(fused, monkeypatch):
    hidden, weight, bias, tokens = _inputs((2, 4), 8, 20, torch.float64, seed=8)
    assert not linear.uses_fused(hidden)
    linear_token_logprobs(hidden, weight, tokens, bias=bias)
    assert fused["fwd"] == 0
    x32 = hidden.float()
    monkeypatch.setattr(linear, "FUSED", False)
    assert not linear.uses_fused(x32)


# ---------------------------------------------------------------- gradient filtering
def test_filtering_keeps_sampled_tiles_and_drops_the_rest(fused):
    """At threshold 0.999 every tile is dropped but those holding a sampled token (and
    those with a probability >= 0.999): weight rows of dropped vocabulary tiles get
    exactly zero gradient, and the kept tiles' contribution is exact."""
    hidden, weight, _, tokens = _inputs((16,), 16, 128, torch.float32, seed=9, scale=0.1)  # near-uniform p
    tokens = torch.full((16,), 5, device=DEVICE)  # every sampled token in the first 32-column tile
    h, w = _leaves(hidden, weight)
    lp = linear_token_logprobs(h, w, tokens, grad_filter=0.999)
    (gw,) = torch.autograd.grad(lp, w, torch.ones_like(lp))
    assert torch.count_nonzero(gw[32:]) == 0
    h64, w64 = _leaves(hidden, weight, dtype=torch.float64)
    lp_r, _ = naive_linear_token_outputs(h64, w64, tokens, None, 1.0, dtype=torch.float64)
    (exp,) = torch.autograd.grad(lp_r, w64, torch.ones_like(lp_r))
    _close(gw[:32], exp[:32], 2e-5, "kept tile")
    with pytest.raises(ValueError, match="grad_filter must be False, True"):
        linear_token_logprobs(hidden, weight, tokens, grad_filter=1.5)


def zipf_head(R, H, V, dtype=torch.float64, shuffle=False, s=1.1, noise=1.0, k=32, boost=6.0, seed=10):
    """A head as peaked as a trained LM's. Logits ``x_rv = bias_v + hidden_r . weight_v``:
    ``bias_v = -s ln(rank_v)``, a Zipf prior over the vocabulary (frequent ids first, as in
    BPE vocabularies, or ``shuffle``d); ``hidden . weight`` per-token noise of standard
    deviation ``noise``; plus ``boost`` on ``k`` context tokens per row drawn from the prior
    (the tokens the context makes likely). Tokens are sampled from the softmax. Defaults:
    mean entropy ~1.9 nats, top-1 probability ~0.42. The per-row boosts enter the product
    through R extra hidden units (row r's one-hot, against a weight column holding row r's
    boosts), so the head is an ordinary ``(V, H + R)`` one. Returns (hidden, weight, bias,
    tokens, mean entropy in nats)."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(V, generator=g) if shuffle else torch.arange(V)
    bias = -s * torch.log1p(rank.double())
    ctx = torch.multinomial(torch.softmax(bias, -1).expand(R, V), k, generator=g)
    hidden = torch.randn(R, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * noise / H**0.5
    logits = hidden @ weight.T + bias
    logits.scatter_add_(1, ctx, torch.full((R, k), boost, dtype=torch.float64))
    probs = torch.softmax(logits, -1)
    tokens = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1).mean().item()
    boosts = torch.zeros(V, R, dtype=torch.float64)
    boosts[ctx.T.reshape(-1), torch.arange(R).repeat(k)] += boost
    hidden = torch.cat([hidden, torch.eye(R, dtype=torch.float64)], 1)
    weight = torch.cat([weight, boosts], 1)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), tokens, entropy


def _rel(a, e):
    return ((a.double() - e.double()).abs().max() / e.double().abs().max()).item()


def skipped_tiles(hidden, weight, bias, tokens, g, gh, threshold):
    """The fraction of dz tiles with an upstream gradient that the kernels' filter at
    ``threshold`` leaves unflagged: the dz kernel alone, over the whole vocabulary."""
    R, V = hidden.shape[0], weight.shape[0]
    _, c, ent = linear.fused_fwd(hidden, weight, bias, tokens, None, 1.0, True)
    tiles = kl.tile_set(hidden.dtype, hidden.device, kl.aligned_rows(hidden, weight))
    t = tiles["dz"]
    dz = torch.empty((R, V), dtype=hidden.dtype, device=hidden.device)
    counts = []
    for thr in (None, threshold):
        flags = torch.zeros((-(-R // t.block_m), -(-V // t.block_n)), dtype=torch.int8, device=hidden.device)
        kl.bwd_launches(
            hidden, weight, bias, tokens, c, g, ent, gh, 1.0, thr, dz, flags, 0, V, None, None, None, None, None, tiles
        )[0]()
        counts.append(int(flags.sum()))
    return 1.0 - counts[1] / counts[0]


def test_filtered_gradient_equals_the_float64_rule(fused):
    """fp32, threshold 2**-9 on a peaked head: the kernels drop exactly the tiles the float64
    reference's rule drops (same fraction) and give its filtered gradients."""
    hidden, weight, bias, tokens, _ = zipf_head(48, 16, 640, torch.float32)
    hidden, weight, bias, tokens = (t.to(DEVICE) for t in (hidden, weight, bias, tokens))
    ups = [_upstream((48,), 14).float(), 0.2 * _upstream((48,), 15).float()]
    ups[0][:16] = 0.0  # a row tile without log-prob gradient, its entropy gradient still flows
    h, w, b = _leaves(hidden, weight, bias)
    lp, ent = linear_token_logprobs(h, w, tokens, bias=b, return_entropy=True, grad_filter=2.0**-9)
    got = torch.autograd.grad([lp, ent], [h, w, b], ups)
    skipped = skipped_tiles(hidden, weight, bias, tokens, ups[0], ups[1], 2.0**-9)
    t = kl.tile_set(torch.float32, hidden.device)["dz"]
    exp, dropped = naive_linear_grads(
        hidden, weight, bias, tokens, ups[0], ups[1], tile=(t.block_m, t.block_n), threshold=2.0**-9
    )
    assert skipped == pytest.approx(dropped) and 0.2 < skipped < 0.95
    for name, a, e_ in zip(("hidden", "weight", "bias"), got, exp):
        _close(a, e_, TOLERANCE[torch.float32]["grad"], f"filtered grad {name}")


@pytest.mark.slow
def test_filtering_error_on_a_peaked_head(fused):
    """The kernels in the interpreter (16 x 32 dz tiles), bf16, R = 64, H = 32, V = 2,048,
    frequent ids first, the default threshold 2**-12 (figures in docs/layouts.md): filtering
    skips tiles and the error it adds stays below the bf16 rounding error the exact path
    already has against float64."""
    R, V = 64, 2048
    hidden, weight, bias, tokens, entropy = zipf_head(R, 32, V, torch.bfloat16)
    hidden, weight, bias, tokens = (t.to(DEVICE) for t in (hidden, weight, bias, tokens))
    ups = [_upstream((R,), 11).float(), 0.1 * _upstream((R,), 12).float()]
    grads = {}
    for filt in (False, True):
        h, w, b = _leaves(hidden, weight, bias)
        lp, ent = linear_token_logprobs(h, w, tokens, bias=b, return_entropy=True, grad_filter=filt)
        grads[filt] = torch.autograd.grad([lp, ent], [h, w, b], ups)
    ref, _ = naive_linear_grads(hidden, weight, bias, tokens, ups[0], ups[1])
    skipped = skipped_tiles(hidden, weight, bias, tokens, ups[0], ups[1], 2.0**-12)
    err = [_rel(a, x) for a, x in zip(grads[True], grads[False])]
    base = [_rel(a, x) for a, x in zip(grads[False], ref)]
    print(
        f"\ninterpreter, bf16, zipf head (mean entropy {entropy:.2f} nats): tiles skipped {skipped:.1%}; "
        f"filtered vs exact (hidden, weight, bias): "
        + ", ".join(f"{x:.1e}" for x in err)
        + "; exact vs float64: "
        + ", ".join(f"{x:.1e}" for x in base)
    )
    assert 1.0 < entropy < 3.0  # peaked, as a trained LM's next-token distribution
    assert skipped > 0.4
    assert 0 < max(err) < max(base)


@pytest.mark.parametrize("shuffle", [False, True], ids=["frequent_ids_first", "shuffled_ids"])
def test_filtering_rule_at_gpu_tiles(shuffle):
    """The rule in float64 at the GPU's dz tiles (16-bit, sm_90+: 128 x 64), R = 128, V = 32,768
    (docs/layouts.md gives R = 256, V = 151,936 from the same function): the tiles dropped and the
    relative gradient error they cause, below bf16's resolution (2**-8)."""
    dz = kl.GPU_TILES[(2, True, True)]["dz"]
    tile = (dz.block_m, dz.block_n)
    hidden, weight, bias, tokens, entropy = zipf_head(128, 32, 32_768, shuffle=shuffle)
    g = torch.Generator().manual_seed(16)
    ups = [torch.randn(128, generator=g, dtype=torch.float64), 0.1 * torch.randn(128, generator=g, dtype=torch.float64)]
    exact, _ = naive_linear_grads(hidden, weight, bias, tokens, *ups)
    filt, dropped = naive_linear_grads(hidden, weight, bias, tokens, *ups, tile=tile, threshold=2.0**-12)
    err = [_rel(a, e) for a, e in zip(filt, exact)]
    print(
        f"\nfloat64 rule, {tile[0]} x {tile[1]} tiles, V = 32,768, {'shuffled' if shuffle else 'frequent ids first'}: "
        f"entropy {entropy:.2f}, dropped {dropped:.1%}, error " + ", ".join(f"{x:.1e}" for x in err)
    )
    assert dropped > (0.5 if not shuffle else 0.05)
    assert 0 < max(err) < 2.0**-8


# ---------------------------------------------------------------- tensor parallel over gloo
N, T, V_TP, H_TP = 3, 5, 96, 24


def _tp_data(dtype):
    g = torch.Generator().manual_seed(13)
    hidden = torch.randn(N, T, H_TP, generator=g).to(dtype)
    weight = (torch.randn(V_TP, H_TP, generator=g) / H_TP**0.5 * 2).to(dtype)
    bias = (torch.randn(V_TP, generator=g) * 0.5).to(dtype)
    tokens = torch.randint(0, V_TP, (N, T), generator=g)
    valid = torch.rand(N, T, generator=g) > 0.3
    return hidden, weight, bias, tokens, valid


def _tp_worker(rank, world, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    code = 0
    try:
        _ops.CPU_BACKEND = "triton"
        linear.MIN_SPLIT_BLOCKS, linear.SPLIT_PROGRAMS, linear.MAX_SLICE_COLS = 1, 3, 32
        res = {}
        w = V_TP // world
        for dtype in (torch.float32, torch.bfloat16):
            hidden, weight, bias, tokens, valid = _tp_data(dtype)
            h = hidden.clone().requires_grad_(True)
            wt = weight[rank * w : (rank + 1) * w].clone().requires_grad_(True)
            b = bias[rank * w : (rank + 1) * w].clone().requires_grad_(True)
            lp, ent = linear_token_logprobs(
                h, wt, tokens, bias=b, temperature=0.7, valid=valid, return_entropy=True, vocab_group=dist.group.WORLD
            )
            ups = [torch.ones_like(lp), 0.5 * torch.ones_like(ent)]
            res[str(dtype)] = (
                lp.detach(),
                ent.detach(),
                torch.autograd.grad([lp, ent], [h, wt, b], ups),
                linear.uses_fused(h),
            )
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:  # noqa: BLE001 - report, then exit non-zero so mp.spawn fails the test
        traceback.print_exc()
        code = 1
    os._exit(code)


@pytest.mark.skipif(DEVICE == "cuda", reason="gloo CPU processes: the interpreter's run")
def test_vocab_parallel_over_gloo_equals_float64():
    world = 2
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_tp_worker, args=(world, d), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]
    w = V_TP // world
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight, bias, tokens, valid = _tp_data(dtype)
        h, wt, b = _leaves(hidden, weight, bias, dtype=torch.float64)
        lp, ent = naive_linear_token_outputs(h, wt, tokens, b, 0.7, valid, dtype=torch.float64)
        exp = torch.autograd.grad([lp, ent], [h, wt, b], [torch.ones_like(lp), 0.5 * torch.ones_like(ent)])
        tol = TOLERANCE[dtype]
        for r, res in enumerate(ranks):
            lp_r, ent_r, (gh, gw, gb), was_fused = res[str(dtype)]
            assert was_fused
            _close(lp_r, lp, tol["value"], f"logp rank {r} {dtype}")
            _close(ent_r, ent, tol["value"], f"entropy rank {r} {dtype}")
            _close(gh, exp[0], tol["grad"], f"grad hidden (all-reduced) rank {r} {dtype}")
            _close(gw, exp[1][r * w : (r + 1) * w], tol["grad"], f"grad weight shard {r} {dtype}")
            _close(gb, exp[2][r * w : (r + 1) * w], tol["grad"], f"grad bias shard {r} {dtype}")
