"""Every ```python block of README.md runs, as a doctest of the README.

How a block is run (one mechanism for all of them):

1. Each ```python block is cut out of README.md in order and becomes one test
   (its id: the nearest heading and the block's first line number).
2. It runs with ``exec`` in a fresh namespace built by :func:`_prelude`: tiny
   stand-ins for every name the blocks use without defining them (a causal LM
   with random weights as ``model``/``policy``, its frozen perturbed copy as
   ``ref_model``, ``input_ids``, ``P``, ``B, G, T, V``, ``completion_ids``,
   ``completion_mask``, ``rewards``, ``advantages``, ``old_logp``,
   ``ref_logp``, ``sampling_logp``, ``logits``, ``hidden``, ``lm_head``, a
   reward function and a dataset for TRL, ...). For blocks that pass
   ``vocab_group=``, a single-process gloo group stands in for the tensor
   parallel group (``mpu.get_tensor_model_parallel_group()``, world size 1).
3. Before it runs, the exact strings in :data:`REWRITES` are replaced: the
   README's real shapes (``B, G, T, V = 2, 8, 1024, 151_936``) by the
   prelude's tiny ones, and the TRL config by the same config plus a one-step
   CPU run. Every rewrite must match somewhere (:func:`test_every_rewrite_applies`),
   so the README and this file cannot drift apart silently.

A block fails its test if it raises (or leaves a non-finite ``loss``, or a
``trainer`` that did not take its step). ```bash and ```text blocks are not
run (install commands, formulas); an example that could not run here would
be fenced ```text with the reason, never left as an unchecked ```python
block. The Triton kernels run in the CPU interpreter (tests/conftest.py);
every shape here is tiny.

Beside the blocks, the README's "Every option" table is checked against
``LossOptions``: every field listed, with the default the code has.
"""
from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

import gspo_kernels

pytest.importorskip("trl")  # the prelude's model, tokenizer and dataset: the [trl] extra (transformers, datasets)

README = Path(__file__).resolve().parents[1] / "README.md"

# the prelude's tiny shapes: (B, G) groups of completions of T tokens after a P-token prompt;
# V is the word-level vocabulary of the tiny model below, H its hidden width
B, G, T, V, P, H = 2, 4, 6, 39, 3, 16
WORDS = ["<pad>", "<eos>"] + [str(i) for i in range(10)] + list("abcdefghijklmnopqrstuvwxyz") + ["+"]
assert len(WORDS) == V

# README text -> what runs instead (exact substrings; each must occur in some block)
REWRITES = {
    "B, G, T, V = 2, 8, 1024, 151_936": "B, G, T, V = B, G, T, V  # the prelude's tiny shapes",
    "GRPOConfig(": "one_step_on_cpu(GRPOConfig)(",
}
# the settings a one-step CPU run adds to (or overrides in) any GRPOConfig of the README
ONE_STEP = dict(max_steps=1, use_cpu=True, report_to=[], bf16=False, save_strategy="no", logging_steps=1,
                per_device_train_batch_size=4, num_generations=4, max_completion_length=4)


def _blocks():
    """``(id, source)`` of every ```python block, in README order."""
    text = README.read_text()
    out, heading = [], "top"
    fence = re.compile(r"^```(\S*)\n(.*?)^```\s*$", re.M | re.S)
    pos = 0
    for m in fence.finditer(text):
        for h in re.findall(r"^#{2,4} (.+)$", text[pos:m.start()], re.M):
            heading = h
        pos = m.end()
        if m.group(1) == "python":
            line = text.count("\n", 0, m.start()) + 1
            slug = re.sub(r"[^a-z0-9]+", "_", heading.lower()).strip("_")
            out.append((f"{slug}-L{line}", "\n" * line + m.group(2)))   # README's line numbers in tracebacks
    return out


BLOCKS = _blocks()


def _rewrite(src: str) -> str:
    for old, new in REWRITES.items():
        src = src.replace(old, new)
    return src


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama (random weights) and a word-level tokenizer built in code, saved once:
    TRL loads the tokenizer from the model's directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                      bos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture
def vocab_group(tmp_path):
    """A single-process gloo group (world size 1): the tensor-parallel group of the README's
    vocab-parallel blocks, whose shard is then the whole vocabulary."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _one_step_on_cpu(output_dir):
    def wrap(config_cls):
        def make(**kwargs):
            return config_cls(**{**kwargs, **ONE_STEP, "output_dir": output_dir})
        return make
    return wrap


def _prelude(model_dir: str, tmp_path: Path, group=None) -> dict:
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    policy = LlamaForCausalLM.from_pretrained(model_dir)
    ref_model = LlamaForCausalLM.from_pretrained(model_dir).requires_grad_(False)
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(2, V, (B * G, P), generator=g)
    completion_ids = torch.randint(2, V, (B, G, T), generator=g)
    lengths = torch.tensor([[T, 3, 0, 5], [T, T - 1, 1, 4]])          # ragged, one empty completion
    completion_mask = torch.arange(T) < lengths.unsqueeze(-1)
    input_ids = torch.cat([prompt_ids, completion_ids.view(B * G, T)], dim=1)   # (B*G, P+T)
    rewards = torch.randn(B, G, generator=g)
    advantages = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-4)
    with torch.no_grad():
        lp = gspo_kernels.token_logprobs(policy(input_ids).logits[:, P - 1:-1].view(B, G, T, V), completion_ids)
        ref_logp = gspo_kernels.token_logprobs(ref_model(input_ids).logits[:, P - 1:-1].view(B, G, T, V),
                                               completion_ids)
        old_logp = lp + 0.1 * torch.randn(B, G, T, generator=g)
        sampling_logp = old_logp + 0.1 * torch.randn(B, G, T, generator=g)
    logits = policy(input_ids).logits[:, P - 1:-1].view(B, G, T, V)
    hidden = policy.model(input_ids).last_hidden_state[:, P - 1:-1].reshape(B, G, T, H)
    with torch.no_grad():
        ref_hidden = ref_model.model(input_ids).last_hidden_state[:, P - 1:-1].reshape(B, G, T, H)

    def reward_fn(completions, **kwargs):  # TRL reward function: digits in the completion
        return [float(sum(ch.isdigit() for ch in c)) for c in completions]

    ns = dict(
        torch=torch, gspo_kernels=gspo_kernels, B=B, G=G, T=T, V=V, P=P,
        model=policy, policy=policy, ref_model=ref_model, input_ids=input_ids,
        completion_ids=completion_ids, completion_mask=completion_mask, tokens=completion_ids,
        labels=completion_ids, mask=completion_mask, rewards=rewards, advantages=advantages,
        old_logp=old_logp, old=old_logp, ref_logp=ref_logp, sampling_logp=sampling_logp, temperature=0.9,
        logits=logits, hidden=hidden, lm_head=policy.lm_head, ref_hidden=ref_hidden,
        ref_lm_head=ref_model.lm_head, reward_fn=reward_fn,
        ds=Dataset.from_dict({"prompt": ["a b c", "1 + 2", "x y", "d e f g"]}),
        one_step_on_cpu=_one_step_on_cpu(str(tmp_path / "trl_run")),
    )
    if group is not None:
        ns["mpu"] = types.SimpleNamespace(get_tensor_model_parallel_group=lambda: group)
        ns["lm_head_shard"] = policy.lm_head   # world size 1: this rank's rows are all of them
    return ns


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 8, [b[0] for b in BLOCKS]


def test_every_rewrite_applies():
    for old in REWRITES:
        assert any(old in src for _, src in BLOCKS), f"REWRITES entry {old!r} matches no README block"


def test_option_table_lists_every_option_with_its_default():
    """README's "Every option" table: one row per LossOptions field (several per row allowed),
    its default as the code has it."""
    import dataclasses

    text = README.read_text()
    section = text[text.index("### Every option"):]
    section = section[:section.index("\n\n", section.index("| option |"))]
    documented = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z_]+)`", cells[0])
        defaults = re.findall(r"`([^`]+)`", cells[1])[:len(names)]
        documented.update(zip(names, defaults))
    for field in dataclasses.fields(gspo_kernels.LossOptions):
        want = f'"{field.default}"' if isinstance(field.default, str) else str(field.default)
        assert documented.get(field.name) == want, (field.name, documented.get(field.name), want)
    assert set(documented) == {f.name for f in dataclasses.fields(gspo_kernels.LossOptions)}


@pytest.mark.parametrize("src", [b[1] for b in BLOCKS], ids=[b[0] for b in BLOCKS])
def test_readme_block_runs(src, model_dir, tmp_path, request):
    group = request.getfixturevalue("vocab_group") if "vocab_group" in src else None
    ns = _prelude(model_dir, tmp_path, group)
    code = compile(_rewrite(src), str(README), "exec")
    exec(code, ns)
    # what the blocks leave behind is what they promise: a finite loss, a trainer that took its step
    if isinstance(ns.get("loss"), torch.Tensor):
        assert torch.isfinite(ns["loss"]).all(), ns["loss"]
    if "trainer" in ns:
        assert ns["trainer"].state.global_step == ONE_STEP["max_steps"]
