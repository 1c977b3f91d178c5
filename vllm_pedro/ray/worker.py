"""A `worker_cls` for PEDRO that is resolved where the worker runs.

PEDRO's front ends name a platform's worker (`vllm_pedro.vllm.worker.PedroCPUWorker` or
`PedroGPUWorker`) from the platform of the process that builds the engine arguments.
On a Ray cluster that process can be a CPU-only head node (the `vllm-pedro ray-serve`
driver, a `serve run` builder) while the workers run on GPU nodes, so the Ray front ends
name `vllm_pedro.ray.worker.PedroWorker` instead: vLLM resolves `worker_cls` by its
qualified name inside each worker process (`WorkerWrapperBase.init_worker`, the path
both the multiprocessing and the Ray executors take, Ray actors included), and this
module answers with the worker for that process's platform.

It also calls the plugin's `register()` there (idempotent): vLLM loads
`vllm.general_plugins` in every worker before it resolves `worker_cls`, but only where
the vllm-pedro distribution (its entry points) is installed and `VLLM_PLUGINS` allows it;
a Ray node that got the package through a `runtime_env` (py_modules, working_dir) has the
code without the entry point, and would skip the vLLM version check.
"""

from __future__ import annotations

WORKER_CLS = "vllm_pedro.ray.worker.PedroWorker"


def platform_worker() -> type:
    """PEDRO's worker class for this process's vLLM platform, the plugin registered."""
    from vllm.platforms import current_platform

    from ..vllm import worker
    from ..vllm.plugin import register

    register()  # idempotent: the vLLM version check and the PEDRO ops, entry point or not
    device = current_platform.device_type
    if device == "cuda":
        return worker.PedroGPUWorker
    if device == "cpu":
        return worker.PedroCPUWorker
    raise RuntimeError(f"PEDRO runs on CPU and CUDA workers; this Ray worker's vLLM platform is {device!r}")


def __getattr__(name):
    if name == "PedroWorker":
        return platform_worker()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
