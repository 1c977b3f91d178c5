"""Save, load and validate PEDRO adapters: a folder with adapter_config.json and
adapter_model.safetensors. Never pickle."""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, WEIGHTS_NAME, AdapterError, BaseShapes, PedroConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def expected_tensor_shapes(config: PedroConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an adapter must hold, by name, with its shape."""
    s = config.base_shapes
    if s is None:
        raise AdapterError("adapter_config.json has no base_shapes")
    d, r, out = s.hidden_size, config.r, config.out_size
    shapes = {}
    for i in range(s.num_layers):
        p = f"generators.{i}."
        if config.pooler == "attention":
            shapes[p + "pool_w"] = (d,)
        shapes[p + "down.weight"] = (r, d)
        shapes[p + "down.bias"] = (r,)
        if config.activation == "rational":
            shapes[p + "rat_num"] = (7,)
            shapes[p + "rat_den"] = (5,)
        shapes[p + "up.weight"] = (out, r)
        shapes[p + "up.bias"] = (out,)
    return shapes


def check_base_shapes(config: PedroConfig, base: BaseShapes, base_name: str = "the base model") -> None:
    """Refuse an adapter made for a different base, naming what differs."""
    mine = config.base_shapes
    if mine is None:
        raise AdapterError("adapter_config.json has no base_shapes")
    for field in ("num_layers", "hidden_size", "q_size", "kv_size", "ff_size"):
        a, b = getattr(mine, field), getattr(base, field)
        if a != b:
            raise AdapterError(
                f"adapter was made for another base model: {field} is {a} in the adapter "
                f"(base {config.base_model_name_or_path!r}) but {b} in {base_name}")


def validate_tensors(config: PedroConfig, tensors: dict[str, torch.Tensor]) -> None:
    expected = expected_tensor_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(f"adapter is missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise AdapterError(f"adapter has unexpected tensors: {unexpected[:5]}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise AdapterError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point():
            raise AdapterError(f"tensor {name!r} has dtype {t.dtype}, expected a floating point type")
        if not torch.isfinite(t).all():
            raise AdapterError(f"tensor {name!r} holds non-finite values (nan or inf)")


def save_adapter(directory: str, config: PedroConfig, tensors: dict[str, torch.Tensor]) -> None:
    validate_tensors(config, tensors)
    os.makedirs(directory, exist_ok=True)
    config.save(directory)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt", "method": "pedro"})


def load_adapter(directory: str, base: BaseShapes | None = None,
                 device: str | torch.device = "cpu") -> tuple[PedroConfig, dict[str, torch.Tensor]]:
    """Load and fully validate an adapter; with `base`, also check it fits that model."""
    if not os.path.isdir(directory):
        raise AdapterError(f"adapter directory {directory!r} does not exist")
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        pickles = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise AdapterError(f"refusing to load pickle file {pickles[0]!r} in {directory!r}: "
                               f"PEDRO adapters are read only from {WEIGHTS_NAME}")
        raise AdapterError(f"missing {WEIGHTS_NAME} in adapter directory {directory!r}")
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        raise AdapterError(f"missing {CONFIG_NAME} in adapter directory {directory!r}")
    config = PedroConfig.load(directory)
    if base is not None:
        check_base_shapes(config, base)
    try:
        tensors = load_file(weights, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{weights} is not a valid safetensors file: {e}") from e
    validate_tensors(config, tensors)
    return config, tensors
