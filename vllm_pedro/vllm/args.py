"""PEDRO's engine options. They travel inside vLLM's `additional_config["pedro"]`, the
public place for plugin settings, so every process (front end, engine core, workers)
sees the same values."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..config import TARGETS

ADDITIONAL_CONFIG_KEY = "pedro"


@dataclass
class PedroModule:
    name: str
    path: str
    base_model_name: str | None = None

    @classmethod
    def parse(cls, text: str) -> PedroModule:
        """`name=path` or the JSON form {"name":..., "path":..., "base_model_name":...}."""
        text = text.strip()
        if text.startswith("{"):
            try:
                d = json.loads(text)
                return cls(name=d["name"], path=d["path"], base_model_name=d.get("base_model_name"))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"invalid --pedro-modules JSON {text!r}: {e}") from e
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"invalid --pedro-modules entry {text!r}: expected name=path or JSON")
        return cls(name=name, path=path)


@dataclass
class PedroArgs:
    max_adapters: int = 4
    max_rank: int = 16
    targets: tuple[str, ...] = ("q", "v", "up")
    modules: list[PedroModule] = field(default_factory=list)

    def __post_init__(self):
        self.targets = tuple(t for t in TARGETS if t in self.targets)
        self.modules = [m if isinstance(m, PedroModule) else PedroModule(**m) for m in self.modules]
        if self.max_adapters < 1:
            raise ValueError("max_pedro_adapters must be >= 1")
        if self.max_rank < 1:
            raise ValueError("max_pedro_rank must be >= 1")
        names = [m.name for m in self.modules]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate PEDRO adapter names in {names}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_vllm_config(cls, vllm_config) -> PedroArgs:
        extra = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
        if extra is None:
            raise RuntimeError("PEDRO worker started without additional_config['pedro']")
        return cls(**extra)


def pedro_enabled(vllm_config) -> bool:
    return ADDITIONAL_CONFIG_KEY in (getattr(vllm_config, "additional_config", None) or {})


def engine_kwargs(args: PedroArgs, device: str) -> dict:
    """What PEDRO sets in vLLM's engine arguments. Chunked prefill is off so that every
    PEDRO prompt is prefilled in one step (its vectors depend on all of it)."""
    worker = ("vllm_pedro.vllm.worker.PedroCPUWorker" if device == "cpu"
              else "vllm_pedro.vllm.worker.PedroGPUWorker")
    return {"enable_chunked_prefill": False, "worker_cls": worker,
            "additional_config": {ADDITIONAL_CONFIG_KEY: args.to_dict()}}
