"""PEDRO's serving options: the dataclass every process reads, the command-line flags, and
their translation into vLLM engine arguments.

The options travel inside vLLM's `additional_config["pedro"]`, the public place for plugin
settings, so the front end, the engine core (scheduler) and the workers see the same values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

from ..config import TARGETS
from .request import tenant_name_problem

ADDITIONAL_CONFIG_KEY = "pedro"
SCHEDULER_CLS = "vllm_pedro.vllm.scheduler.PedroScheduler"
WORKER_CLS = {"cpu": "vllm_pedro.vllm.worker.PedroCPUWorker", "cuda": "vllm_pedro.vllm.worker.PedroGPUWorker"}


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
    max_adapters: int = 4  # device adapter-cache rows: distinct adapters prefilled in one step
    max_cpu_adapters: int | None = None  # host store; None: sized from memory at engine start
    max_rank: int = 16
    targets: tuple[str, ...] = ("q", "v", "up")
    modules: list[PedroModule] = field(default_factory=list)
    adapter_dir: str | None = None  # tenants resolved by name: adapter_dir/NAME
    metrics_tenant_labels: int = 0  # tenants with their own /metrics label (0: none)
    stats_path: str | None = None  # where the engine core writes PEDRO's numbers for /metrics (metrics.py)

    def __post_init__(self):
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise ValueError(f"PEDRO targets: unknown or no targets {unknown or list(targets)}; choose from "
                             f"{' '.join(TARGETS)}")
        self.targets = tuple(t for t in TARGETS if t in targets)
        self.modules = [m if isinstance(m, PedroModule) else PedroModule(**m) for m in self.modules]
        if self.max_adapters < 1:
            raise ValueError("max_pedro_adapters must be >= 1")
        if self.max_cpu_adapters is not None and self.max_cpu_adapters < self.max_adapters:
            raise ValueError(f"max_cpu_pedro_adapters ({self.max_cpu_adapters}) must be at least "
                             f"max_pedro_adapters ({self.max_adapters}): the device cache is fed from the host store")
        if self.max_rank < 1:
            raise ValueError("max_pedro_rank must be >= 1")
        if self.metrics_tenant_labels < 0:
            raise ValueError("pedro_metrics_tenant_labels must be >= 0")
        for m in self.modules:
            problem = tenant_name_problem(m.name)
            if problem:
                raise ValueError(f"--pedro-modules: the tenant name {m.name!r} {problem}")
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
            raise RuntimeError("PEDRO component started without additional_config['pedro']")
        return cls(**extra)


def pedro_enabled(vllm_config) -> bool:
    return ADDITIONAL_CONFIG_KEY in (getattr(vllm_config, "additional_config", None) or {})


def engine_kwargs(args: PedroArgs, device: str) -> dict:
    """What PEDRO sets in vLLM's engine arguments: its worker and scheduler classes (public
    options) and the options for every process. Chunked prefill is left as the user has it
    (vLLM's default: on): the PEDRO scheduler prefills each PEDRO prompt whole, in one step,
    and chunks the rest as vLLM does."""
    if device not in WORKER_CLS:
        raise ValueError(f"PEDRO runs on CPU and CUDA devices, not {device!r}")
    return {"worker_cls": WORKER_CLS[device], "scheduler_cls": SCHEDULER_CLS,
            "additional_config": {ADDITIONAL_CONFIG_KEY: args.to_dict()}}


def merge_engine_kwargs(kwargs: dict, args: PedroArgs, device: str) -> dict:
    """`kwargs` (vLLM engine arguments) with PEDRO's set; refuses settings PEDRO overrides."""
    if args.stats_path is None:
        from .metrics import default_stats_path

        args.stats_path = default_stats_path()  # this front end reads what the engine core writes there
    extra = engine_kwargs(args, device)
    for key in ("worker_cls", "scheduler_cls"):
        if kwargs.get(key) not in (None, "auto", extra[key]):
            raise ValueError(f"PEDRO sets {key}; {key}={kwargs[key]!r} cannot be used with it")
    additional = {**(kwargs.get("additional_config") or {}), **extra.pop("additional_config")}
    return {**kwargs, **extra, "additional_config": additional}


# -- command-line flags -------------------------------------------------------------------
def add_cli_args(parser) -> None:
    """The PEDRO option group; a no-op on a parser that has it (the general plugin adds
    it to every parser built from vLLM's engine arguments, patches.py)."""
    if "--enable-pedro" in parser._option_string_actions:
        return
    d = PedroArgs()
    g = parser.add_argument_group("PEDRO", "PEDRO prompt-dependent adapters (vllm-pedro).")
    g.add_argument("--enable-pedro", action="store_true", default=False,
                   help="Serve PEDRO adapters (the PEDRO scheduler and worker). Chunked prefill stays as "
                        "set: a PEDRO prompt is prefilled whole in one step with room for it (a longer prompt "
                        "than --max-num-batched-tokens fails alone), every other prompt is chunked as usual. "
                        "LoRA adapters (--enable-lora) are served beside PEDRO tenants.")
    g.add_argument("--pedro-modules", nargs="+", default=None, metavar="MODULE",
                   help="PEDRO adapters served from the start, as name=path or as JSON "
                        "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}' (like --lora-modules). "
                        "Requests select one with \"model\": name. An adapter that does not fit the model "
                        "stops the server start.")
    g.add_argument("--pedro-adapter-dir", default=None, metavar="DIR",
                   help="Serve every tenant under DIR by name: a request for \"model\": NAME is served from "
                        "DIR/NAME when that folder holds a PEDRO adapter for this base model (names are single "
                        "path segments; an unknown name is a 404, a malformed folder a 400).")
    g.add_argument("--max-pedro-adapters", type=int, default=d.max_adapters,
                   help="Rows of the device adapter cache: the most distinct adapters whose prompts are "
                        "prefilled in one step (more prefills wait a step). Decoding uses no rows: any number "
                        "of tenants decode together.")
    g.add_argument("--max-cpu-pedro-adapters", type=int, default=None,
                   help="Adapters kept validated in host memory (LRU), so an adapter is read from disk once "
                        "while it stays there. Default: sized from 10%% of the host memory.")
    g.add_argument("--max-pedro-rank", type=int, default=d.max_rank,
                   help="Largest generator rank r of a served adapter.")
    g.add_argument("--pedro-targets", nargs="+", default=list(d.targets), metavar="TARGET",
                   help=f"Projections whose outputs PEDRO vectors may scale, any of {' '.join(TARGETS)} (space or "
                        "comma separated); adapters with other targets are refused.")
    g.add_argument("--pedro-metrics-tenant-labels", type=int, default=d.metrics_tenant_labels, metavar="N",
                   help="Give the first N tenants their own `tenant` label on vllm:pedro_tenant_requests_total in "
                        "/metrics (the rest are counted as __other__). 0 (default): no per-tenant series.")
    g.add_argument("--pedro-allowed-roots", nargs="+", default=[], metavar="DIR",
                   help="Directories from which POST /v1/load_pedro_adapter may load adapters (the real path "
                        "of every file of an adapter must lie inside one). None: no runtime loading. Runtime "
                        "loading also needs VLLM_ALLOW_RUNTIME_PEDRO_UPDATING=1.")


def apply_cli_args(args: argparse.Namespace, device: str | None = None) -> PedroArgs | None:
    """Check the PEDRO flags and turn them into vLLM engine arguments on `args` (which
    EngineArgs.from_cli_args then reads). Raises ValueError on bad flags. Applying it
    twice changes nothing."""
    if getattr(args, "_pedro_args", None) is not None:
        return args._pedro_args
    if getattr(args, "model_tag", None) is not None:
        args.model = args.model_tag
    if not getattr(args, "enable_pedro", False):
        given = [f"--{f.replace('_', '-')}" for f in ("pedro_modules", "pedro_allowed_roots", "pedro_adapter_dir")
                 if getattr(args, f, None)]
        if given:
            raise ValueError(f"{', '.join(given)} need(s) --enable-pedro")
        return None
    targets = tuple(t for v in args.pedro_targets for t in v.split(",") if t)
    pargs = PedroArgs(max_adapters=args.max_pedro_adapters, max_cpu_adapters=args.max_cpu_pedro_adapters,
                      max_rank=args.max_pedro_rank, targets=targets,
                      modules=[PedroModule.parse(m) for m in (args.pedro_modules or [])],
                      adapter_dir=args.pedro_adapter_dir, metrics_tenant_labels=args.pedro_metrics_tenant_labels)
    lora_names = {m.name for m in (getattr(args, "lora_modules", None) or [])}
    clash = sorted(lora_names & {m.name for m in pargs.modules})
    if clash:
        raise ValueError(f"--lora-modules and --pedro-modules both name {', '.join(clash)}: LoRA and PEDRO adapters "
                         "share one set of names (the \"model\" of a request)")
    if getattr(args, "api_server_count", None) not in (None, 1) or getattr(args, "headless", False):
        raise ValueError("PEDRO serving runs one API server process: drop --api-server-count / --headless")
    if getattr(args, "grpc", False):
        raise ValueError("PEDRO serving is HTTP only: drop --grpc")
    if device is None:
        from vllm.platforms import current_platform
        device = current_platform.device_type
    current = {"worker_cls": args.worker_cls, "scheduler_cls": getattr(args, "scheduler_cls", None),
               "additional_config": args.additional_config}
    merged = merge_engine_kwargs(current, pargs, device)
    for key in ("worker_cls", "scheduler_cls", "additional_config"):
        setattr(args, key, merged[key])
    args._pedro_args = pargs
    return pargs
