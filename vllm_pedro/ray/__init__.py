"""PEDRO on Ray: many replicas serving every tenant (Ray Serve), batch inference over
a cluster (Ray Data), and engines whose workers run as Ray actors (vLLM's Ray executor).

Modules (each imports Ray and vLLM only when used):

* `serve`  -- `build_app(args)`: a Ray Serve application of N vLLM replicas with PEDRO,
  each serving every tenant behind one OpenAI-compatible endpoint; `vllm-pedro ray-serve`
  (`cli`) starts it from `vllm serve` flags.
* `batch`  -- `generate(dataset, model, ...)`: Ray Data batch inference where each row
  names its tenant, on M actors each holding one `vllm_pedro.LLM` engine.
* `engine` / `worker` -- PEDRO engine arguments whose worker class is resolved inside
  each worker process (Ray actors included), so a CPU-only driver can start GPU engines.

A PEDRO adapter is a few MB and read only at prefill, so every replica or actor holds
every tenant and nothing routes by adapter.
"""
