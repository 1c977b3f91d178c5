"""Where q/v/up meet PEDRO inside vLLM's own Llama / Qwen2 modules.

Each decoder layer's `qkv_proj` is wrapped: after the projection, one custom op
(`torch.ops.vllm.pedro_prefill`) runs, at prefill only, the generators of the step's
prefilling requests and writes their vectors into the slots; then the fused qkv output
is multiplied by its slot row's [q | k | v] block, every token (base tokens by the row
of ones). The FFN's up
scaling is fused into the activation: the layer's `act_fn` (SiluAndMul) becomes
silu(gate) * (up * l_u) in one op. An MLP with another activation keeps it and gets the
up scaling on its `gate_up_proj` output instead.

How each wrapper runs depends on the runtime's `mode` (`scaling_mode`):
  "eager"  (enforce_eager): plain Python calls, no custom-op dispatch; the generator runs
           only on steps with prefills; the scaling is the ops backend the runtime resolved
           once (torch on the CPU, Triton on the GPU).
  "trace"  (compiled, the default): the prefill op is opaque to torch.compile and a
           splitting op (it branches on host-side step data), so the generator never enters
           a compiled graph; the scaling is plain tensor code torch.compile traces and fuses.
  "op"     (compiled, VLLM_PEDRO_COMPILED_SCALING=op): the scaling as opaque custom ops too.
The scaling reads only static buffers (slots, the token -> slot map): CUDA graphs capture it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..ops import reference
from ..prefill import write_vectors

PREFILL_OP, SCALE_QKV_OP = "pedro_prefill", "pedro_scale_qkv"
SILU_MUL_OP, SCALE_UP_OP = "pedro_silu_and_mul", "pedro_scale_up"
SPLITTING_OPS = [f"vllm::{PREFILL_OP}"]
ENV_SCALING = "VLLM_PEDRO_COMPILED_SCALING"  # "trace" (default) or "op": how compiled mode scales

_runtime = None  # the worker's PedroRuntime (runner.py) while PEDRO is enabled


def set_runtime(runtime) -> None:
    global _runtime
    _runtime = runtime


def scaling_mode(vllm_config) -> str:
    """"eager" without torch.compile; else "trace" (default) or "op" (VLLM_PEDRO_COMPILED_SCALING)."""
    from vllm.config import CompilationMode

    mode = os.environ.get(ENV_SCALING, "trace").strip().lower()
    if mode not in ("trace", "op"):
        raise ValueError(f"{ENV_SCALING}={mode!r}: expected trace or op")
    return "eager" if vllm_config.compilation_config.mode == CompilationMode.NONE else mode


# -- the custom ops (eager bodies; torch.compile sees only their fake signatures) ----------
def pedro_prefill(x: torch.Tensor, slots: torch.Tensor, layer: int) -> None:
    rt = _runtime
    step = rt.step if rt is not None else None
    if step is None:
        return
    write_vectors(slots[layer], x, step, rt.adapters.layer(layer, step.poolers, step.activations), rt.ops.pool_prompts)


def pedro_scale_qkv(qkv: torch.Tensor, layer: int) -> None:
    rt = _runtime
    rt.ops.scale_(qkv, rt.slots.layer(layer), rt.token_slot, 0)  # the row's [q | k | v] block


def pedro_silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor, layer: int) -> None:
    rt = _runtime
    rt.ops.silu_and_mul_scaled(gate_up, rt.slots.layer(layer), rt.token_slot, rt.columns["up"], out)


def pedro_scale_up(gate_up: torch.Tensor, layer: int) -> None:
    rt = _runtime
    ff = gate_up.shape[1] // 2
    rt.ops.scale_(gate_up[:, ff:], rt.slots.layer(layer), rt.token_slot, rt.columns["up"])


def _nothing(*args) -> None:
    return None


_registered = False


def register_ops() -> None:
    global _registered
    if _registered:
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    # Each declares what it writes, so compiled graphs keep them and order reads after them.
    direct_register_custom_op(PREFILL_OP, pedro_prefill, mutates_args=["slots"], fake_impl=_nothing)
    direct_register_custom_op(SCALE_QKV_OP, pedro_scale_qkv, mutates_args=["qkv"], fake_impl=_nothing)
    direct_register_custom_op(SILU_MUL_OP, pedro_silu_and_mul, mutates_args=["out"], fake_impl=_nothing)
    direct_register_custom_op(SCALE_UP_OP, pedro_scale_up, mutates_args=["gate_up"], fake_impl=_nothing)
    _registered = True


# -- the wrappers --------------------------------------------------------------------------
class PedroQKVProj(nn.Module):
    """Wraps QKVParallelLinear: generators at prefill, then [Q | K | V] *= the slot row's
    [l_q | l_k | l_v] for every token (an untargeted part is ones)."""

    def __init__(self, base: nn.Module, layer: int, runtime):
        super().__init__()
        self.base_layer, self.layer = base, layer
        self.rt = runtime  # a plain attribute: not a submodule, no parameters

    def forward(self, x):
        rt = self.rt
        if rt.mode == "eager":
            out, bias = self.base_layer(x)
            if rt.step is not None:
                pedro_prefill(x, rt.slots.vectors, self.layer)
            rt.ops.scale_(out, rt.slots.vectors[self.layer], rt.token_slot, 0)  # the row's [q | k | v] block
            return out, bias
        # Compiled: the generator reads x before the projection does, so the projection is x's
        # last reader, as in the bare graph, and Inductor can hand x's buffer on after it.
        torch.ops.vllm.pedro_prefill(x, rt.slots.vectors, self.layer)
        out, bias = self.base_layer(x)
        if rt.mode == "trace":
            # out of place: a plain product torch.compile fuses into what reads qkv
            return reference.scaled(out, rt.slots.vectors[self.layer], rt.token_slot[:out.shape[0]], 0), bias
        torch.ops.vllm.pedro_scale_qkv(out, self.layer)
        return out, bias


class PedroSiluAndMul(nn.Module):
    """Replaces SiluAndMul: silu(gate) * (up * l_u), the up scaling fused into the activation."""

    def __init__(self, layer: int, runtime):
        super().__init__()
        self.layer, self.rt = layer, runtime

    def forward(self, gate_up):
        rt = self.rt
        n, d = gate_up.shape[0], gate_up.shape[1] // 2
        if rt.mode == "trace":
            return reference.silu_and_mul_scaled(gate_up, rt.slots.vectors[self.layer], rt.token_slot[:n],
                                                 rt.columns["up"])
        out = torch.empty((n, d), dtype=gate_up.dtype, device=gate_up.device)
        if rt.mode == "eager":
            return rt.ops.silu_and_mul_scaled(gate_up, rt.slots.vectors[self.layer], rt.token_slot, rt.columns["up"],
                                              out)
        torch.ops.vllm.pedro_silu_and_mul(gate_up, out, self.layer)
        return out


class PedroGateUpProj(nn.Module):
    """Wraps MergedColumnParallelLinear [gate | up] of an MLP whose activation is not
    SiluAndMul: U' = l_u * U before the model's own act(gate) * U'."""

    def __init__(self, base: nn.Module, layer: int, runtime):
        super().__init__()
        self.base_layer, self.layer, self.rt = base, layer, runtime

    def forward(self, x):
        out, bias = self.base_layer(x)
        rt, ff = self.rt, out.shape[1] // 2
        if rt.mode == "trace":
            reference.scale_(out[:, ff:], rt.slots.vectors[self.layer], rt.token_slot[:out.shape[0]],
                             rt.columns["up"])
        elif rt.mode == "eager":
            rt.ops.scale_(out[:, ff:], rt.slots.vectors[self.layer], rt.token_slot, rt.columns["up"])
        else:
            torch.ops.vllm.pedro_scale_up(out, self.layer)
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


def wrap_model(model: nn.Module, runtime) -> list[nn.Module]:
    """Wrap every decoder layer in place; returns the layers."""
    from vllm.model_executor.layers.activation import SiluAndMul

    register_ops()
    layers = find_vllm_layers(model)
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        if isinstance(attn.qkv_proj, PedroQKVProj):
            continue
        attn.qkv_proj = PedroQKVProj(attn.qkv_proj, i, runtime)
        if isinstance(getattr(mlp, "act_fn", None), SiluAndMul):
            mlp.act_fn = PedroSiluAndMul(i, runtime)
        else:
            mlp.gate_up_proj = PedroGateUpProj(mlp.gate_up_proj, i, runtime)
    return layers
