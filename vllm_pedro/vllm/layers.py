"""Where q/v/up meet the PEDRO ops inside vLLM's own Llama / Qwen2 modules.

Each decoder layer's `qkv_proj` and `gate_up_proj` is wrapped. The wrapper calls the
original projection, then one custom op (`torch.ops.vllm.pedro_qkv` / `pedro_up`)
that (at prefill) runs the layer's generators and writes the slots, and (always) does
one gather-multiply over the whole batch through vllm_pedro.ops. The ops are opaque to
torch.compile, read the step's mapping from the worker's PedroRuntime (as attention
reads the forward context), and are splitting ops for piecewise CUDA graphs.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops

QKV_OP, UP_OP = "pedro_qkv", "pedro_up"
SPLITTING_OPS = [f"vllm::{QKV_OP}", f"vllm::{UP_OP}"]

_runtime = None  # the worker's PedroRuntime (runner.py) while PEDRO is enabled


def set_runtime(runtime) -> None:
    global _runtime
    _runtime = runtime


def pedro_qkv(x: torch.Tensor, qkv: torch.Tensor, layer: int) -> None:
    rt = _runtime
    if rt is None:
        return
    n = x.shape[0]
    step = rt.step
    slots = rt.slots.layer(layer)
    if step.has_prefill:
        h = x[step.pool_token_idx]
        vec = rt.adapters.compute_vectors(layer, h, step.pool_seg, step.seg_row)
        slots[step.seg_slot] = vec.to(slots.dtype)
    c = rt.columns
    ops.scale_qkv_(qkv[:n], slots, rt.token_slot[:n], rt.q_size, rt.kv_size, c["q"], c["k"], c["v"])


def pedro_up(gate_up: torch.Tensor, layer: int) -> None:
    rt = _runtime
    if rt is None or rt.columns["up"] < 0:
        return
    n, ff = gate_up.shape[0], gate_up.shape[1] // 2
    ops.scale_(gate_up[:n, ff:], rt.slots.layer(layer), rt.token_slot[:n], rt.columns["up"])


def _fake_qkv(x, qkv, layer):
    return None


def _fake_up(gate_up, layer):
    return None


_registered = False


def register_ops() -> None:
    global _registered
    if _registered:
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(QKV_OP, pedro_qkv, mutates_args=["qkv"], fake_impl=_fake_qkv)
    direct_register_custom_op(UP_OP, pedro_up, mutates_args=["gate_up"], fake_impl=_fake_up)
    _registered = True


class PedroQKVProj(nn.Module):
    """Wraps QKVParallelLinear: Q' = l_q * Q, V' = l_v * V (and K if targeted)."""

    def __init__(self, base: nn.Module, layer: int):
        super().__init__()
        self.base_layer, self.layer = base, layer

    def forward(self, x):
        out, bias = self.base_layer(x)
        torch.ops.vllm.pedro_qkv(x, out, self.layer)
        return out, bias


class PedroGateUpProj(nn.Module):
    """Wraps MergedColumnParallelLinear [gate | up]: U' = l_u * U before act(gate) * U'."""

    def __init__(self, base: nn.Module, layer: int):
        super().__init__()
        self.base_layer, self.layer = base, layer

    def forward(self, x):
        out, bias = self.base_layer(x)
        torch.ops.vllm.pedro_up(out, self.layer)
        return out, bias


def find_vllm_layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    ok = layers is not None and all(
        hasattr(getattr(l, "self_attn", None), "qkv_proj") and hasattr(getattr(l, "mlp", None), "gate_up_proj")
        for l in layers)
    if not ok:
        raise TypeError(f"PEDRO serves Llama-family and Qwen2 models (model.layers[i].self_attn.qkv_proj, "
                        f".mlp.gate_up_proj); vLLM model class {type(model).__name__} has another structure")
    return list(layers)


def wrap_model(model: nn.Module) -> list[nn.Module]:
    """Wrap every decoder layer in place; returns the layers."""
    register_ops()
    layers = find_vllm_layers(model)
    for i, layer in enumerate(layers):
        if not isinstance(layer.self_attn.qkv_proj, PedroQKVProj):
            layer.self_attn.qkv_proj = PedroQKVProj(layer.self_attn.qkv_proj, i)
            layer.mlp.gate_up_proj = PedroGateUpProj(layer.mlp.gate_up_proj, i)
    return layers
