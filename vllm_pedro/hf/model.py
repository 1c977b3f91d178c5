"""PedroModel: a frozen transformers causal LM with one PEDRO generator per layer.

This is the reference implementation: training runs here, and the vLLM plugin must
produce the same tokens."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..adapter_io import check_base_shapes, load_adapter, save_adapter, validate_tensors
from ..config import BaseShapes, PedroConfig
from ..families import ATTENTION_TARGETS, architecture_of_model, check_targets, family_of
from ..generator import VectorGenerator
from ..hub import resolve_adapter
from .layer import PedroLayerHooks, PedroState


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers (`model.layers[i]` with `self_attn` and `mlp`) of a model whose
    family PEDRO supports (families.py); any other class is refused by name."""
    family_of(architecture_of_model(model))
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    ok = isinstance(layers, nn.ModuleList) and len(layers) > 0 and all(
        hasattr(l, "self_attn") and hasattr(l, "mlp") for l in layers)
    if not ok:
        raise TypeError(f"PEDRO found no decoder layers (model.layers[i].self_attn and .mlp) in "
                        f"{type(model).__name__}")
    return list(layers)


def find_projections(layer: nn.Module, shapes: BaseShapes, with_up: bool) -> dict[str, tuple[nn.Linear, int]]:
    """target -> (the linear whose output holds it, its first column there). q/k/v: separate
    q_proj/k_proj/v_proj, or one fused qkv_proj laid out [q | k | v] (Phi-3). up: a separate
    up_proj, or the second half of a fused gate_up_proj [gate | up] (Phi-3, GLM-4); a
    mixture-of-experts block has none (with_up False)."""
    attn, mlp = layer.self_attn, layer.mlp
    q, kv, ff = shapes.q_size, shapes.kv_size, shapes.ff_size
    linear = lambda owner, name: isinstance(getattr(owner, name, None), nn.Linear)  # noqa: E731
    if all(linear(attn, f"{t}_proj") for t in ATTENTION_TARGETS):
        found = {t: (getattr(attn, f"{t}_proj"), 0) for t in ATTENTION_TARGETS}
        widths = {"q": q, "k": kv, "v": kv}
    elif linear(attn, "qkv_proj"):
        found = {"q": (attn.qkv_proj, 0), "k": (attn.qkv_proj, q), "v": (attn.qkv_proj, q + kv)}
        widths = {"q": q + 2 * kv}
    else:
        raise TypeError(f"PEDRO found neither q_proj/k_proj/v_proj nor qkv_proj linears in {type(attn).__name__}")
    if with_up:
        if linear(mlp, "up_proj"):
            found["up"], widths["up"] = (mlp.up_proj, 0), ff
        elif linear(mlp, "gate_up_proj"):
            found["up"], widths["up"] = (mlp.gate_up_proj, ff), 2 * ff
        else:
            raise TypeError(f"PEDRO found neither up_proj nor gate_up_proj linears in {type(mlp).__name__}")
    for t, want in widths.items():  # a misread config would scale the wrong columns: refuse it
        m = found[t][0]
        if m.out_features != want:
            raise TypeError(f"{type(layer).__name__}: the linear holding target {t} has {m.out_features} outputs, "
                            f"but the config's shapes ({shapes}) give {want}")
    return found


def base_shapes_of(model: nn.Module) -> BaseShapes:
    """The model's shapes from its config, after checking its module structure."""
    layers = find_decoder_layers(model)
    shapes = BaseShapes.from_hf_config(model.config)
    if shapes.num_layers != len(layers):
        raise TypeError(f"{type(model).__name__} has {len(layers)} decoder layers but its config says "
                        f"{shapes.num_layers}")
    return shapes


def base_model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


class PedroModel(nn.Module):
    def __init__(self, model: nn.Module, config: PedroConfig):
        super().__init__()
        config = copy.deepcopy(config)
        shapes = base_shapes_of(model)
        family = check_targets(architecture_of_model(model), config.targets)
        if config.base_shapes is None:
            config.base_shapes = shapes
        check_base_shapes(config, shapes, type(model).__name__)
        config.base_model_name_or_path = config.base_model_name_or_path or base_model_name(model)
        self.config = config
        self.base_model = model
        for p in model.parameters():
            p.requires_grad_(False)
        dtype = getattr(torch, config.dtype)
        device = next(model.parameters()).device
        self.generators = nn.ModuleList(
            VectorGenerator(shapes.hidden_size, config.r, config.out_size, config.pooler,
                            config.activation, dtype).to(device)
            for _ in range(shapes.num_layers))
        self.state = PedroState()
        columns = config.target_columns()
        self._hooks = []
        for i, layer in enumerate(find_decoder_layers(model)):
            projections = find_projections(layer, shapes, with_up=not family.moe)
            self._hooks.append(PedroLayerHooks(i, layer.self_attn, projections, self.generators[i], columns,
                                               self.state))
        # Vectors are computed in the pass that sees the prompt; clear the request after it.
        self._hooks.append(model.register_forward_hook(self._end_of_pass))

    def _end_of_pass(self, module, args, out):
        self.state.prompt_mask = None

    # -- PEFT-like surface -------------------------------------------------------------
    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.generators.parameters() if p.requires_grad)
        total = trainable + sum(p.numel() for p in self.base_model.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.trainable_parameters()
        print(f"trainable params: {t:,} || all params: {a:,} || trainable%: {100 * t / a:.4f}")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"generators.{k}": v for k, v in self.generators.state_dict().items()}

    def save_pretrained(self, directory: str) -> None:
        save_adapter(directory, self.config, self.adapter_state_dict())

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str) -> PedroModel:
        """A saved adapter: a local folder, or a Hugging Face Hub id ("org/repo") through the
        Hugging Face cache."""
        config, tensors = load_adapter(resolve_adapter(directory), base=base_shapes_of(model))
        pm = cls(model, config)
        pm.load_adapter_tensors(tensors)
        return pm

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        validate_tensors(self.config, tensors)
        own = self.adapter_state_dict()
        with torch.no_grad():
            for k, v in tensors.items():
                own[k].copy_(v)

    def unload(self) -> nn.Module:
        """Remove every hook and give back the untouched base model."""
        for h in self._hooks:
            h.remove()
        return self.base_model

    # -- forward and generate -------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prompt_lengths: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        """One pass that computes the vectors from the prompt tokens and applies them to
        every token. Give `prompt_lengths` ([B], right padding: the first n tokens of row b
        are its prompt) or an explicit `prompt_mask` [B, T]; with neither, every attended
        token is prompt. With `labels` ([B, T], -100 where no loss) the output has the base
        model's `loss` (named here so transformers' Trainer keeps a labels column)."""
        if labels is not None:
            kwargs["labels"] = labels
        self.state.prompt_mask = self._prompt_mask(input_ids, attention_mask, prompt_lengths, prompt_mask)
        try:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.state.prompt_mask = None

    @staticmethod
    def _prompt_mask(input_ids, attention_mask, prompt_lengths, prompt_mask) -> torch.Tensor:
        if prompt_mask is None:
            if prompt_lengths is not None:
                pos = torch.arange(input_ids.shape[1], device=input_ids.device)
                prompt_mask = pos.unsqueeze(0) < torch.as_tensor(prompt_lengths, device=input_ids.device).unsqueeze(1)
            else:
                prompt_mask = torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is not None:
                prompt_mask = prompt_mask & attention_mask.bool()
        prompt_mask = prompt_mask.bool()
        if not prompt_mask.any(dim=1).all():
            raise ValueError("every sequence needs at least one prompt token")
        return prompt_mask

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """transformers' generate with the vectors computed once, in the prefill pass, from
        the prompt (left padding for batches), and reused for every decoding step."""
        self.state.prompt_mask = self._prompt_mask(input_ids, attention_mask, None, None)
        try:
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.state.prompt_mask = None

    # -- gradient checkpointing (transformers' API, as Trainer calls it) -------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Checkpoint the frozen base model's decoder layers, non-reentrant, with the
        prompt mask of each pass restored while backward recomputes it (see
        checkpointing.py). `kwargs` (every_n_layers, offload) go to transformers."""
        from .checkpointing import checkpoint_kwargs

        self.base_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=checkpoint_kwargs(self.state, gradient_checkpointing_kwargs), **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.base_model, "is_gradient_checkpointing", False))

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device


def get_pedro_model(model: nn.Module, config: PedroConfig) -> PedroModel:
    """Freeze `model` and attach a fresh PEDRO adapter (an untrained adapter leaves the
    model's outputs unchanged)."""
    return PedroModel(model, config)
