"""Worker classes named by `worker_cls` when PEDRO is enabled (a public vLLM option).

Each is vLLM's own worker with two additions: its model runner gets PedroRunnerMixin,
and the vector slots are paid for out of the KV-cache budget."""

from __future__ import annotations

import logging

from .layers import SPLITTING_OPS
from .runner import PedroRunnerMixin

logger = logging.getLogger("vllm_pedro")
_mixed: dict[type, type] = {}


def _with_pedro(runner_cls: type) -> type:
    if runner_cls not in _mixed:
        _mixed[runner_cls] = type(f"Pedro{runner_cls.__name__}", (PedroRunnerMixin, runner_cls), {})
    return _mixed[runner_cls]


class _PedroWorkerMixin:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from vllm.config import CompilationMode

        cc = self.vllm_config.compilation_config
        # The PEDRO ops branch on host-side step info at prefill: keep them out of
        # piecewise CUDA graphs (decode-only full graphs still capture them).
        if cc.mode == CompilationMode.VLLM_COMPILE and cc.splitting_ops is not None:
            for op in SPLITTING_OPS:
                if op not in cc.splitting_ops:
                    cc.splitting_ops.append(op)

    def init_device(self):
        super().init_device()
        if getattr(self, "use_v2_model_runner", False):
            raise RuntimeError("vllm-pedro supports vLLM's V1 GPUModelRunner, not the V2 model "
                               "runner; unset VLLM_USE_V2_MODEL_RUNNER")
        runner = self.model_runner
        runner.__class__ = _with_pedro(type(runner))

    def determine_available_memory(self) -> int:
        available = super().determine_available_memory()
        pedro = self.model_runner.pedro
        if self.cache_config.kv_cache_memory_bytes:
            # An explicit KV budget: the slots live inside it.
            available -= pedro.nbytes
        # Otherwise the budget was measured after load_model allocated the slots.
        logger.info("PEDRO: %.2f MiB of vector slots (%d slots) beside the KV cache, "
                    "%.2f MiB adapter cache", pedro.nbytes / 2**20, pedro.slots.num_slots,
                    pedro.adapters.nbytes / 2**20)
        return available


def _cpu_worker():
    from vllm.v1.worker.cpu_worker import CPUWorker
    return CPUWorker


def _gpu_worker():
    from vllm.v1.worker.gpu_worker import Worker
    return Worker


def __getattr__(name):  # build each class on first use, importing only that platform's worker
    bases = {"PedroCPUWorker": _cpu_worker, "PedroGPUWorker": _gpu_worker}
    if name in bases:
        cls = type(name, (_PedroWorkerMixin, bases[name]()), {"__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(name)
