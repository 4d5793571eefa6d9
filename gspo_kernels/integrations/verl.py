"""verl backend: ``fused_kernel_options.impl_backend=gspo_kernels`` for verl's actor.

Switched on by three overrides of a verl run (the module is imported in every
worker through ``external_lib`` before the model is built)::

    actor_rollout_ref.model.external_lib=gspo_kernels.integrations.verl
    actor_rollout_ref.model.use_fused_kernels=True
    actor_rollout_ref.model.fused_kernel_options.impl_backend=gspo_kernels

What importing it does (verl 0.9.1; other versions are refused at import):

- ``verl.models.transformers.monkey_patch.patch_forward_with_backends`` (which
  verl's ``apply_monkey_patch`` calls when it builds the actor, reference and
  critic models) accepts ``gspo_kernels``: verl installs its own
  ``torch``-backend forward for the model's family (``dense_common`` for the
  dense causal LMs; Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V and Qwen3.5 get
  their own verl forward, which differs from the dense one only before the
  head), then marks the model ``_verl_fused_kernels_backend = "gspo_kernels"``.
- ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (which every
  one of those forwards constructs from that mark and calls with the last
  hidden states, ``lm_head.weight``, the rolled labels and the temperature)
  accepts ``gspo_kernels`` and computes ``(log_probs, entropy)`` with
  :func:`gspo_kernels.linear_token_logprobs` (``return_entropy=True``): the
  fused kernels on a GPU, the chunked path elsewhere. No ``(tokens, V)``
  logits are held, forward or backward.

Everything else (the backbone's forward, remove-padding packing, rolling the
labels, Ulysses slicing, the output dataclass, the loss) stays verl's code.
``impl_backend`` ``torch``, ``triton`` and ``liger`` behave as before. One
fix to verl: its ``apply_monkey_patch`` imports TRL's
``AutoModelForCausalLMWithValueHead`` whenever TRL is installed and fails with
TRL >= 1.0, which no longer has it; the import is skipped where the class is absent.

Outputs: ``log_probs`` and ``entropy`` of shape ``input_ids.shape`` (one
packed row ``(1, total)`` with ``use_remove_padding=True``, ``(b, s)``
padded), float32 both (verl's torch backend returns the entropy in the
hidden states' dtype), differentiable w.r.t. the hidden states and the LM
head. Deterministic: bitwise the same values and gradients run to run (no
atomics in the kernels; fixed-order reductions), so the backend can stay on
under full determinism.
"""

from __future__ import annotations

import torch

import gspo_kernels
from gspo_kernels.errors import DTypeError, OptionError

try:
    import verl
    from verl.models.transformers import monkey_patch as _monkey_patch
    from verl.utils.experimental import torch_functional as _torch_functional
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "gspo_kernels.integrations.verl needs verl: pip install 'gspo-kernels[verl]' (verl 0.9.1)"
    ) from exc

__all__ = ["BACKEND", "TESTED_VERL_VERSIONS", "FusedLinearForPPO", "head_logprobs", "patch_forward_with_backends"]

BACKEND = "gspo_kernels"
TESTED_VERL_VERSIONS = ("0.9.1",)

if getattr(verl, "__version__", None) not in TESTED_VERL_VERSIONS:
    raise ImportError(
        f"gspo_kernels.integrations.verl supports verl {', '.join(TESTED_VERL_VERSIONS)} (the versions its tests "
        f"run against), found verl {getattr(verl, '__version__', 'of unknown version')}; "
        f"pip install 'verl==0.9.1' or leave fused_kernel_options.impl_backend at verl's own backends"
    )

# Config fields that put something between the LM head's product and the softmax: verl's
# fused forwards ignore them (its own backends too), so such a model is refused by name.
_HEAD_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
# Families verl runs without a fused forward at all.
_REFUSED_MODEL_TYPES = ("kimi_vl",)


def head_logprobs(
    hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_probs, entropy)`` of ``input_ids`` under ``softmax(hidden_states @ vocab_weights.T / temperature)``.

    Args:
        hidden_states: ``(..., T, H)`` last hidden states (verl passes ``(1, total, H)``
            packed or ``(b, s, H)`` padded).
        vocab_weights: ``(V, H)`` LM head.
        input_ids: ``(..., T)`` the (rolled) labels, ids in ``[0, V)``.
        temperature: a float > 0 (verl's fused path takes one temperature per batch).

    Returns:
        ``(..., T)`` float32 log-probs and entropies, differentiable w.r.t. both tensors.
    """
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise OptionError(
                f"temperature must be one number for the fused head (as in verl's fused kernels), "
                f"got a tensor of shape {tuple(temperature.shape)}"
            )
        temperature = float(temperature)
    for name, t in (("hidden_states", hidden_states), ("vocab_weights", vocab_weights)):
        if type(t) is not torch.Tensor and isinstance(t, torch.Tensor) and hasattr(t, "full_tensor"):
            raise DTypeError(
                f"{name} is a DTensor (a tensor-parallel LM head); impl_backend={BACKEND} takes the full "
                f"(V, H) head: use verl's torch backend with tensor parallelism"
            )
    dtype = hidden_states.dtype
    if torch.is_autocast_enabled(hidden_states.device.type):  # what the head's matmul would run in
        dtype = torch.get_autocast_dtype(hidden_states.device.type)
    elif vocab_weights.dtype != dtype:
        raise DTypeError(
            f"vocab_weights must have hidden_states' dtype {dtype} (outside autocast), got {vocab_weights.dtype}"
        )
    with torch.autocast(hidden_states.device.type, enabled=False):
        return gspo_kernels.linear_token_logprobs(
            hidden_states.to(dtype),
            vocab_weights.to(dtype),
            input_ids.to(torch.int64),
            temperature=temperature,
            return_entropy=True,
        )


_VerlFusedLinearForPPO = getattr(
    _torch_functional.FusedLinearForPPO, "_verl_class", _torch_functional.FusedLinearForPPO
)


class FusedLinearForPPO(_VerlFusedLinearForPPO):  # type: ignore[misc, valid-type]
    """verl's ``FusedLinearForPPO`` with one more ``impl_backend``: ``"gspo_kernels"`` (:func:`head_logprobs`);
    ``"torch"`` and ``"liger"`` are verl's own."""

    _verl_class = _VerlFusedLinearForPPO

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        if impl_backend != BACKEND:
            super().__init__(chunk_size=chunk_size, impl_backend=impl_backend)
            return
        torch.nn.Module.__init__(self)
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        if self.impl_backend != BACKEND:
            return super().forward(hidden_states, vocab_weights, input_ids, temperature)
        return head_logprobs(hidden_states, vocab_weights, input_ids, temperature)


def _check_model(model) -> None:
    config = model.config
    if config.model_type in _REFUSED_MODEL_TYPES:
        raise OptionError(
            f"impl_backend={BACKEND}: verl 0.9.1 has no fused forward for model_type "
            f"{config.model_type!r}; set use_fused_kernels=False for it"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _HEAD_TRANSFORMS:
        value = getattr(text, key, None)
        if value not in (None, 1, 1.0):
            raise OptionError(
                f"impl_backend={BACKEND}: model_type {config.model_type!r} has {key}={value!r}, a "
                f"transform between the LM head and the softmax that verl's fused forward does not "
                f"apply; set use_fused_kernels=False for this model"
            )


_verl_patch_forward_with_backends = getattr(
    _monkey_patch.patch_forward_with_backends, "__wrapped_verl__", _monkey_patch.patch_forward_with_backends
)


def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str | None = None):
    """verl's ``patch_forward_with_backends``, which also accepts ``fused_kernels_backend="gspo_kernels"``:
    verl's torch-backend forward for the model's family, its head computed by :func:`head_logprobs`."""
    if not use_fused_kernels or fused_kernels_backend != BACKEND:
        return _verl_patch_forward_with_backends(
            model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend
        )
    _check_model(model)
    _verl_patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    model._verl_fused_kernels_backend = BACKEND
    print(f"Using {BACKEND} backend for fused kernels in {model.__class__.__name__}")


def _trl_value_head_available() -> bool:
    """verl's ``apply_monkey_patch`` patches ``trl``'s ``AutoModelForCausalLMWithValueHead`` whenever ``trl``
    imports, and fails where ``trl`` no longer has that class (TRL >= 1.0): then there is nothing to patch."""
    if not _verl_is_trl_available():
        return False
    import importlib

    for name in ("trl.experimental.ppo", "trl"):
        try:
            if hasattr(importlib.import_module(name), "AutoModelForCausalLMWithValueHead"):
                return True
        except ImportError:
            pass
    return False


_verl_is_trl_available = getattr(_monkey_patch.is_trl_available, "__wrapped_verl__", _monkey_patch.is_trl_available)
_trl_value_head_available.__wrapped_verl__ = _verl_is_trl_available  # type: ignore[attr-defined]
_monkey_patch.is_trl_available = _trl_value_head_available
patch_forward_with_backends.__wrapped_verl__ = _verl_patch_forward_with_backends  # type: ignore[attr-defined]
_monkey_patch.patch_forward_with_backends = patch_forward_with_backends
_torch_functional.FusedLinearForPPO = FusedLinearForPPO
