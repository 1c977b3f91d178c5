"""Worker classes named by `worker_cls` when PEDRO is enabled (a public vLLM option).

Each is vLLM's own worker with three additions: its model runner gets PedroRunnerMixin
(the GPU worker builds it through vLLM's `_make_model_runner` override point; the CPU
worker has none, so the live runner's class is swapped, patches.REGISTER), the prefill op
splits compiled graphs, and the vector slots and device adapter rows are paid for out of
the KV-cache budget."""

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
        # The prefill op branches on host-side step data: keep it out of piecewise CUDA
        # graphs (decode-only full graphs still capture the scaling around it).
        if cc.mode == CompilationMode.VLLM_COMPILE and cc.splitting_ops is not None:
            for op in SPLITTING_OPS:
                if op not in cc.splitting_ops:
                    cc.splitting_ops.append(op)

    def _check_v1_runner(self):
        if getattr(self, "use_v2_model_runner", False):
            raise RuntimeError("vllm-pedro supports vLLM's V1 model runner, not the V2 model runner; unset "
                               "VLLM_USE_V2_MODEL_RUNNER")

    def determine_available_memory(self) -> int:
        available = super().determine_available_memory()
        pedro = self.model_runner.pedro
        if self.cache_config.kv_cache_memory_bytes:
            # An explicit KV budget: the slots and adapter rows live inside it.
            available -= pedro.nbytes
        # Otherwise the budget was measured after load_model allocated them.
        logger.info("PEDRO: %.2f MiB of vector slots (%d slots) and %.2f MiB of device adapter rows (%d) "
                    "beside the KV cache", pedro.slots.nbytes / 2**20, pedro.slots.num_slots,
                    pedro.adapters.nbytes / 2**20, pedro.adapters.num_rows)
        return available


def _cpu_worker():
    from vllm.v1.worker.cpu_worker import CPUWorker

    class PedroCPUWorker(_PedroWorkerMixin, CPUWorker):
        def init_device(self):
            self._check_v1_runner()
            super().init_device()
            runner = self.model_runner  # built inside CPUWorker.init_device: swap its class
            runner.__class__ = _with_pedro(type(runner))

    return PedroCPUWorker


def _gpu_worker():
    from vllm.v1.worker.gpu_worker import Worker

    class PedroGPUWorker(_PedroWorkerMixin, Worker):
        def _make_model_runner(self):
            self._check_v1_runner()
            from vllm.v1.worker.gpu_model_runner import GPUModelRunner

            return _with_pedro(GPUModelRunner)(self.vllm_config, self.device)

    return PedroGPUWorker


def __getattr__(name):  # build each class on first use, importing only that platform's worker
    builders = {"PedroCPUWorker": _cpu_worker, "PedroGPUWorker": _gpu_worker}
    if name in builders:
        cls = builders[name]()
        cls.__module__, cls.__qualname__ = __name__, name
        globals()[name] = cls
        return cls
    raise AttributeError(name)
