"""How PEDRO meets one transformers decoder layer.

A pre-hook on the attention block reads H_l (its input: what q/k/v read, the normed layer
input in most families, the residual stream in OLMo 2) and, when a prompt is being
encoded, runs the layer's generator on the prompt tokens. A forward hook on each linear
that holds a target multiplies the target's columns of its output by the target's slice
of the vectors: the whole output of a separate q/k/v/up projection, column ranges of a
fused qkv_proj or gate_up_proj (the rest times 1). The output is scaled as the linear
returns it, before any q/k norm or rotary embedding. The base modules stay as they are:
state_dict names do not change and detaching the adapter is removing the hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..generator import VectorGenerator


@dataclass
class PedroState:
    """Shared by every layer of one PedroModel. `prompt_mask` is set while a forward pass
    should (re)compute the vectors; `vectors[l]` holds [batch, out] for layer l."""

    prompt_mask: torch.Tensor | None = None
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)
    enabled: bool = True


def find_attention_input(args, kwargs) -> torch.Tensor:
    hs = kwargs.get("hidden_states")
    if hs is None and args:
        hs = args[0]
    if not isinstance(hs, torch.Tensor):
        raise RuntimeError("PEDRO could not find hidden_states in the attention block's inputs")
    return hs


class PedroLayerHooks:
    """Installs and removes the hooks of layer `index`. `projections`: target -> (the linear
    whose output holds it, its first column there); `columns`: target -> (first column,
    width) in the generator's output row."""

    def __init__(self, index: int, attn: nn.Module, projections: dict[str, tuple[nn.Module, int]],
                 generator: VectorGenerator, columns: dict[str, tuple[int, int]], state: PedroState):
        self.index, self.generator, self.state = index, generator, state
        self.handles = [attn.register_forward_pre_hook(self._compute_vectors, with_kwargs=True)]
        pieces: dict[nn.Module, list[tuple[int, int, int]]] = {}  # linear -> [(out column, vector column, width)]
        for target, (start, width) in columns.items():
            module, offset = projections[target]
            pieces.setdefault(module, []).append((offset, start, width))
        for module, spans in pieces.items():
            self.handles.append(module.register_forward_hook(self._scaler(sorted(spans), module.out_features)))

    def _compute_vectors(self, module, args, kwargs):
        mask = self.state.prompt_mask
        if mask is None or not self.state.enabled:
            return None
        hs = find_attention_input(args, kwargs)  # [B, T, d]
        if mask.shape[1] == hs.shape[1] and mask.shape[0] < hs.shape[0] and hs.shape[0] % mask.shape[0] == 0:
            # generate() expanded the batch (beams, num_return_sequences) with repeat_interleave
            mask = mask.repeat_interleave(hs.shape[0] // mask.shape[0], dim=0)
        if mask.shape != hs.shape[:2]:
            raise RuntimeError(f"prompt mask {tuple(mask.shape)} does not match hidden states "
                               f"{tuple(hs.shape[:2])}")
        seg = torch.arange(hs.shape[0], device=hs.device).unsqueeze(1).expand_as(mask)[mask]
        self.state.vectors[self.index] = self.generator(hs[mask], seg, hs.shape[0])
        return None

    def _scaler(self, spans: list[tuple[int, int, int]], out_width: int):
        """The hook scaling a linear's output [B, T, out_width] by the vector columns of
        `spans` (out column, vector column, width), sorted; columns no span covers keep x1."""
        whole = spans[0][1] if len(spans) == 1 and spans[0][0] == 0 and spans[0][2] == out_width else None

        def factor(vec: torch.Tensor) -> torch.Tensor:
            if whole is not None:  # a separate projection: one slice, no copy
                return vec[:, whole:whole + out_width]
            parts, at = [], 0
            for out_col, col, width in spans:
                if out_col > at:
                    parts.append(vec.new_ones(vec.shape[0], out_col - at))
                parts.append(vec[:, col:col + width])
                at = out_col + width
            if at < out_width:
                parts.append(vec.new_ones(vec.shape[0], out_width - at))
            return torch.cat(parts, dim=1)

        def hook(module, args, out):
            if not self.state.enabled:
                return None
            vec = self.state.vectors.get(self.index)
            if vec is None:
                raise RuntimeError("PEDRO vectors were not computed: run a forward pass over the "
                                   "prompt (prompt_mask / prompt_lengths) before decoding")
            # fp32 product stored in the activation dtype: the same rule as vllm_pedro.ops.
            return (out.float() * factor(vec)[:, None, :]).to(out.dtype)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
