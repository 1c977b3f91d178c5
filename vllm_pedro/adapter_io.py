"""Save, read and validate PEDRO adapters: a folder with adapter_config.json and
adapter_model.safetensors. Never pickle.

Adapter folders are untrusted input (a tenant's upload, a folder that changes under a
running server), so reading is strict and happens once: `read_adapter_files` opens each
file without following a final symlink, refuses anything but a regular file (no FIFOs or
devices), bounds every size before reading, and, with `allowed_roots`, checks the real
path of every file it opened (after opening, so a swap between check and open is caught)
and refuses hard links. What it read is returned as bytes with their sha256 `digest`;
`parse_adapter` validates those bytes, the safetensors header before any tensor is built
(names, shapes, dtypes refused by name). Error messages name files, tensors and shapes,
never file content.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .config import (CONFIG_NAME, RATIONAL_DEN_COEFFS, RATIONAL_NUM_COEFFS, WEIGHTS_NAME, AdapterError,
                     AdapterMissingError, BaseShapes, PedroConfig, parse_json)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1 << 16
MAX_HEADER_BYTES = 1 << 20  # a safetensors header of a 100-layer adapter is ~60 KB
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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
            shapes[p + "rat_num"] = (RATIONAL_NUM_COEFFS,)
            shapes[p + "rat_den"] = (RATIONAL_DEN_COEFFS,)
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


def _check_names_and_shapes(expected: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise AdapterError(f"adapter is missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise AdapterError(f"adapter has unexpected tensors: {unexpected[:5]}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise AdapterError(f"tensor {name!r} has shape {tuple(shapes[name])}, expected {shape}")


def validate_tensors(config: PedroConfig, tensors: dict[str, torch.Tensor]) -> None:
    _check_names_and_shapes(expected_tensor_shapes(config), {k: tuple(v.shape) for k, v in tensors.items()})
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES.values():
            raise AdapterError(f"tensor {name!r} has dtype {t.dtype}; PEDRO adapters hold float32, float16 "
                               "or bfloat16")
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    # One finiteness check per dtype over all tensors (an adapter has ~7 tensors per layer:
    # hundreds of small checks cost more than the copy); the offender is named only on failure.
    if not all(bool(torch.isfinite(torch.cat(flat)).all()) for flat in by_dtype.values()):
        name = next(n for n, t in tensors.items() if not torch.isfinite(t).all())
        raise AdapterError(f"tensor {name!r} holds non-finite values (nan or inf)")


def save_adapter(directory: str, config: PedroConfig, tensors: dict[str, torch.Tensor]) -> None:
    validate_tensors(config, tensors)
    os.makedirs(directory, exist_ok=True)
    config.save(directory)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt", "method": "pedro"})


# -- reading --------------------------------------------------------------------------------
def is_under(path: str, roots: list[str]) -> bool:
    """Whether the real path `path` lies inside one of the real paths `roots`."""
    for root in roots:
        try:
            if os.path.commonpath([path, root]) == root:
                return True
        except ValueError:  # different drives
            continue
    return False


def _read_file(directory: str, name: str, max_bytes: int, allowed_roots: list[str] | None) -> bytes:
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    if allowed_roots is not None and not is_under(real, allowed_roots):
        raise AdapterError(f"{name} in {directory!r} resolves outside the allowed roots (a symlink or '..' "
                           "that leaves them)")
    try:
        # O_NOFOLLOW: a final component swapped for a symlink since realpath fails here;
        # O_NONBLOCK: opening a FIFO does not wait for a writer.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise AdapterMissingError(f"missing {name} in adapter directory {directory!r}") from None
    except OSError as e:
        why = "it was replaced by a symlink while being opened" if e.errno == errno.ELOOP else e.strerror
        raise AdapterError(f"cannot open {name} in {directory!r}: {why}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterError(f"{name} in {directory!r} is not a regular file")
        if allowed_roots is not None:
            opened = _opened_path(fd, real)
            if not is_under(opened, allowed_roots):
                raise AdapterError(f"{name} in {directory!r} moved outside the allowed roots while being opened")
            if st.st_nlink > 1:
                raise AdapterError(f"{name} in {directory!r} has {st.st_nlink} hard links; a hard link can alias "
                                   "a file outside the allowed roots, so it is refused")
        if st.st_size > max_bytes:
            raise AdapterError(f"{name} in {directory!r} is {st.st_size} bytes, more than the {max_bytes} "
                               "bytes it may have (for the weights: what the config's shapes need)")
        chunks, left = [], max_bytes + 1
        while left > 0:
            b = os.read(fd, min(left, 1 << 22))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise AdapterError(f"{name} in {directory!r} grew past {max_bytes} bytes while being read")
        return data
    finally:
        os.close(fd)


def _opened_path(fd: int, fallback: str) -> str:
    """The real path of the file behind fd (Linux: /proc/self/fd), else `fallback`."""
    try:
        return os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return fallback


def _check_directory(directory: str, allowed_roots: list[str] | None) -> None:
    if not os.path.isdir(directory):
        raise AdapterMissingError(f"adapter directory {directory!r} does not exist")
    if allowed_roots is not None and not is_under(os.path.realpath(directory), allowed_roots):
        raise AdapterError(f"adapter directory {directory!r} is not inside an allowed root")


def read_config_bytes(directory: str, allowed_roots: list[str] | None = None) -> bytes:
    _check_directory(directory, allowed_roots)
    return _read_file(directory, CONFIG_NAME, MAX_CONFIG_BYTES, allowed_roots)


def load_config(directory: str, allowed_roots: list[str] | None = None) -> PedroConfig:
    """The adapter_config.json of an adapter folder, read as read_adapter_files does."""
    return PedroConfig.from_json_bytes(read_config_bytes(directory, allowed_roots),
                                       os.path.join(directory, CONFIG_NAME))


@dataclass(frozen=True)
class AdapterFiles:
    """The bytes of an adapter folder as read once, and their sha256."""

    directory: str
    config_bytes: bytes
    weights_bytes: bytes

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for part in (self.config_bytes, self.weights_bytes):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.hexdigest()


def read_adapter_files(directory: str, allowed_roots: list[str] | None = None) -> AdapterFiles:
    """Read an adapter folder once (see the module docstring for what is refused).
    `allowed_roots`: real paths every file must stay inside, or None for no such check."""
    if allowed_roots is not None:
        allowed_roots = [os.path.realpath(r) for r in allowed_roots]
    _check_directory(directory, allowed_roots)
    if not os.path.lexists(os.path.join(directory, WEIGHTS_NAME)):
        pickles = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise AdapterError(f"refusing to load pickle file {pickles[0]!r} in {directory!r}: "
                               f"PEDRO adapters are read only from {WEIGHTS_NAME}")
        raise AdapterMissingError(f"missing {WEIGHTS_NAME} in adapter directory {directory!r}")
    config_bytes = _read_file(directory, CONFIG_NAME, MAX_CONFIG_BYTES, allowed_roots)
    config = PedroConfig.from_json_bytes(config_bytes, os.path.join(directory, CONFIG_NAME))
    # Every tensor at 4 bytes per element, plus the header: a bound known before reading.
    numel = sum(_numel(s) for s in expected_tensor_shapes(config).values())
    weights_bytes = _read_file(directory, WEIGHTS_NAME, 8 + MAX_HEADER_BYTES + 4 * numel, allowed_roots)
    return AdapterFiles(directory, config_bytes, weights_bytes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _safetensors_header(data: bytes, where: str) -> dict:
    if len(data) < 8:
        raise AdapterError(f"{where} is not a valid safetensors file: {len(data)} bytes")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise AdapterError(f"{where} is not a valid safetensors file: a header of {n} bytes "
                           f"(at most {MAX_HEADER_BYTES}, and within the file's {len(data)} bytes)")
    try:
        header = parse_json(data[8:8 + n], "its header")
    except AdapterError as e:
        raise AdapterError(f"{where} is not a valid safetensors file: {e}") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{where} is not a valid safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list) \
                or not all(isinstance(x, int) and x >= 0 for x in info["shape"]):
            raise AdapterError(f"{where} is not a valid safetensors file: bad entry for tensor {name!r}")
        dtype = info.get("dtype")
        if dtype not in SAFETENSORS_DTYPES:
            raise AdapterError(f"tensor {name!r} has dtype {dtype!r}; PEDRO adapters hold float32, float16 or "
                               "bfloat16 (F32, F16, BF16)")
    return header


def parse_adapter(files: AdapterFiles, base: BaseShapes | None = None,
                  device: str | torch.device = "cpu") -> tuple[PedroConfig, dict[str, torch.Tensor]]:
    """Validate what read_adapter_files read; with `base`, also check it fits that model."""
    where = os.path.join(files.directory, WEIGHTS_NAME)
    config = PedroConfig.from_json_bytes(files.config_bytes, os.path.join(files.directory, CONFIG_NAME))
    if base is not None:
        check_base_shapes(config, base)
    header = _safetensors_header(files.weights_bytes, where)
    _check_names_and_shapes(expected_tensor_shapes(config), {k: tuple(v["shape"]) for k, v in header.items()})
    try:
        tensors = load_safetensors(files.weights_bytes)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{where} is not a valid safetensors file: {e}") from e
    validate_tensors(config, tensors)
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return config, tensors


def load_adapter(directory: str, base: BaseShapes | None = None, device: str | torch.device = "cpu",
                 allowed_roots: list[str] | None = None) -> tuple[PedroConfig, dict[str, torch.Tensor]]:
    """Read, then fully validate an adapter; with `base`, also check it fits that model."""
    return parse_adapter(read_adapter_files(directory, allowed_roots), base, device)


def adapter_dir_entry(root: str, name: str) -> str:
    """The adapter folder of tenant `name` in the adapter directory `root`: root/name, where
    name is one path segment (no '/', '..', leading '.', NUL) and the folder's real path is
    directly inside root's (a symlink leaving root is refused). Raises AdapterError; a
    missing folder raises FileNotFoundError."""
    if not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\\0") \
            or len(name) > 255:
        raise AdapterError(f"{name!r} is not a tenant name (one path segment, not starting with '.')")
    real_root = os.path.realpath(root)
    path = os.path.join(real_root, name)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no adapter folder {name!r} in the adapter directory")
    if os.path.dirname(os.path.realpath(path)) != real_root:
        raise AdapterError(f"adapter folder {name!r} resolves outside the adapter directory")
    return path
