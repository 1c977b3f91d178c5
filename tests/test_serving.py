"""`vllm-pedro serve`: the OpenAI API with PEDRO adapters, against the offline engine.

One server for the module (a tiny random Llama, tenant-a and tenant-b from the command
line, runtime updating on with one allowed root), started on 127.0.0.1 with a free port.
The offline references (vllm_pedro.LLM, greedy) are computed in a subprocess while the
server starts. The last test stops the server with SIGTERM and checks that its whole
process group (the engine process included) is gone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from vllm_pedro.testing import (build_demo, free_port, group_alive, make_demo_adapter, server_env, start_server,
                             stop_server, wait_ready)

PROMPTS = ["The quick brown fox", "name: Alpha, food: Italian, area:"]
CHAT = [{"role": "user", "content": "Is the sky blue?"}]
MAX_TOKENS = 12
LONG_TOKENS = 200  # the requests that are in flight during an unload

REFERENCE_SCRIPT = r'''
import json, sys
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm_pedro import LLM, PedroRequest

def main():
    cfg = json.loads(sys.argv[1])
    llm = LLM(cfg["model"], enable_pedro=True, enforce_eager=True, dtype="float32", max_model_len=512,
              max_num_seqs=8)
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    chat = {"prompt_token_ids": tok.apply_chat_template(cfg["chat"], add_generation_prompt=True, tokenize=True,
                                                        return_dict=False)}
    short = SamplingParams(temperature=0, max_tokens=cfg["max_tokens"], ignore_eos=True)
    long = SamplingParams(temperature=0, max_tokens=cfg["long_tokens"], ignore_eos=True)
    out = {}
    for i, (name, path) in enumerate([(None, None)] + list(cfg["adapters"].items())):
        req = None if name is None else PedroRequest(name, i, path)
        prompts = cfg["prompts"] + [chat, cfg["prompts"][0]]
        params = [short] * (len(cfg["prompts"]) + 1) + [long]
        res = llm.generate(prompts, params, pedro_request=req, use_tqdm=False)
        texts = [r.outputs[0].text for r in res]
        out[name or "base"] = {"completions": texts[:len(cfg["prompts"])], "chat": texts[-2], "long": texts[-1]}
    print("REFERENCE=" + json.dumps(out))

if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Start the server and the offline reference together; yield both when ready."""
    work = tmp_path_factory.mktemp("serving")
    model, adapters = build_demo(str(work))  # tenant-a, tenant-b (outside the allowed root)
    root = work / "root"
    root.mkdir()
    tenant_c = make_demo_adapter(model, str(root / "tenant-c"), seed=3)
    # Refusals: a malformed adapter, one for another base, a symlink escaping the root.
    broken = root / "broken"
    broken.mkdir()
    shutil.copy(os.path.join(tenant_c, "adapter_config.json"), broken / "adapter_config.json")
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    from vllm_pedro.testing import build_tiny_model
    other_model = build_tiny_model(str(work / "other-base"), hidden_size=64, num_heads=2, num_kv_heads=1,
                                   intermediate_size=96)
    make_demo_adapter(other_model, str(root / "other-base"), seed=4)
    os.symlink(adapters["tenant-a"], root / "escape")

    # tenant-h: tenant-a's adapter as the Hugging Face Hub id acme/tenant-a, from a local HF cache, Hub off.
    from test_hub import fake_hub_cache

    hf_cache = str(work / "hf-cache")
    fake_hub_cache(hf_cache, "acme/tenant-a", adapters["tenant-a"])
    port = free_port()
    log_path = work / "server.log"
    log = open(log_path, "w")
    proc = start_server(model, {**adapters, "tenant-h": "acme/tenant-a"}, port,
                        extra_args=["--pedro-allowed-roots", str(root), "--max-model-len", "512"],
                        env=server_env(VLLM_ALLOW_RUNTIME_PEDRO_UPDATING=1, HF_HUB_CACHE=hf_cache, HF_HUB_OFFLINE=1),
                        log_file=log)
    cfg = dict(model=model, adapters={**adapters, "tenant-c": tenant_c}, prompts=PROMPTS, chat=CHAT,
               max_tokens=MAX_TOKENS, long_tokens=LONG_TOKENS)
    ref_env = server_env(VLLM_ENABLE_V1_MULTIPROCESSING=0)
    script = work / "reference.py"
    script.write_text(REFERENCE_SCRIPT)
    try:
        ref_proc = subprocess.run([sys.executable, str(script), json.dumps(cfg)], env=ref_env, capture_output=True,
                                  text=True, timeout=400)
        assert ref_proc.returncode == 0, ref_proc.stderr[-3000:]
        line = [x for x in ref_proc.stdout.splitlines() if x.startswith("REFERENCE=")][-1]
        reference = json.loads(line[len("REFERENCE="):])
        try:
            wait_ready(proc, port, timeout=300)
        except Exception:
            log.flush()
            raise AssertionError(f"server did not start:\n{log_path.read_text()[-5000:]}")
        yield dict(proc=proc, port=port, model=model, adapters=adapters, root=root, tenant_c=tenant_c,
                   reference=reference, base_url=f"http://127.0.0.1:{port}", log_path=log_path)
    finally:
        if proc.poll() is None or group_alive(proc.pid):
            stop_server(proc)
        log.close()


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup["base_url"] + "/v1", api_key="none", max_retries=0, timeout=120)


def complete(client, model, prompt, max_tokens=MAX_TOKENS, stream=False):
    kw = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        r = client.completions.create(**kw)
        return r.model, r.choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert {c.model for c in chunks} == {model}
    return model, "".join(c.choices[0].text for c in chunks if c.choices)


def chat(client, model, stream=False):
    kw = dict(model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.model, r.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert {c.model for c in chunks} == {model}
    return model, "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)


def names(setup):
    return {"base": setup["model"], "tenant-a": "tenant-a", "tenant-b": "tenant-b"}


def test_models_list(setup, client):
    cards = {m.id: m for m in client.models.list().data}
    base = setup["model"]
    assert set(cards) == {base, "tenant-a", "tenant-b", "tenant-h"}
    assert cards["tenant-h"].parent == base and "models--acme--tenant-a" in cards["tenant-h"].root
    for name in ("tenant-a", "tenant-b"):
        assert cards[name].parent == base
        assert cards[name].root == setup["adapters"][name]
    assert getattr(cards[base], "parent", None) is None


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_completions_match_offline(setup, client, stream):
    ref = setup["reference"]
    for key, model in names(setup).items():
        for i, prompt in enumerate(PROMPTS):
            served_as, text = complete(client, model, prompt, stream=stream)
            assert served_as == model
            assert text == ref[key]["completions"][i], (key, prompt)
    # The adapters change the output (else the comparison above proves little).
    assert len({ref[k]["completions"][0] for k in ("base", "tenant-a", "tenant-b")}) == 3


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_chat_matches_offline(setup, client, stream):
    ref = setup["reference"]
    for key, model in names(setup).items():
        served_as, text = chat(client, model, stream=stream)
        assert served_as == model
        assert text == ref[key]["chat"], key


def test_a_hub_id_tenant_is_served_from_the_hf_cache(setup, client):
    """--pedro-modules tenant-h=acme/tenant-a: tenant-a's adapter through the Hugging Face
    cache (no network), so it answers exactly as tenant-a."""
    ref = setup["reference"]
    for i, prompt in enumerate(PROMPTS):
        assert complete(client, "tenant-h", prompt)[1] == ref["tenant-a"]["completions"][i]


def test_unknown_model_is_404_and_server_keeps_serving(setup, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tenant-zzz", prompt="hi", max_tokens=2)
    r = httpx.post(setup["base_url"] + "/v1/chat/completions",
                   json={"model": "tenant-zzz", "messages": CHAT, "max_tokens": 2})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "NotFoundError" and err["code"] == 404 and "tenant-zzz" in err["message"]
    assert complete(client, "tenant-a", PROMPTS[0])[1] == setup["reference"]["tenant-a"]["completions"][0]


def test_beam_search_refused_for_pedro_tenants_only(setup, client):
    url = setup["base_url"] + "/v1/completions"
    body = {"prompt": PROMPTS[0], "max_tokens": 3, "use_beam_search": True, "n": 2}
    r = httpx.post(url, json={"model": "tenant-a", **body}, timeout=120)
    assert r.status_code == 400, (r.status_code, r.text)
    assert "beam search is not supported" in r.json()["error"]["message"]
    base = httpx.post(url, json={"model": setup["model"], **body}, timeout=120)
    assert base.status_code == 200, base.text
    assert len(base.json()["choices"]) == 2
    assert complete(client, "tenant-a", PROMPTS[0])[1] == setup["reference"]["tenant-a"]["completions"][0]


def load(setup, name, path):
    return httpx.post(setup["base_url"] + "/v1/load_pedro_adapter", json={"pedro_name": name, "pedro_path": path})


def unload(setup, name):
    return httpx.post(setup["base_url"] + "/v1/unload_pedro_adapter", json={"pedro_name": name})


def test_runtime_load_refusals(setup, client):
    root, c = setup["root"], setup["tenant_c"]
    cases = {
        "malformed": load(setup, "t-broken", str(root / "broken")),
        "other base": load(setup, "t-other", str(root / "other-base")),
        "outside roots": load(setup, "t-out", setup["adapters"]["tenant-a"]),
        "dot-dot escape": load(setup, "t-dots", str(root / ".." / "adapters" / "tenant-a")),
        "symlink escape": load(setup, "t-link", str(root / "escape")),
        "missing dir": load(setup, "t-missing", str(root / "nope")),
        "duplicate name": load(setup, "tenant-a", c),
        "base model name": load(setup, setup["model"], c),
        "no path": httpx.post(setup["base_url"] + "/v1/load_pedro_adapter", json={"pedro_name": "x"}),
    }
    for what, r in cases.items():
        assert r.status_code == 400, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] == 400 and err["message"], what
    assert "another base" in cases["other base"].json()["error"]["message"]
    assert "allowed root" in cases["outside roots"].json()["error"]["message"]
    assert "already" in cases["duplicate name"].json()["error"]["message"]
    # Nothing was added, and the server still serves.
    assert {m.id for m in client.models.list().data} == {setup["model"], "tenant-a", "tenant-b", "tenant-h"}
    assert complete(client, "tenant-b", PROMPTS[0])[1] == setup["reference"]["tenant-b"]["completions"][0]
    assert unload(setup, "t-never-loaded").status_code == 404


def unload_during_requests(setup, client, jobs):
    """Open the tenant-c streams of `jobs` [(reference key, model)] first (each admitted:
    the server accepted the name and answered with headers), then the other requests, all
    long; unload tenant-c as soon as the first tenant-c token arrives. Returns (texts,
    whether some tenant-c request was still streaming after the unload returned)."""
    started = threading.Event()
    results, errors, last_chunk = {}, {}, {}

    def open_stream(model):
        return client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=LONG_TOKENS, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})

    def run(i, key, stream_or_model):
        try:
            stream = stream_or_model if key == "tenant-c" else open_stream(stream_or_model)
            text = []
            for chunk in stream:
                if chunk.choices:
                    text.append(chunk.choices[0].text)
                    last_chunk[i] = time.monotonic()
                    if key == "tenant-c":
                        started.set()
            results[i] = "".join(text)
        except Exception as e:  # noqa: BLE001
            errors[i] = e
        finally:
            started.set()

    opened = {i: open_stream(model) for i, (key, model) in enumerate(jobs) if key == "tenant-c"}
    threads = [threading.Thread(target=run, args=(i, key, opened.get(i, model))) for i, (key, model) in enumerate(jobs)]
    for t in threads:
        t.start()
    assert started.wait(120)
    r = unload(setup, "tenant-c")
    unloaded_at = time.monotonic()
    assert r.status_code == 200, r.text
    for t in threads:
        t.join(300)
    assert not errors, errors
    in_flight = any(last_chunk[i] > unloaded_at for i, (key, _) in enumerate(jobs) if key == "tenant-c")
    return [results[i] for i in range(len(jobs))], in_flight


def test_runtime_load_then_unload_with_requests_in_flight(setup, client):
    ref = setup["reference"]
    # More long requests than the server runs at once (--max-num-seqs 8): some are still
    # queued in the engine when tenant-c is unloaded. Every one completes with the offline
    # engine's output. On a starved machine all may finish before the unload returns;
    # then the round is repeated (at most 3 rounds).
    jobs = [("tenant-c", "tenant-c")] * 8 + [("tenant-a", "tenant-a")] * 6 + [("base", setup["model"])] * 4
    for attempt in range(3):
        r = load(setup, "tenant-c", setup["tenant_c"])
        assert r.status_code == 200, r.text
        if attempt == 0:
            cards = {m.id: m for m in client.models.list().data}
            assert cards["tenant-c"].parent == setup["model"]
            assert complete(client, "tenant-c", PROMPTS[0])[1] == ref["tenant-c"]["completions"][0]
        texts, in_flight = unload_during_requests(setup, client, jobs)
        for i, ((key, _), text) in enumerate(zip(jobs, texts)):
            assert text == ref[key]["long"], (i, key, text, ref[key]["long"])
        # Unloaded: the name 404s (vLLM's error), and is gone from /v1/models.
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="tenant-c", prompt=PROMPTS[0], max_tokens=2)
        assert "tenant-c" not in {m.id for m in client.models.list().data}
        assert unload(setup, "tenant-c").status_code == 404
        if in_flight:
            break
    else:
        pytest.fail("in 3 rounds, every tenant-c request had finished before the unload returned")
    # Loaded again under the same name: served again, with the same outputs.
    assert load(setup, "tenant-c", setup["tenant_c"]).status_code == 200
    assert complete(client, "tenant-c", PROMPTS[1])[1] == ref["tenant-c"]["completions"][1]
    assert unload(setup, "tenant-c").status_code == 200


def test_sigterm_stops_the_whole_process_group(setup):
    proc = setup["proc"]
    assert proc.poll() is None
    t0 = time.monotonic()
    assert stop_server(proc, timeout=60), "server or engine process still alive 60 s after SIGTERM"
    assert not group_alive(proc.pid)
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 0, "a clean SIGTERM must exit 0 (a restart, not a crash)"


# -- no server needed -----------------------------------------------------------------
def test_path_under_roots(tmp_path):
    from vllm_pedro.vllm.serving import path_under_roots

    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    assert path_under_roots(str(root / "a"), [str(root)]) == os.path.realpath(root / "a")
    assert path_under_roots(str(root / ".." / "outside"), [str(root)]) is None
    assert path_under_roots(str(root / "link"), [str(root)]) is None
    assert path_under_roots(str(tmp_path / "root2"), [str(root)]) is None  # a prefix is not a parent
    assert path_under_roots(str(root / "a"), []) is None


def test_serve_flags(tmp_path):
    from vllm_pedro.vllm.args import apply_cli_args as apply_pedro_args
    from vllm_pedro.vllm.server import make_serve_parser

    parser = make_serve_parser()
    args = parser.parse_args(["m", "--enable-pedro", "--pedro-modules", "a=/x",
                              '{"name": "b", "path": "/y", "base_model_name": "m"}', "--max-pedro-adapters", "3",
                              "--pedro-targets", "q,v", "--additional-config", '{"other": 1}'])
    pargs = apply_pedro_args(args, device="cpu")
    assert [(m.name, m.path, m.base_model_name) for m in pargs.modules] == [("a", "/x", None), ("b", "/y", "m")]
    assert args.model == "m" and args.enable_chunked_prefill is None  # vLLM decides (default: on)
    assert args.worker_cls.endswith("PedroCPUWorker") and args.scheduler_cls.endswith("PedroScheduler")
    assert args.additional_config["other"] == 1
    assert args.additional_config["pedro"]["max_adapters"] == 3
    assert args.additional_config["pedro"]["targets"] == ["q", "v"]
    for bad in (["m", "--pedro-modules", "a=/x"],  # without --enable-pedro
                ["m", "--enable-pedro", "--pedro-modules", "no-equals-sign"],
                ["m", "--enable-pedro", "--pedro-targets", "q", "o"],  # never silently dropped
                ["m", "--enable-pedro", "--worker-cls", "my.Worker"],
                ["m", "--enable-pedro", "--scheduler-cls", "my.Scheduler"],
                ["m", "--enable-pedro", "--max-pedro-adapters", "8", "--max-cpu-pedro-adapters", "4"],
                ["m", "--pedro-adapter-dir", "/x"]):
        with pytest.raises(ValueError):
            apply_pedro_args(parser.parse_args(bad), device="cpu")
    assert apply_pedro_args(parser.parse_args(["m"]), device="cpu") is None


def test_runtime_routes_only_when_allowed(monkeypatch):
    from fastapi import FastAPI

    from vllm_pedro.vllm.serving import PedroEndpoints

    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_PEDRO_UPDATING", raising=False)
    app = FastAPI()
    PedroEndpoints().attach_router(app)
    assert not [r for r in app.routes if "pedro" in getattr(r, "path", "")]
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_PEDRO_UPDATING", "true")
    PedroEndpoints().attach_router(app)
    assert {r.path for r in app.routes if "pedro" in r.path} == {"/v1/load_pedro_adapter", "/v1/unload_pedro_adapter"}


def test_vllm_parsers_get_the_pedro_flags():
    """The general plugin adds the flags to vLLM's own parser (`vllm serve`, `python -m
    vllm.entrypoints.openai.api_server`) and carries them into the engine arguments."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.plugins import load_general_plugins
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    load_general_plugins()
    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", "--enable-pedro", "--pedro-modules", "a=/x", "--max-pedro-rank", "8"])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.additional_config["pedro"]["max_rank"] == 8
    assert engine_args.additional_config["pedro"]["modules"][0]["name"] == "a"
    assert engine_args.enable_chunked_prefill is None and engine_args.worker_cls.endswith("PedroCPUWorker")
    assert engine_args.scheduler_cls.endswith("PedroScheduler")
    plain = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m"]))
    assert "pedro" not in (plain.additional_config or {})


def test_bad_static_adapter_fails_before_the_engine_starts(setup):
    from vllm_pedro.vllm.args import apply_cli_args as apply_pedro_args
    from vllm_pedro.vllm.server import check_modules_early, make_serve_parser

    args = make_serve_parser().parse_args([setup["model"], "--enable-pedro", "--pedro-modules",
                                           f"a={setup['adapters']['tenant-a']}",
                                           f"bad={setup['root'] / 'other-base'}"])
    with pytest.raises(ValueError, match="bad=.*another base model"):
        check_modules_early(args, apply_pedro_args(args, device="cpu"))
