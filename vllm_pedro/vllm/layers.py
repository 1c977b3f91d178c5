"""Where q/k/v/up meet PEDRO inside vLLM's models (the families of families.py).

Each decoder layer's `qkv_proj` (vLLM's fused QKVParallelLinear, in its own models and in
its Transformers backend alike) is wrapped: after the projection, one custom op
(`torch.ops.vllm.pedro_prefill`) runs, at prefill only, the generators of the step's
prefilling requests and writes their vectors into the slots; then the fused qkv output
is multiplied by its slot row's [q | k | v] block, every token (base tokens by the row
of ones). The FFN's up
scaling is fused into the activation: the layer's `act_fn` (SiluAndMul) becomes
silu(gate) * (up * l_u) in one op. An MLP with another activation (Gemma's GeluAndMul)
keeps it and gets the up scaling on its `gate_up_proj` output instead. A mixture-of-experts
family keeps its FFN: attention targets only. The scaling is applied to the projection's
output, before any q/k norm (Qwen3, Gemma 3, OLMo 2) and before rotary, as in the
transformers reference.

How each wrapper runs depends on the runtime's `mode` (`scaling_mode`):
  "eager"  (enforce_eager): plain Python calls, no custom-op dispatch; the generator runs
           only on steps with prefills; the scaling is the ops backend the runtime resolved
           once (Triton on the GPU; on the CPU the C++ op `scale_rows_`, in place, skipping
           base tokens, then vLLM's own SiluAndMul; the torch reference without a compiler).
  "trace"  (compiled): the prefill op is opaque to torch.compile (and a splitting op where
           CUDA graphs are captured: it branches on host-side step data), so the generator
           never enters a compiled graph; the scaling is plain tensor code torch.compile
           traces and fuses. On the CPU (the default there when the C++ op builds) q/k/v
           are scaled in place by `scale_rows_` instead ("inplace"): a traced product would
           be a second buffer of the qkv projection's size in every layer (the attention
           reads v as a slice of it), which costs Inductor its buffer reuse in the MLP too
           (benchmarks/graph_allocations.py); the up scaling stays traced, fused into the
           activation like the bare model's SiluAndMul (scaling the up half in place before
           the native SiluAndMul was measured slower: 0.941 of bare against 0.965).
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
ENV_SCALING = "VLLM_PEDRO_COMPILED_SCALING"  # inplace (CPU default), trace (GPU default) or op

_runtime = None  # the worker's PedroRuntime (runner.py) while PEDRO is enabled


def set_runtime(runtime) -> None:
    global _runtime
    _runtime = runtime


def scaling_mode(vllm_config, cpu_op: bool = False) -> str:
    """"eager" without torch.compile; else VLLM_PEDRO_COMPILED_SCALING: "inplace" (default
    where the C++ CPU op `cpu_op` is there), "trace" (default elsewhere) or "op"."""
    from vllm.config import CompilationMode

    mode = os.environ.get(ENV_SCALING, "").strip().lower() or ("inplace" if cpu_op else "trace")
    if mode not in ("inplace", "trace", "op"):
        raise ValueError(f"{ENV_SCALING}={mode!r}: expected inplace, trace or op")
    if mode == "inplace" and not cpu_op:
        raise ValueError(f"{ENV_SCALING}=inplace needs the C++ CPU op (a CPU engine with a C++ compiler)")
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
    """Wraps the layer's qkv projection (a QKVParallelLinear, or vLLM's LoRA layer around
    one: the scaling then covers LoRA's delta too): generators at prefill, then
    [Q | K | V] *= the slot row's [l_q | l_k | l_v] for every token (an untargeted part is ones)."""

    scale_op = True  # "op" mode scales with the in-place custom op

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
            rt.scale_(out, self.layer, 0)  # the row's [q | k | v] block
            return out, bias
        # Compiled: the generator reads x before the projection does, so the projection is x's
        # last reader, as in the bare graph, and Inductor can hand x's buffer on after it.
        torch.ops.vllm.pedro_prefill(x, rt.slots.vectors, self.layer)
        out, bias = self.base_layer(x)
        return self.compiled_scaled(out), bias

    def compiled_scaled(self, out):
        rt = self.rt
        if rt.mode == "inplace" and self.scale_op:
            # in place: the projection's buffer is what the attention reads, as in the bare graph
            torch.ops.vllm_pedro_cpu.scale_rows_(out, rt.slots.vectors[self.layer], rt.token_slot[:out.shape[0]], 0,
                                                 rt.slots.ones_row)
            return out
        if rt.mode in ("trace", "inplace") or not self.scale_op:
            # out of place: a plain product torch.compile fuses into what reads qkv
            return reference.scaled(out, rt.slots.vectors[self.layer], rt.token_slot[:out.shape[0]], 0)
        torch.ops.vllm.pedro_scale_qkv(out, self.layer)
        return out


class PedroSiluAndMul(nn.Module):
    """Replaces SiluAndMul: silu(gate) * (up * l_u), the up scaling fused into the activation."""

    def __init__(self, layer: int, runtime, native: nn.Module | None = None):
        super().__init__()
        self.layer, self.rt = layer, runtime
        self.native = native  # the model's own SiluAndMul (eager on the CPU: scale up in place, then it)

    def forward(self, gate_up):
        rt = self.rt
        n, d = gate_up.shape[0], gate_up.shape[1] // 2
        if rt.mode in ("trace", "inplace"):
            return reference.silu_and_mul_scaled(gate_up, rt.slots.vectors[self.layer], rt.token_slot[:n],
                                                 rt.columns["up"])
        if rt.mode == "eager" and rt.cpu_scale is not None and self.native is not None:
            rt.scale_(gate_up[:, d:], self.layer, rt.columns["up"])
            return self.native(gate_up)
        out = torch.empty((n, d), dtype=gate_up.dtype, device=gate_up.device)
        if rt.mode == "eager":
            return rt.ops.silu_and_mul_scaled(gate_up, rt.slots.vectors[self.layer], rt.token_slot, rt.columns["up"],
                                              out)
        torch.ops.vllm.pedro_silu_and_mul(gate_up, out, self.layer)
        return out


class PedroGateUpProj(nn.Module):
    """Wraps the [gate | up] projection (MergedColumnParallelLinear, or a LoRA layer around
    one) of an MLP whose activation is not SiluAndMul: U' = l_u * U before the model's own
    act(gate) * U'."""

    scale_op = True  # "op" mode scales with the in-place custom op

    def __init__(self, base: nn.Module, layer: int, runtime):
        super().__init__()
        self.base_layer, self.layer, self.rt = base, layer, runtime

    def forward(self, x):
        out, bias = self.base_layer(x)
        return self.scaled(out), bias

    def scaled(self, out):
        rt, ff = self.rt, out.shape[1] // 2
        if rt.mode in ("trace", "inplace") or (rt.mode == "op" and not self.scale_op):
            reference.scale_(out[:, ff:], rt.slots.vectors[self.layer], rt.token_slot[:out.shape[0]],
                             rt.columns["up"])
        elif rt.mode == "eager":
            rt.scale_(out[:, ff:], self.layer, rt.columns["up"])
        else:
            torch.ops.vllm.pedro_scale_up(out, self.layer)
        return out


# vLLM's Transformers backend (OLMo 2, ...) runs the transformers modules on a batch of one,
# [1, T, d], and builds its fused linears with return_bias=False (one tensor, no bias): these
# variants run the linear on the flattened [T, d] the scaling takes (so what the scaling writes
# is a tensor of its own, not a view: compiled graphs keep an in-place op on it) and give back
# the batch dimension. Native vLLM models keep the wrappers above, with no reshaping.
def _carry_split_sizes(wrapper: nn.Module, base: nn.Module) -> None:
    # The forward the backend rewrote splits the fused output with self.<proj>.output_sizes
    # and .tp_size (fusers/base.py local_output_sizes): the wrapper answers for the linear.
    while not hasattr(base, "output_sizes"):  # a LoRA layer carries them too; else the linear does
        base = base.base_layer
    for name in ("output_sizes", "tp_size"):
        setattr(wrapper, name, getattr(base, name))


class PedroQKVProjBatched(PedroQKVProj):
    # Compiled graphs of the backend lost the in-place scaling op's write (vLLM 0.32: the
    # tokens of tenants went wrong, base tokens stayed right): "op" mode scales q/k/v out of
    # place here, as "trace" does; the prefill stays an opaque op.
    scale_op = False

    def __init__(self, base: nn.Module, layer: int, runtime):
        super().__init__(base, layer, runtime)
        _carry_split_sizes(self, base)

    def forward(self, x):
        rt, flat = self.rt, x.reshape(-1, x.shape[-1])
        if rt.mode == "eager":
            out = self.base_layer(flat)
            if rt.step is not None:
                pedro_prefill(flat, rt.slots.vectors, self.layer)
            rt.scale_(out, self.layer, 0)
        else:
            torch.ops.vllm.pedro_prefill(flat, rt.slots.vectors, self.layer)
            out = self.compiled_scaled(self.base_layer(flat))
        return out.view(*x.shape[:-1], -1)


class PedroSiluAndMulBatched(PedroSiluAndMul):
    def forward(self, gate_up):
        return super().forward(gate_up.reshape(-1, gate_up.shape[-1])).view(*gate_up.shape[:-1], -1)


class PedroGateUpProjBatched(PedroGateUpProj):
    scale_op = False  # as PedroQKVProjBatched

    def __init__(self, base: nn.Module, layer: int, runtime):
        super().__init__(base, layer, runtime)
        _carry_split_sizes(self, base)

    def forward(self, x):
        return self.scaled(self.base_layer(x.reshape(-1, x.shape[-1]))).view(*x.shape[:-1], -1)


def real_linear(module: nn.Module, cls: type) -> nn.Module | None:
    """The `cls` linear at the end of `module`'s `.base_layer` chain (vLLM's LoRA layers and
    PEDRO's wrappers each hold what they wrap there, to any depth), or None."""
    while not isinstance(module, cls):
        module = getattr(module, "base_layer", None)
        if module is None:
            return None
    return module


def find_vllm_layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(getattr(l, "self_attn", None), "qkv_proj") for l in layers):
        raise TypeError(f"PEDRO found no decoder layers with a fused qkv projection (model.layers[i].self_attn."
                        f"qkv_proj) in vLLM model class {type(model).__name__}")
    return list(layers)


def _activation_name(mlp: nn.Module, cls: type) -> str | None:
    """The name of `mlp`'s child of class `cls` (act_fn in vLLM's models; the transformers
    module's own name under the Transformers backend)."""
    return next((name for name, child in mlp.named_children() if isinstance(child, cls)), None)


def wrap_model(model: nn.Module, runtime, with_up: bool = True) -> list[nn.Module]:
    """Wrap every decoder layer in place; returns the layers. with_up False (a mixture-of-
    experts family): the attention only, the FFN is left alone."""
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    register_ops()
    layers = find_vllm_layers(model)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if isinstance(attn.qkv_proj, PedroQKVProj):
            continue
        qkv = real_linear(attn.qkv_proj, QKVParallelLinear)
        if qkv is None:
            raise TypeError(f"PEDRO: layer {i}'s self_attn.qkv_proj is a {type(attn.qkv_proj).__name__}, not a "
                            "QKVParallelLinear (or a LoRA layer around one)")
        batched = not qkv.return_bias  # the Transformers backend (see PedroQKVProjBatched)
        attn.qkv_proj = (PedroQKVProjBatched if batched else PedroQKVProj)(attn.qkv_proj, i, runtime)
        if not with_up:
            continue
        mlp = getattr(layer, "mlp", None)
        gate_up = real_linear(getattr(mlp, "gate_up_proj", None), MergedColumnParallelLinear)
        if gate_up is None or len(gate_up.output_sizes) != 2:
            raise TypeError(f"PEDRO: layer {i} has no fused [gate | up] projection (mlp.gate_up_proj, a "
                            f"MergedColumnParallelLinear of two parts); found "
                            f"{type(getattr(mlp, 'gate_up_proj', None)).__name__}")
        if gate_up.return_bias != qkv.return_bias:
            raise TypeError(f"PEDRO: layer {i}'s qkv_proj and gate_up_proj differ in return_bias")
        act = _activation_name(mlp, SiluAndMul)
        if act is not None:
            native = getattr(mlp, act)
            setattr(mlp, act, (PedroSiluAndMulBatched if batched else PedroSiluAndMul)(i, runtime, native))
        else:  # GeluAndMul (Gemma) and others: scale the up half of gate_up_proj's output
            mlp.gate_up_proj = (PedroGateUpProjBatched if batched else PedroGateUpProj)(mlp.gate_up_proj, i, runtime)
    return layers
