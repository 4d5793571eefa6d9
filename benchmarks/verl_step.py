"""verl's actor micro-batch step per ``fused_kernel_options.impl_backend``: time, peak memory, largest micro-batch.

    python -m benchmarks.verl_step                      # CUDA: Qwen2 ~0.5B and ~1.5B shapes, response 1,024
    python -m benchmarks.verl_step --dry-run            # CPU rehearsal: a tiny config, a few seconds

Backends: ``torch`` and ``triton`` (verl 0.9.1's own: ``FusedLinearForPPO``'s chunked PyTorch head,
``verl/utils/kernel/linear_cross_entropy.py``) and ``gspo_kernels``
(``gspo_kernels.integrations.verl``). Each model is built as verl's FSDP engine builds its actor
(``transformers`` from a config: Qwen2.5-0.5B / -1.5B shapes, V = 151,936, tied embeddings, random
bf16 weights, SDPA attention, gradient checkpointing unless ``--no-checkpointing``) and patched by
verl's own ``apply_monkey_patch(use_remove_padding=True, use_fused_kernels=True, fused_kernels_backend=...)``.

One micro-batch step, as the actor's ``update_policy`` runs it (remove padding): ``mb`` sequences of a
``--prompt-len`` prompt and a ``--response-len`` response packed into one row with restarting
``position_ids``, labels rolled as verl's engine rolls them (``shift_labels``); the patched forward
returns per-token ``log_probs`` and ``entropy``; the loss is verl's PPO-clip surrogate on the response
tokens (``-min(r A, clip(r, 0.8, 1.28) A)``, ``r = exp(logp - old)``, token mean) minus 0.01 x the
entropy (what ``ppo_loss`` adds with ``entropy_coeff``: O(tokens), identical for every backend);
backward. The optimizer step is left out (the same for every backend).

Timing: CUDA events around forward + loss + backward, median and min of ``--reps`` steps after
``--warmup``; ``peak_mib``: ``torch.cuda.max_memory_allocated`` over those steps (weights and
gradients included: the same for every backend). The largest micro-batch: micro-batch sizes
1, 2, 4, ... (``--max-mb``) until the first out-of-memory; rows with ``status=oom`` mark it. On a CPU
(``--dry-run``) times are ``perf_counter`` and memory is not measured; ``triton`` needs CUDA and is
reported ``skipped``.

Output: raw CSV (``--out``, default stdout), one row per (shape, backend, micro-batch).

verl is not part of this package's runtime. On a machine without verl (and without network), put its
wheels in ``.whl/`` and ``pip install --no-index --find-links .whl verl==0.9.1``; its import needs
(besides torch, transformers, triton): ``verl ray tensordict omegaconf antlr4-python3-runtime pyvers
accelerate safetensors msgpack psutil cloudpickle jsonschema jsonschema-specifications referencing
rpds-py requests``, as wheels for that machine's Python (``pip download --only-binary=:all:
--python-version 3.12 -d .whl ...``). Without verl the script says so and exits with status 3.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time

import torch

BACKENDS = ("torch", "triton", "gspo_kernels")
SHAPES = {  # Qwen2.5 configs (hidden, intermediate, layers, heads, kv heads), V = 151,936, tied
    "qwen2-0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151_936,
    },
    "qwen2-1.5b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151_936,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1_000,
    },
}
FIELDS = (
    "device",
    "torch",
    "triton",
    "transformers",
    "verl",
    "shape",
    "backend",
    "micro_batch",
    "tokens",
    "response_tokens",
    "status",
    "ms_median",
    "ms_min",
    "peak_mib",
    "reps",
    "checkpointing",
)
MISSING_VERL = 3


def _verl():
    try:
        import verl
        from verl.models.transformers.monkey_patch import apply_monkey_patch
    except ImportError as exc:
        sys.stderr.write(
            f"benchmarks.verl_step needs verl 0.9.1 ({exc}). Install it (pip install 'verl==0.9.1'), "
            "or offline from wheels in .whl/: pip install --no-index --find-links .whl verl==0.9.1 "
            "(see this module's docstring for the wheels its import needs)\n"
        )
        raise SystemExit(MISSING_VERL) from None
    import gspo_kernels.integrations.verl  # noqa: F401  (registers impl_backend=gspo_kernels)

    return verl.__version__, apply_monkey_patch


def build(shape: str, device: torch.device, dtype: torch.dtype, checkpointing: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=32_768)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def batch(mb: int, prompt_len: int, response_len: int, vocab: int, device, seed: int = 1):
    """One packed micro-batch: ids ``(1, total)``, position_ids, rolled labels, and per response token
    its index in the packed row, an advantage and an old log-prob."""
    g = torch.Generator().manual_seed(seed)
    L = prompt_len + response_len
    ids = torch.randint(0, vocab, (1, mb * L), generator=g)
    pos = torch.arange(L).repeat(mb).unsqueeze(0)
    # the log-prob of response token j sits at the position before it (verl's rolled labels)
    idx = (torch.arange(mb)[:, None] * L + prompt_len - 1 + torch.arange(response_len)[None]).reshape(-1)
    adv = torch.randn(mb, 1, generator=g).expand(mb, response_len).reshape(-1)
    return {
        "ids": ids.to(device),
        "pos": pos.to(device),
        "labels": torch.roll(ids, -1, -1).to(device),
        "idx": idx.to(device),
        "adv": adv.to(device),
    }


def step(model, b, temperature: float = 1.0):
    out = model(
        input_ids=b["ids"],
        position_ids=b["pos"],
        attention_mask=None,
        shift_labels=b["labels"],
        temperature=temperature,
        return_dict=True,
        use_cache=False,
    )
    lp, ent = out.log_probs[0, b["idx"]], out.entropy[0, b["idx"]].float()
    old = (lp.detach() - 0.05).float()
    ratio = torch.exp(lp - old)
    loss = torch.maximum(-ratio * b["adv"], -ratio.clamp(0.8, 1.28) * b["adv"]).mean() - 0.01 * ent.mean()
    loss.backward()
    return loss.detach()


def measure(model, b, warmup: int, reps: int, cuda: bool):
    """``(times_ms, peak_mib)`` for ``reps`` steps after ``warmup``."""
    for _ in range(warmup):
        model.zero_grad(set_to_none=True)
        step(model, b)
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(model, b)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(model, b)
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return times, peak


def run(args) -> list[dict]:
    verl_version, apply_monkey_patch = _verl()
    import transformers
    import triton

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    common = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "verl": verl_version,
        "reps": args.reps,
        "checkpointing": not args.no_checkpointing,
    }
    rows = []
    for shape in args.shapes:
        base = build(shape, device, dtype, not args.no_checkpointing)
        for backend in args.backends:
            model = copy.deepcopy(base)
            apply_monkey_patch(model, use_remove_padding=True, use_fused_kernels=True, fused_kernels_backend=backend)
            mb = 1
            while mb <= args.max_mb:
                row = dict(
                    common,
                    shape=shape,
                    backend=backend,
                    micro_batch=mb,
                    tokens=mb * (args.prompt_len + args.response_len),
                    response_tokens=mb * args.response_len,
                )
                if backend == "triton" and not cuda:
                    rows.append(dict(row, status="skipped: verl's triton backend needs CUDA"))
                    break
                b = batch(mb, args.prompt_len, args.response_len, SHAPES[shape]["vocab_size"], device)
                try:
                    times, peak = measure(model, b, args.warmup, args.reps, cuda)
                except torch.OutOfMemoryError:
                    rows.append(dict(row, status="oom"))
                    break
                finally:
                    model.zero_grad(set_to_none=True)
                    del b
                    if cuda:
                        torch.cuda.empty_cache()
                rows.append(
                    dict(
                        row,
                        status="ok",
                        ms_median=round(statistics.median(times), 3),
                        ms_min=round(min(times), 3),
                        peak_mib=round(peak, 1),
                    )
                )
                print(
                    f"{shape} {backend} mb={mb}: {rows[-1]['ms_median']} ms, {rows[-1]['peak_mib']} MiB",
                    file=sys.stderr,
                )
                mb *= 2
            del model
            if cuda:
                torch.cuda.empty_cache()
        del base
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["qwen2-0.5b", "qwen2-1.5b"], choices=sorted(SHAPES))
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=1024)
    p.add_argument("--max-mb", type=int, default=64, help="largest micro-batch size tried (powers of two)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-checkpointing", action="store_true", help="no gradient checkpointing")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU rehearsal: tiny config, prompt 8, response 16, micro-batches 1-2, one rep",
    )
    p.add_argument("--out", help="CSV file (default: stdout)")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused kernels in Triton's interpreter
        args.shapes, args.prompt_len, args.response_len, args.max_mb = ["tiny"], 8, 16, 2
        args.warmup, args.reps = 1, 1
    rows = run(args)
    if args.out:
        with open(args.out, "w", newline="") as f:
            _write(f, rows)
    else:
        _write(sys.stdout, rows)
    return 0


def _write(f, rows) -> None:
    w = csv.DictWriter(f, fieldnames=FIELDS, restval="")
    w.writeheader()
    w.writerows(rows)


if __name__ == "__main__":
    raise SystemExit(main())
