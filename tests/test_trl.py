"""TRL drop-in (gspo_kernels.integrations.trl): one loss step through FusedGRPOTrainer
and one through TRL's own GRPOTrainer give the same loss, parameter gradients and
entropy metric, with TRL's advantages, old/reference log-probs and aggregation.

The model is a tiny Llama built from a config with a word-level tokenizer built
in code (nothing downloaded), saved to a temporary directory because TRL builds
its reference model from a path. The fused op runs in the Triton interpreter."""

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from gspo_kernels.integrations.trl import FusedGRPOTrainer  # noqa: E402

# fp32 (bf16=False): same weights on both sides; the only difference is how the
# per-token log-probs are computed (TRL's chunked LM head vs the fused kernel),
# so the loss and gradients agree to fp32 accumulation error.
# bf16 autocast: the logits and their gradient are bf16 (8 mantissa bits, 0.4%
# per rounding); compared with the fp32 run, errors are relative to the largest
# gradient entry of each parameter.
TOLERANCE = {
    "fp32": {
        "loss": dict(rtol=1e-5, atol=1e-6),
        "grad": dict(rtol=1e-4, atol=1e-6),
        "metric": dict(rtol=1e-5, atol=1e-6),
    },
    "bf16": {"loss": dict(rtol=1e-2, atol=1e-3), "grad_rel_to_max": 2e-2},
}

WORDS = ["<pad>", "<eos>"] + [str(i) for i in range(10)] + list("abcdefghijklmnopqrstuvwxyz") + ["+"]  # V = 39, odd


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _reward(completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def _trainer(cls, model_dir, tmp_path, bf16=False, fused=None, **config):
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        temperature=0.7,
        save_strategy="no",
        logging_steps=1,
        bf16=bf16,
        **config,
    )
    ds = Dataset.from_dict({"prompt": ["a b c", "1 + 2", "x y", "d e f g"]})
    trainer = cls(model=model_dir, reward_funcs=_reward, args=args, train_dataset=ds, **(fused or {}))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def _inputs(trainer, seed):
    """A hand-made micro-batch in TRL's format: left-padded prompts, ragged
    completions (one of them empty), group-relative advantages, old log-probs
    off-policy enough that some sequences clip, and reference log-probs."""
    g = torch.Generator().manual_seed(seed)
    B, P, T, V = 4, 4, 6, len(WORDS)
    prompt_ids = torch.randint(2, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_ids[1, :2] = 0
    completion_ids = torch.randint(2, V, (B, T), generator=g)
    lengths = torch.tensor([6, 3, 0, 5])
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = 0
    inputs = dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        advantages=torch.tensor([1.2, -0.7, 0.3, -0.8]),
        num_items_in_batch=completion_mask.sum().float(),
    )
    with torch.no_grad():
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer,
            trainer.model,
            torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1),
            T,
        )
    inputs["old_per_token_logps"] = (logps + 0.3 * torch.randn(B, T, generator=g)) * completion_mask
    inputs["ref_per_token_logps"] = (logps + 0.2 * torch.randn(B, T, generator=g)) * completion_mask
    return inputs


def _assert_same_step(loss, grads, loss_ref, grads_ref, tol):
    """The loss and every parameter's gradient within ``tol`` (a TOLERANCE row) of TRL's."""
    torch.testing.assert_close(loss, loss_ref, **tol["loss"])
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], **tol["grad"], msg=lambda m: f"{name}: {m}")


def _step(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, trainer._metrics["train"]["entropy"][-1]


# (level, loss_type, beta): GSPO as the GSPO paper sets it up ("sequence", "grpo"),
# token-level GRPO with TRL's per-sequence, token-sum (dapo) and batch (bnpo) aggregations,
# with and without the KL term.
CASES = [
    ("sequence", "grpo", 0.04),
    ("sequence", "grpo", 0.0),
    ("token", "grpo", 0.04),
    ("token", "dapo", 0.0),
    ("token", "bnpo", 0.04),
]


# The drop-in's two log-prob sources: hidden states + LM head, chunked (the default for
# this plain Llama head), and the model's own logits, with and without in-place backward.
SOURCES = [
    dict(logprob_source="hidden"),
    dict(logprob_source="logits"),
    dict(logprob_source="logits", inplace_backward=False),
]


@pytest.mark.parametrize("fused", SOURCES, ids=["hidden", "logits_inplace", "logits"])
@pytest.mark.parametrize("level,loss_type,beta", CASES)
def test_same_loss_and_gradients_as_trl(model_dir, tmp_path, level, loss_type, beta, fused):
    cfg = dict(importance_sampling_level=level, loss_type=loss_type, beta=beta, epsilon=0.1)
    ours = _trainer(FusedGRPOTrainer, model_dir, tmp_path / "ours", fused=fused, **cfg)
    assert ours._gspo_source == fused["logprob_source"]
    theirs = _trainer(GRPOTrainer, model_dir, tmp_path / "theirs", **cfg)
    inputs = _inputs(theirs, seed=hash((level, loss_type, beta)) % 2**31)
    loss_ref, grads_ref, ent_ref = _step(theirs, inputs)
    loss, grads, ent = _step(ours, inputs)
    tol = TOLERANCE["fp32"]
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    _assert_same_step(loss, grads, loss_ref, grads_ref, tol)
    assert abs(ent - ent_ref) <= tol["metric"]["atol"] + tol["metric"]["rtol"] * abs(ent_ref)
    assert grads_ref["lm_head.weight"].abs().max() > 1e-4  # the comparison is not between zeros


@pytest.mark.parametrize("source", ["hidden", "logits"])
def test_bf16_autocast_close_to_fp32(model_dir, tmp_path, source):
    """TRL's default on this machine is bf16 autocast: the drop-in then sees bf16 logits."""
    cfg = dict(importance_sampling_level="sequence", loss_type="grpo", beta=0.04, epsilon=0.1)
    ours = _trainer(FusedGRPOTrainer, model_dir, tmp_path / "ours", bf16=True, fused=dict(logprob_source=source), **cfg)
    theirs = _trainer(GRPOTrainer, model_dir, tmp_path / "theirs", **cfg)
    inputs = _inputs(theirs, seed=3)
    loss_ref, grads_ref, _ = _step(theirs, inputs)
    loss, grads, _ = _step(ours, inputs)
    tol = TOLERANCE["bf16"]
    torch.testing.assert_close(loss, loss_ref, **tol["loss"])
    for name in grads_ref:
        scale = grads_ref[name].abs().max()
        err = (grads[name] - grads_ref[name]).abs().max()
        assert err <= tol["grad_rel_to_max"] * scale, (name, err.item(), scale.item())


@pytest.mark.parametrize("source", ["hidden", "logits"])
def test_never_builds_a_log_softmax(model_dir, tmp_path, monkeypatch, source):
    """With every log-softmax route (and TRL's own chunked LM head) disabled, the
    drop-in still computes its loss and gradient; TRL's own trainer cannot."""
    import trl.trainer.utils as trl_utils

    cfg = dict(importance_sampling_level="sequence", loss_type="grpo", beta=0.04)
    ours = _trainer(FusedGRPOTrainer, model_dir, tmp_path / "ours", fused=dict(logprob_source=source), **cfg)
    theirs = _trainer(GRPOTrainer, model_dir, tmp_path / "theirs", **cfg)
    inputs = _inputs(theirs, seed=1)

    def forbidden(*args, **kwargs):
        raise AssertionError("a (..., V) log-softmax was built")

    monkeypatch.setattr(torch, "log_softmax", forbidden)
    monkeypatch.setattr(torch.nn.functional, "log_softmax", forbidden)
    monkeypatch.setattr(torch.Tensor, "log_softmax", forbidden)
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", forbidden)
    if hasattr(trl_utils, "selective_log_softmax"):
        monkeypatch.setattr(trl_utils, "selective_log_softmax", forbidden)
    with pytest.raises(AssertionError, match="log-softmax was built"):
        theirs._compute_loss(theirs.model, inputs)
    loss, grads, _ = _step(ours, inputs)
    assert grads["lm_head.weight"].abs().max() > 1e-4


def test_one_training_step_end_to_end(model_dir, tmp_path):
    """Generation, TRL's rewards and advantages, old/ref log-probs through the drop-in, an optimizer step."""
    trainer = _trainer(
        FusedGRPOTrainer,
        model_dir,
        tmp_path,
        bf16=True,
        importance_sampling_level="sequence",
        loss_type="grpo",
        beta=0.04,
        max_steps=1,
        learning_rate=1e-2,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer._gspo_source == "hidden"  # "auto" picks the chunked hidden-state path for a plain head
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)
    logged = trainer.state.log_history[0]
    assert "entropy" in logged and logged["entropy"] > 0 and "kl" in logged


# Entropy options: the bonus (its gradient flows through the fused op's entropy
# output), the high-entropy token mask, adaptive entropy; both sources.
ENTROPY_CASES = [
    dict(entropy_coef=0.05),
    dict(top_entropy_quantile=0.5),
    dict(entropy_coef=0.05, top_entropy_quantile=0.6),
]


@pytest.mark.parametrize("source", ["hidden", "logits"])
@pytest.mark.parametrize("opts", ENTROPY_CASES, ids=["bonus", "top_quantile", "bonus_and_quantile"])
def test_entropy_options_match_trl(model_dir, tmp_path, source, opts):
    cfg = dict(importance_sampling_level="sequence", loss_type="grpo", beta=0.04, epsilon=0.1, **opts)
    ours = _trainer(FusedGRPOTrainer, model_dir, tmp_path / "ours", fused=dict(logprob_source=source), **cfg)
    theirs = _trainer(GRPOTrainer, model_dir, tmp_path / "theirs", **cfg)
    inputs = _inputs(theirs, seed=7)
    loss_ref, grads_ref, ent_ref = _step(theirs, inputs)
    loss, grads, ent = _step(ours, inputs)
    tol = TOLERANCE["fp32"]
    _assert_same_step(loss, grads, loss_ref, grads_ref, tol)
    assert abs(ent - ent_ref) <= tol["metric"]["atol"] + tol["metric"]["rtol"] * abs(ent_ref)
    if "entropy_coef" in opts:  # the bonus really moved the gradient
        plain = _trainer(GRPOTrainer, model_dir, tmp_path / "plain", **{**cfg, "entropy_coef": 0.0})
        _, grads_plain, _ = _step(plain, inputs)
        assert (grads_plain["lm_head.weight"] - grads_ref["lm_head.weight"]).abs().max() > 1e-6


def test_unknown_source_and_transformed_head_are_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match="logprob_source must be one of"):
        _trainer(FusedGRPOTrainer, model_dir, tmp_path, fused=dict(logprob_source="hiddn"))
    trainer = _trainer(FusedGRPOTrainer, model_dir, tmp_path / "a")
    trainer.model.config.final_logit_softcapping = 30.0  # a soft-capped head: logits are not hidden @ W.T
    with pytest.raises(ValueError, match="plain linear LM head"):
        FusedGRPOTrainer(
            model=trainer.model,
            reward_funcs=_reward,
            args=trainer.args,
            train_dataset=trainer.train_dataset,
            logprob_source="hidden",
        )
    auto = FusedGRPOTrainer(
        model=trainer.model, reward_funcs=_reward, args=trainer.args, train_dataset=trainer.train_dataset
    )
    assert auto._gspo_source == "logits"


def test_multimodal_inputs_are_refused(model_dir, tmp_path):
    trainer = _trainer(FusedGRPOTrainer, model_dir, tmp_path)
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="pixel_values"):
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, ids, 3, pixel_values=torch.zeros(2, 3))


# Every TRL loss_type at both importance-sampling levels through the drop-in's loss
# (gspo_kernels.policy_loss), with two-sided clipping, the off-policy mask and the vLLM
# importance-sampling ratio switched on, under gradient accumulation (TRL scales the
# per-call loss by the accumulation steps, or by the generation batch's token count).
ALL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ALL_LOSS_TYPES)
def test_every_loss_type_through_policy_loss(model_dir, tmp_path, loss_type, level):
    cfg = dict(
        importance_sampling_level=level,
        loss_type=loss_type,
        beta=0.04,
        epsilon=0.1,
        off_policy_mask_threshold=0.2,
        vllm_importance_sampling_mode="token_truncate",
        **({"delta": 1.5} if loss_type not in ("cispo", "sapo", "vespo") else {}),
    )
    ours = _trainer(FusedGRPOTrainer, model_dir, tmp_path / "ours", **cfg)
    theirs = _trainer(GRPOTrainer, model_dir, tmp_path / "theirs", **cfg)
    inputs = _inputs(theirs, seed=ALL_LOSS_TYPES.index(loss_type) + 17 * (level == "token"))
    g = torch.Generator().manual_seed(5)
    mask = inputs["completion_mask"]
    inputs["sampling_per_token_logps"] = (
        inputs["old_per_token_logps"] + 0.3 * torch.randn(mask.shape, generator=g)
    ) * mask
    inputs["importance_sampling_ratio"] = torch.exp(
        (inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"]) * mask
    ).clamp(max=1.4)
    for t in (ours, theirs):
        t.use_vllm, t.vllm_importance_sampling_correction = True, True  # as a vLLM run would set them
        t.current_gradient_accumulation_steps = 2
    loss_ref, grads_ref, ent_ref = _step(theirs, inputs)
    loss, grads, ent = _step(ours, inputs)
    tol = TOLERANCE["fp32"]
    _assert_same_step(loss, grads, loss_ref, grads_ref, tol)
    for name, values in theirs._metrics["train"].items():  # TRL's logged metrics, same names and values
        assert name in ours._metrics["train"], name
        got, want = ours._metrics["train"][name][-1], values[-1]
        assert abs(got - want) <= tol["metric"]["atol"] + tol["metric"]["rtol"] * abs(want), (name, got, want)
    assert grads_ref["lm_head.weight"].abs().max() > 1e-5
