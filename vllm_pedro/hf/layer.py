"""How PEDRO meets one transformers decoder layer.

A pre-hook on the attention block reads H_l (the normed layer input that q/k/v read)
and, when a prompt is being encoded, runs the layer's generator on the prompt tokens.
Forward hooks on q/k/v/up multiply each projection's output by its slice of the
vectors. The base modules stay as they are: state_dict names do not change and
detaching the adapter is removing the hooks.
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
    """Installs and removes the hooks of layer `index`."""

    def __init__(self, index: int, attn: nn.Module, projections: dict[str, nn.Module],
                 generator: VectorGenerator, columns: dict[str, tuple[int, int]], state: PedroState):
        self.index, self.generator, self.state = index, generator, state
        self.handles = [attn.register_forward_pre_hook(self._compute_vectors, with_kwargs=True)]
        for target, (start, width) in columns.items():
            self.handles.append(projections[target].register_forward_hook(self._scaler(start, width)))

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

    def _scaler(self, start: int, width: int):
        def hook(module, args, out):
            if not self.state.enabled:
                return None
            vec = self.state.vectors.get(self.index)
            if vec is None:
                raise RuntimeError("PEDRO vectors were not computed: run a forward pass over the "
                                   "prompt (prompt_mask / prompt_lengths) before decoding")
            # fp32 product stored in the activation dtype: the same rule as vllm_pedro.ops.
            return (out.float() * vec[:, None, start:start + width]).to(out.dtype)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
