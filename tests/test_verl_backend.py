"""verl's fused-kernels backend ``impl_backend=gspo_kernels`` (gspo_kernels.integrations.verl) against
verl 0.9.1's own ``torch`` backend and against float64 references, on tiny random models built from a
config: the model's forward (padded and remove-padding), then verl's FSDP engine step (the actor's
``compute_log_prob`` and ``update_policy`` layer) with its ``ppo_loss``."""

import copy
import importlib

import pytest
import torch

# The verl adapter's tests need verl itself (the `verl` extra; CI installs it): skipped without it.
verl = pytest.importorskip("verl")

from conftest import TOLERANCE
from test_linear import TOLERANCE as LINEAR_TOLERANCE
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
from verl.models.transformers.monkey_patch import apply_monkey_patch

import gspo_kernels.integrations.verl as gv

V, H = 97, 32
HEAD_GRAD_TOLERANCE = {dt: LINEAR_TOLERANCE[dt]["grad"] for dt in (torch.float32, torch.bfloat16)}
SHAPES = {
    "qwen2": lambda: Qwen2Config(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    ),
    "llama": lambda: LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
}


@pytest.fixture(autouse=True)
def _restore_forwards():
    """verl's apply_monkey_patch replaces the model *class*'s forward: put it back for other tests."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    saved = {cls: cls.forward for cls in (LlamaForCausalLM, Qwen2ForCausalLM)}
    yield
    for cls, fwd in saved.items():
        cls.forward = fwd


def models(shape: str, dtype: torch.dtype, remove_padding: bool, seed: int = 0):
    """The same random model twice: ``(verl's torch backend, this backend)``."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(SHAPES[shape](), attn_implementation="eager").to(dtype)
    pair = []
    for backend in ("torch", gv.BACKEND):
        m = copy.deepcopy(base)
        apply_monkey_patch(m, use_remove_padding=remove_padding, use_fused_kernels=True, fused_kernels_backend=backend)
        pair.append(m)
    return pair


# Sequence lengths: one of length 1; rows are left-aligned (verl packs the valid tokens of each).
LENGTHS = (6, 1, 4)


def inputs(remove_padding: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if remove_padding:  # one packed row, position_ids restart at each sequence
        total = sum(LENGTHS)
        ids = torch.randint(0, V, (1, total), generator=g)
        pos = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
        return {"input_ids": ids, "attention_mask": None, "position_ids": pos}
    T = max(LENGTHS)
    ids = torch.randint(0, V, (len(LENGTHS), T), generator=g)
    mask = (torch.arange(T) < torch.tensor(LENGTHS)[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def run(model, kw, temperature, seed: int = 2):
    """log_probs, entropy and the gradients of every parameter for a random upstream gradient (zero on
    padding and on one sequence: an empty response)."""
    model.zero_grad(set_to_none=True)
    out = model(**kw, temperature=temperature, return_dict=True, use_cache=False)
    g = torch.Generator().manual_seed(seed)
    w_lp, w_ent = torch.randn(out.log_probs.shape, generator=g), torch.randn(out.entropy.shape, generator=g)
    keep = torch.ones_like(w_lp, dtype=torch.bool) if kw["attention_mask"] is None else kw["attention_mask"].bool()
    if kw["attention_mask"] is None:
        keep[:, LENGTHS[0] : LENGTHS[0] + LENGTHS[1]] = False  # the second sequence: empty response
    else:
        keep[1] = False
    loss = (torch.where(keep, w_lp, 0) * out.log_probs.float()).sum() + (
        torch.where(keep, w_ent, 0) * out.entropy.float()
    ).sum()
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.log_probs.detach(), out.entropy.detach().float(), grads


def close_normwise(actual, expected, rtol, name):
    """``|a - e| <= rtol * (|e| + max|e|)``: a whole-model parameter gradient entry is a sum over tokens
    and layers with cancellation, so its rounding error scales with the tensor's size, not the entry's."""
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()), msg=lambda m: f"{name}: {m}"
    )


def reference(model, kw, temperature):
    """float64 head on the model's own last hidden states: (log_probs, entropy) from materialised logits."""
    with torch.no_grad():
        h = model.model(
            input_ids=kw["input_ids"],
            attention_mask=kw["attention_mask"],
            position_ids=kw["position_ids"],
            use_cache=False,
        )[0]
    logits = (h.double() @ model.lm_head.weight.double().t()) / temperature
    lp = logits.log_softmax(-1)
    labels = torch.roll(kw["input_ids"], -1, -1)
    return lp.gather(-1, labels[..., None])[..., 0], -(lp.exp() * lp).sum(-1), logits, labels


@pytest.mark.parametrize("remove_padding", [False, True], ids=["padded", "rmpad"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_fp32_equals_verl_torch_backend(shape, remove_padding):
    """fp32: log_probs, entropy and every parameter's gradient equal verl's torch backend's; values equal
    float64 and verl's logprobs_from_logits / entropy_from_logits on the materialised logits."""
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    ref_model, ours = models(shape, torch.float32, remove_padding)
    kw, tau = inputs(remove_padding), 0.7
    lp_v, ent_v, g_v = run(ref_model, kw, tau)
    lp, ent, g = run(ours, kw, tau)
    tol, gtol = TOLERANCE[torch.float32]["value"], TOLERANCE[torch.float32]["grad"]
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == kw["input_ids"].shape
    torch.testing.assert_close(lp, lp_v, **tol)
    torch.testing.assert_close(ent, ent_v, **tol)
    assert g.keys() == g_v.keys() and len(g) == len(list(ours.parameters()))
    for name in g:
        close_normwise(g[name], g_v[name], gtol["rtol"], name)
    lp64, ent64, logits, labels = reference(ours, kw, tau)
    torch.testing.assert_close(lp.double(), lp64, **tol)
    torch.testing.assert_close(ent.double(), ent64, **tol)
    torch.testing.assert_close(lp, logprobs_from_logits(logits.float(), labels), **tol)
    torch.testing.assert_close(ent, entropy_from_logits(logits.float()), **tol)


@pytest.mark.parametrize("remove_padding", [False, True], ids=["padded", "rmpad"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bf16_against_float64_and_verl(shape, remove_padding):
    """bf16: values equal the float64 head on the same hidden states (TOLERANCE); verl's torch backend
    rounds its logits to bf16 first, so it is at least as far from float64 as this backend, everywhere."""
    ref_model, ours = models(shape, torch.bfloat16, remove_padding)
    kw, tau = inputs(remove_padding), 1.3
    lp_v, ent_v, g_v = run(ref_model, kw, tau)
    lp, ent, g = run(ours, kw, tau)
    lp64, ent64, _, _ = reference(ours, kw, tau)
    tol = TOLERANCE[torch.bfloat16]["value"]
    torch.testing.assert_close(lp.double(), lp64, **tol)
    torch.testing.assert_close(ent.double(), ent64, **tol)
    # verl's own error bounds the distance between the two backends
    bound = (lp_v.double() - lp64).abs() + tol["atol"] + tol["rtol"] * lp64.abs()
    assert ((lp.double() - lp_v.double()).abs() <= bound).all()
    bound = (ent_v.double() - ent64).abs() + 2.0**-8 * ent64.abs() + tol["atol"]  # verl's entropy is bf16
    assert ((ent.double() - ent_v.double()).abs() <= bound).all()
    assert g.keys() == g_v.keys()
    for name in g:  # verl rounds its logits to bf16, this backend keeps fp32 ones; bf16 backbone: seen 2.0e-2
        close_normwise(g[name], g_v[name], 2.0**-5, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_head_gradients_against_float64(dtype):
    """The head's gradients (hidden states, LM head) against float64 autograd, with temperature, a
    sequence of length 1 and rows with zero upstream gradient (an empty response)."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 11, H, generator=g).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(V, H, generator=g)).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (1, 11), generator=g)
    up_lp, up_ent = torch.randn(1, 11, generator=g), torch.randn(1, 11, generator=g)
    up_lp[0, 3:5] = 0
    up_ent[0, 3:5] = 0
    lp, ent = gv.FusedLinearForPPO(impl_backend=gv.BACKEND)(hidden, weight, ids, temperature=0.6)
    (lp * up_lp + ent * up_ent).sum().backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    z = (h64 @ w64.t()) / 0.6
    l64 = z.log_softmax(-1)
    lp64, ent64 = l64.gather(-1, ids[..., None])[..., 0], -(l64.exp() * l64).sum(-1)
    (lp64 * up_lp.double() + ent64 * up_ent.double()).sum().backward()
    tol = TOLERANCE[dtype]["value"]
    torch.testing.assert_close(lp.double(), lp64.detach(), **tol)
    torch.testing.assert_close(ent.double(), ent64.detach(), **tol)
    # gradients: a sum over V of per-logit terms written in the dtype, so normwise (tests/test_linear.py's table)
    rel = HEAD_GRAD_TOLERANCE[dtype]
    close_normwise(hidden.grad.double(), h64.grad, rel, "grad hidden")
    close_normwise(weight.grad.double(), w64.grad, rel, "grad weight")


def test_deterministic_run_to_run():
    """Bitwise the same log-probs, entropies and parameter gradients on a second run."""
    _, ours = models("qwen2", torch.bfloat16, True)
    kw = inputs(True)
    a, b = run(ours, kw, 0.9), run(ours, kw, 0.9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a[2][n], b[2][n]) for n in a[2])


def test_other_backends_untouched_and_refusals(monkeypatch):
    """verl's own choices still work and are verl's; bad input and unsupported heads are refused by name."""
    assert gv.FusedLinearForPPO(impl_backend="torch").impl_backend == "torch"
    with pytest.raises(ValueError, match="Unsupported FusedLinearForPPO backend"):
        gv.FusedLinearForPPO(impl_backend="nope")
    cfg = SHAPES["qwen2"]()
    cfg.final_logit_softcapping = 30.0
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        apply_monkey_patch(model, use_remove_padding=True, use_fused_kernels=True, fused_kernels_backend=gv.BACKEND)
    with pytest.raises(ValueError, match="temperature must be one number"):
        gv.head_logprobs(torch.randn(2, 3, H), torch.randn(V, H), torch.zeros(2, 3, dtype=torch.long), torch.ones(2))
    with pytest.raises(TypeError, match="vocab_weights must have hidden_states' dtype"):
        gv.head_logprobs(
            torch.randn(2, 3, H), torch.randn(V, H, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.long)
        )
    monkeypatch.setattr(verl, "__version__", "0.8.0")
    try:
        with pytest.raises(ImportError, match=r"supports verl 0\.9\.1.*found verl 0\.8\.0"):
            importlib.reload(gv)
    finally:
        monkeypatch.undo()
        importlib.reload(gv)


# ---- verl's actor step, one process -----------------------------------------------------------------
# verl 0.9.1's actor runs through its engine (engine_workers -> FSDPEngineWithLMHead), which it builds
# only on CUDA/NPU: EngineRegistry registers the FSDP engine for devices "cuda" and "npu", its
# initialize() wraps the model in FSDP over a device mesh, and verl's platform layer falls back to CUDA
# on a CPU-only machine (get_device_id() calls torch.cuda.current_device()). The deepest layer that runs
# on a CPU is the engine's own forward_backward_batch (micro-batching, packing, prepare_model_inputs,
# the patched forward, prepare_model_outputs, verl's ppo_loss, backward), on an unwrapped model with
# the device lookups pointed at the CPU: that is what compute_log_prob (forward_only) and
# update_policy (loss + backward; the optimizer step is plain torch) call per mini-batch.


@pytest.fixture
def cpu_engine(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import torch.distributed as dist
    import verl.workers.engine.fsdp.transformer_impl as impl

    monkeypatch.setattr(impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(impl, "get_device_name", lambda: "cpu")

    class Engine(impl.FSDPEngineWithLMHead):
        def __init__(self, module):  # what forward_backward_batch reads of an initialised engine, no FSDP
            self.module, self.scaler, self._autocast_dtype = module, None, torch.float32
            self.use_ulysses_sp, self.ulysses_sequence_parallel_size, self.ulysses_device_mesh = False, 1, None
            self.pad_to_length = False
            self.engine_config = SimpleNamespace(use_no_sync_for_gradient_accumulation=False)

    own = not dist.is_initialized()
    if own:  # the engine all-reduces the token count over the data-parallel group
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield Engine
    if own:
        dist.destroy_process_group()


def actor_batch(remove_padding: bool, B: int = 4, P: int = 3, R: int = 5):
    """A rollout batch as verl's trainer hands it to the actor (left-padded prompts, right-padded
    responses, one empty response), converted by verl's own left_right_2_no_padding."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(5)
    plen, rlen = torch.tensor([3, 2, 3, 1]), torch.tensor([5, 1, 0, 3])
    prompts, responses = torch.randint(0, V, (B, P), generator=g), torch.randint(0, V, (B, R), generator=g)
    rmask = torch.arange(R)[None] < rlen[:, None]
    attn = torch.cat([torch.arange(P)[None] >= (P - plen)[:, None], rmask], 1).long()
    data = TensorDict(
        {
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": attn,
            "position_ids": (attn.cumsum(-1) - 1).clamp(min=0),
            "response_mask": rmask.float(),
            "old_log_probs": -torch.rand(B, R, generator=g) * 3,
            "advantages": torch.randn(B, R, generator=g),
        },
        batch_size=[B],
    )
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(
        data,
        temperature=0.8,
        use_remove_padding=remove_padding,
        use_fused_kernels=True,
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=2,
        calculate_entropy=True,
        global_batch_size=B,
    )
    return data


@pytest.mark.parametrize("remove_padding", [True, False], ids=["rmpad", "padded"])
@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo"])
def test_actor_step_equals_verl_torch_backend(cpu_engine, loss_mode, remove_padding):
    """compute_log_prob's and update_policy's engine calls: log-probs, entropies, loss, every metric and
    every parameter gradient equal with impl_backend torch and gspo_kernels (fp32, two micro-batches)."""
    import functools

    from verl.workers.config import FSDPActorConfig
    from verl.workers.utils.losses import ppo_loss

    results = []
    for model in models("qwen2", torch.float32, remove_padding):
        engine = cpu_engine(model)
        with torch.no_grad():
            inferred = engine.forward_backward_batch(actor_batch(remove_padding), loss_function=None, forward_only=True)
        config = FSDPActorConfig(
            strategy="fsdp",
            ppo_mini_batch_size=4,
            ppo_micro_batch_size_per_gpu=2,
            use_dynamic_bsz=False,
            rollout_n=1,
            entropy_coeff=0.01,
            policy_loss={"loss_mode": loss_mode},
            clip_ratio_low=0.2,
            clip_ratio_high=0.28,
            loss_agg_mode="seq-mean-token-mean" if loss_mode == "gspo" else "token-mean",
        )
        model.zero_grad(set_to_none=True)
        trained = engine.forward_backward_batch(
            actor_batch(remove_padding), forward_only=False, loss_function=functools.partial(ppo_loss, config)
        )
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((inferred["model_output"], trained, grads))
    (out_v, step_v, g_v), (out, step, g) = results
    tol = TOLERANCE[torch.float32]["value"]
    for key in ("log_probs", "entropy"):
        torch.testing.assert_close(out[key].values(), out_v[key].values(), **tol)
    torch.testing.assert_close(torch.tensor(step["loss"]), torch.tensor(step_v["loss"]), **tol)
    assert step["metrics"].keys() == step_v["metrics"].keys() and "actor/pg_loss" in step["metrics"]
    for key, metric in step["metrics"].items():
        torch.testing.assert_close(
            torch.tensor(metric.values, dtype=torch.float64),
            torch.tensor(step_v["metrics"][key].values, dtype=torch.float64),
            **tol,
            msg=lambda m, key=key: f"{key}: {m}",
        )
    for name in g:
        close_normwise(g[name], g_v[name], TOLERANCE[torch.float32]["grad"]["rtol"], name)


@pytest.mark.slow
def test_benchmark_dry_run(tmp_path):
    """benchmarks/verl_step.py's CPU rehearsal writes one row per (backend, micro-batch)."""
    import csv

    from benchmarks import verl_step

    out = tmp_path / "verl_step.csv"
    assert verl_step.main(["--dry-run", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["backend"], r["micro_batch"], r["status"][:7]) for r in rows] == [
        ("torch", "1", "ok"),
        ("torch", "2", "ok"),
        ("triton", "1", "skipped"),
        ("gspo_kernels", "1", "ok"),
        ("gspo_kernels", "2", "ok"),
    ]
    assert all(float(r["ms_median"]) > 0 for r in rows if r["status"] == "ok")
