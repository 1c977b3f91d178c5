"""PedroConfig: the dataclass that is an adapter's `adapter_config.json`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from dataclasses import dataclass, field

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

POOLERS = ("attention", "last", "mean")
ACTIVATIONS = ("rational", "gelu", "relu", "silu")
# The rational activation is a Pade unit of numerator degree 6 and denominator degree 5
# (SPEC.md section 1): this many coefficients each.
RATIONAL_NUM_COEFFS = 7
RATIONAL_DEN_COEFFS = 5
TARGETS = ("q", "k", "v", "up")  # the canonical order of vector columns
DTYPES = ("float32", "float16", "bfloat16")


class AdapterError(ValueError):
    """A PEDRO adapter that is malformed or does not fit the base model."""


class AdapterMissingError(AdapterError):
    """A PEDRO adapter whose folder or files are not there."""


@dataclass
class BaseShapes:
    """The shapes of the base model an adapter is made for."""

    num_layers: int
    hidden_size: int  # d: what the generator reads
    q_size: int  # d_q: query projection width (heads * head_dim)
    kv_size: int  # d_k = d_v: key/value width (the KV width under GQA)
    ff_size: int  # d_ff: FFN up projection width

    def width(self, target: str) -> int:
        return {"q": self.q_size, "k": self.kv_size, "v": self.kv_size, "up": self.ff_size}[target]

    @classmethod
    def from_hf_config(cls, hf_config) -> BaseShapes:
        """The shapes of a model of a supported family (families.py) from its transformers
        config (a multimodal config's text_config is used). head_dim as the config gives it
        where it does (Gemma, Qwen3, GLM-4, ...: not hidden_size / heads), else hidden_size /
        heads; ff_size is intermediate_size (a mixture-of-experts model has no `up` target)."""
        text = getattr(hf_config, "text_config", None) or hf_config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                   q_size=heads * head_dim, kv_size=kv_heads * head_dim, ff_size=text.intermediate_size)


@dataclass
class PedroConfig:
    """What a PEDRO adapter is. Method options first, then what it was made for."""

    r: int = 16
    pooler: str = "attention"
    activation: str = "rational"
    targets: tuple[str, ...] = ("q", "v", "up")
    dtype: str = "float32"
    # Filled in when the adapter is attached to a base model.
    base_model_name_or_path: str | None = None
    base_shapes: BaseShapes | None = None
    method: str = "pedro"
    version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.base_shapes, dict):
            self.base_shapes = BaseShapes(**self.base_shapes)
        self.targets = tuple(self.targets)
        self.validate()

    def validate(self) -> None:
        if self.method != "pedro":
            raise AdapterError(f"adapter method is {self.method!r}, expected 'pedro'")
        if self.version != FORMAT_VERSION:
            raise AdapterError(f"adapter format version {self.version} is not supported "
                               f"(this vllm_pedro reads version {FORMAT_VERSION})")
        if not isinstance(self.r, int) or self.r < 1:
            raise AdapterError(f"r must be a positive integer, got {self.r!r}")
        if self.pooler not in POOLERS:
            raise AdapterError(f"unknown pooler {self.pooler!r}; choose one of {POOLERS}")
        if self.activation not in ACTIVATIONS:
            raise AdapterError(f"unknown activation {self.activation!r}; choose one of {ACTIVATIONS}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise AdapterError(f"unknown or empty targets {list(self.targets)!r}; choose a subset of {TARGETS}")
        if len(set(self.targets)) != len(self.targets):
            raise AdapterError(f"duplicate targets in {list(self.targets)!r}")
        # Canonical order makes the vector layout independent of how the user listed them.
        self.targets = tuple(t for t in TARGETS if t in self.targets)
        if self.dtype not in DTYPES:
            raise AdapterError(f"unknown dtype {self.dtype!r}; choose one of {DTYPES}")
        if self.base_shapes is not None:
            if not isinstance(self.base_shapes, BaseShapes):
                raise AdapterError(f"base_shapes must be an object of shapes, got {self.base_shapes!r}")
            for k, v in dataclasses.asdict(self.base_shapes).items():
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise AdapterError(f"base_shapes.{k} must be a positive integer, got {v!r}")

    # Vector layout: one row per request and layer, the targets' vectors side by side.
    def target_columns(self) -> dict[str, tuple[int, int]]:
        """target -> (first column, width) in the generator's output row."""
        assert self.base_shapes is not None, "config not attached to a base model"
        cols, start = {}, 0
        for t in self.targets:
            w = self.base_shapes.width(t)
            cols[t] = (start, w)
            start += w
        return cols

    @property
    def out_size(self) -> int:
        return sum(w for _, w in self.target_columns().values())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PedroConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdapterError(f"adapter_config.json has unknown keys {unknown}")
        try:
            return cls(**d)
        except TypeError as e:
            raise AdapterError(f"adapter_config.json is malformed: {e}") from e

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_json_bytes(cls, data: bytes, where: str = CONFIG_NAME) -> PedroConfig:
        """Parse the bytes of an adapter_config.json (the reader in adapter_io bounds their
        size; the nesting depth is bounded here)."""
        d = parse_json(data, where)
        if not isinstance(d, dict):
            raise AdapterError(f"{where} must hold a JSON object")
        return cls.from_dict(d)


# A string, or an unterminated one up to the end of the text (json.loads refuses that before it
# could recurse into the brackets in it): every match from a quote succeeds without
# backtracking, so the scan stays linear on hostile input (a header of escaped quotes).
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.|\\\Z)*(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
MAX_JSON_DEPTH = 32  # adapter_config.json nests 2 deep; a safetensors header 3


def parse_json(data: bytes, where: str, max_depth: int = MAX_JSON_DEPTH):
    """json.loads of untrusted bytes: the nesting depth is checked before parsing (100,000
    nested brackets must be a clear error, not a RecursionError), and the error names the
    file and position but never quotes its content."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdapterError(f"{where} is not UTF-8 text (byte {e.start})") from None
    # The brackets outside strings, then their running depth: C-speed scans (a safetensors
    # header of a few hundred tensors is tens of KB and is read at every cold load).
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    if brackets and max(itertools.accumulate(1 if c in "[{" else -1 for c in brackets)) > max_depth:
        raise AdapterError(f"{where} nests deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
