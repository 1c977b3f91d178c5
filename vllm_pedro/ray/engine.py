"""vLLM engine arguments with PEDRO for engines that Ray starts.

The same arguments as `vllm_pedro.vllm.args.merge_engine_kwargs` (PEDRO's scheduler,
the options in `additional_config["pedro"]`), except the worker:
the process that builds them (a `vllm-pedro ray-serve` driver, a `serve run` builder)
need not run on the platform of the engine's workers, so they name the worker resolved
in each worker process (worker.py).
"""

from __future__ import annotations

from .worker import WORKER_CLS


def pedro_args(options: dict | None):
    """PedroArgs from a dict of their fields (`modules` as "name=path" strings, JSON
    strings or dicts), or of the command-line names (pedro_modules, pedro_adapter_dir,
    max_pedro_adapters, max_cpu_pedro_adapters, max_pedro_rank, pedro_targets)."""
    from ..vllm.args import PedroArgs, PedroModule

    cli_names = {"pedro_modules": "modules", "pedro_adapter_dir": "adapter_dir", "max_pedro_adapters": "max_adapters",
                 "max_cpu_pedro_adapters": "max_cpu_adapters", "max_pedro_rank": "max_rank",
                 "pedro_targets": "targets"}
    fields = {cli_names.get(k, k): v for k, v in (options or {}).items()}
    for key in ("max_adapters", "max_cpu_adapters", "max_rank"):  # `serve run ... key=value` gives strings
        if isinstance(fields.get(key), str):
            fields[key] = int(fields[key])
    modules = fields.get("modules") or []
    if isinstance(modules, str):  # "a=/x b=/y"
        modules = modules.split()
    if isinstance(modules, dict):  # {"name": "path"}
        modules = [f"{n}={p}" for n, p in modules.items()]
    fields["modules"] = [PedroModule.parse(m) if isinstance(m, str) else m for m in modules]
    targets = fields.get("targets")
    if isinstance(targets, str):
        fields["targets"] = tuple(t for t in targets.replace(",", " ").split() if t)
    return PedroArgs(**fields)


def pedro_engine_kwargs(engine_kwargs: dict, pedro) -> dict:
    """`engine_kwargs` with PEDRO's settings for an engine Ray starts; `pedro` is a
    PedroArgs or a dict for pedro_args(). Refuses what PEDRO overrides."""
    from ..vllm.args import PedroArgs, merge_engine_kwargs

    pargs = pedro if isinstance(pedro, PedroArgs) else pedro_args(pedro)
    kwargs = dict(engine_kwargs)
    if kwargs.get("worker_cls") not in (None, "auto", WORKER_CLS):
        raise ValueError(f"PEDRO sets worker_cls; worker_cls={kwargs['worker_cls']!r} cannot be used with it")
    kwargs.pop("worker_cls", None)
    merged = merge_engine_kwargs(kwargs, pargs, "cuda")  # "cuda": any platform; the worker is replaced below
    merged["worker_cls"] = WORKER_CLS
    return merged
