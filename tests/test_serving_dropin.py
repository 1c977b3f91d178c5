"""One server, every kind of tenant: `vllm-pedro serve --enable-lora --lora-modules ...
--enable-pedro --pedro-modules ...` serves LoRA tenants, PEDRO tenants and the base model
in the same batches, each token-exact against its transformers reference (peft for LoRA,
PedroModel for PEDRO), lists both kinds, loads both at run time, refuses a name used by
both; and what users rely on keeps working with a tenant: chat completions with the
model's template, streaming = non-streaming, logprobs (checked against the reference's
log-softmax), n > 1 with a seed, structured outputs."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from vllm_pedro import PedroModel  # noqa: E402
from vllm_pedro.testing import (build_demo, build_lora_adapter, build_random_adapters, free_port,  # noqa: E402
                                group_alive, make_demo_adapter, server_env, start_server, stop_server, wait_ready)

PROMPTS = ["The quick brown fox jumps over", "name: Alpha, food: Italian, area:", "Is the sky blue? yes. Is fire"]
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Is the sky blue?"}]
MAX_TOKENS = 10
STEP_TOKENS = 64  # --max-num-batched-tokens: base prompts longer than this are chunked
N_BY_NAME = 5  # tenants in --pedro-adapter-dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("dropin-serving")
    model, adapters = build_demo(str(work))  # PEDRO tenant-a, tenant-b
    root = work / "root"
    root.mkdir()
    loras = {"lora-a": build_lora_adapter(model, str(work / "lora-a"), seed=1),
             "lora-b": build_lora_adapter(model, str(root / "lora-b"), seed=2)}
    tenant_c = make_demo_adapter(model, str(root / "tenant-c"), seed=3)
    by_name = work / "by-name"  # --pedro-adapter-dir: tenants served by name
    build_random_adapters(model, {10 + i: str(by_name / f"t{i}") for i in range(N_BY_NAME)}, r=4)
    port = free_port()
    log_path = work / "server.log"
    log = open(log_path, "w")
    proc = start_server(model, adapters, port, log_file=log,
                        extra_args=["--max-num-batched-tokens", str(STEP_TOKENS),  # chunked prefill, a small step
                                    "--enable-lora", "--max-lora-rank", "8", "--max-loras", "1",
                                    "--lora-modules", f"lora-a={loras['lora-a']}", "--pedro-allowed-roots", str(root),
                                    "--pedro-adapter-dir", str(by_name), "--pedro-metrics-tenant-labels", "2"],
                        env=server_env(VLLM_ALLOW_RUNTIME_PEDRO_UPDATING=1, VLLM_ALLOW_RUNTIME_LORA_UPDATING=1))
    try:
        try:
            wait_ready(proc, port, timeout=400)
        except Exception:
            log.flush()
            raise AssertionError(f"server did not start:\n{log_path.read_text()[-5000:]}")
        yield dict(proc=proc, port=port, model=model, paths={**adapters, **loras, "tenant-c": tenant_c},
                   root=root, by_name=by_name, base_url=f"http://127.0.0.1:{port}", log_path=log_path)
    finally:
        if proc.poll() is None or group_alive(proc.pid):
            stop_server(proc)
        log.close()


@pytest.fixture(scope="module")
def client(setup):
    return openai.OpenAI(base_url=setup["base_url"] + "/v1", api_key="none", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def ref(setup):
    """Transformers references: `ids(name, prompt_ids)` greedy tokens, `logprobs(...)`."""
    model_dir, paths = setup["model"], setup["paths"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    models: dict = {}

    def load(name):
        if name not in models:
            from peft import PeftModel

            m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            m.generation_config.eos_token_id = None  # like ignore_eos
            if name.startswith("lora"):
                m = PeftModel.from_pretrained(m, paths[name])
            elif name != "base":  # a PEDRO tenant
                m = PedroModel.from_pretrained(m, paths[name])
            models[name] = m.eval()
        return models[name]

    class Ref:
        tokenizer = tok

        @staticmethod
        def prompt_ids(prompt: str) -> list[int]:
            return tok(prompt)["input_ids"]

        @staticmethod
        def ids(name: str, prompt_ids: list[int], n: int = MAX_TOKENS) -> list[int]:
            x = torch.tensor([prompt_ids])
            with torch.no_grad():
                out = load(name).generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                          do_sample=False)
            return out[0, len(prompt_ids):].tolist()

        @staticmethod
        def by_name(name: str, prompt_ids: list[int], n: int) -> list[int]:
            paths.setdefault(name, str(setup["by_name"] / name))
            return Ref.ids(name, prompt_ids, n)

        @staticmethod
        def logprobs(name: str, prompt_ids: list[int], out_ids: list[int]) -> list[float]:
            """log p(out_ids[i] | prompt, out_ids[:i]) with the vectors from the prompt."""
            x = torch.tensor([prompt_ids + out_ids])
            m = load(name)
            kw = {"prompt_lengths": torch.tensor([len(prompt_ids)])} if isinstance(m, PedroModel) else {}
            with torch.no_grad():
                logits = m(input_ids=x, attention_mask=torch.ones_like(x), **kw).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            return [float(lp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(out_ids)]

    return Ref


def model_name(setup, name):
    return setup["model"] if name == "base" else name


def completion(client, setup, name, prompt, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("temperature", 0)
    extra = {"ignore_eos": True, "return_token_ids": True, **kw.pop("extra_body", {})}
    return client.completions.create(model=model_name(setup, name), prompt=prompt, extra_body=extra, **kw)


def test_models_lists_lora_and_pedro_tenants(setup, client):
    cards = {m.id: m for m in client.models.list().data}
    assert {setup["model"], "tenant-a", "tenant-b", "lora-a"} <= set(cards)
    assert all(cards[n].parent == setup["model"] for n in ("tenant-a", "tenant-b", "lora-a"))


def test_lora_pedro_and_base_in_the_same_batches_each_exact(setup, client, ref):
    """Eight requests at once (one LoRA slot: LoRA, PEDRO and base tokens share every step)."""
    jobs = [(n, p) for p in PROMPTS for n in ("lora-a", "tenant-a", "base")][:8] + [("tenant-b", PROMPTS[0])]
    results: dict = {}

    def run(i, name, prompt):
        results[i] = completion(client, setup, name, prompt)

    threads = [threading.Thread(target=run, args=(i, n, p)) for i, (n, p) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    changed = 0
    for i, (name, prompt) in enumerate(jobs):
        choice = results[i].choices[0]
        assert results[i].choices[0].prompt_token_ids == ref.prompt_ids(prompt)
        want = ref.ids(name, ref.prompt_ids(prompt))
        assert choice.token_ids == want, f"{name} {prompt!r}"
        changed += name != "base" and want != ref.ids("base", ref.prompt_ids(prompt))
    assert changed >= 4


def post(setup, route, body):
    return httpx.post(setup["base_url"] + route, json=body, timeout=120)


def test_runtime_loading_of_both_kinds_and_one_namespace(setup, client, ref):
    paths = setup["paths"]
    r = post(setup, "/v1/load_lora_adapter", {"lora_name": "lora-b", "lora_path": paths["lora-b"]})
    assert r.status_code == 200, r.text
    r = post(setup, "/v1/load_pedro_adapter", {"pedro_name": "tenant-c", "pedro_path": paths["tenant-c"]})
    assert r.status_code == 200, r.text
    for name in ("lora-b", "tenant-c"):
        out = completion(client, setup, name, PROMPTS[1])
        assert out.choices[0].token_ids == ref.ids(name, ref.prompt_ids(PROMPTS[1])), name
    # One set of names for both kinds, whichever route asks.
    clashes = [("/v1/load_lora_adapter", {"lora_name": "tenant-a", "lora_path": paths["lora-b"]}, "PEDRO"),
               ("/v1/load_lora_adapter", {"lora_name": "tenant-a", "lora_path": paths["lora-b"],
                                          "load_inplace": True}, "PEDRO"),
               ("/v1/unload_lora_adapter", {"lora_name": "tenant-a"}, "PEDRO"),
               ("/v1/load_pedro_adapter", {"pedro_name": "lora-a", "pedro_path": paths["tenant-c"]}, "LoRA"),
               ("/v1/unload_pedro_adapter", {"pedro_name": "lora-a"}, "LoRA")]
    for route, body, kind in clashes:
        r = post(setup, route, body)
        assert r.status_code == 400 and kind in r.json()["error"]["message"], (route, body, r.text)
    # Both tenants still served as they were.
    for name in ("tenant-a", "lora-a"):
        out = completion(client, setup, name, PROMPTS[0])
        assert out.choices[0].token_ids == ref.ids(name, ref.prompt_ids(PROMPTS[0])), name
    assert post(setup, "/v1/unload_lora_adapter", {"lora_name": "lora-b"}).status_code == 200
    assert post(setup, "/v1/unload_pedro_adapter", {"pedro_name": "tenant-c"}).status_code == 200
    for name in ("lora-b", "tenant-c"):
        with pytest.raises(openai.NotFoundError):
            completion(client, setup, name, PROMPTS[0])


@pytest.mark.parametrize("name", ["tenant-a", "lora-a"])
def test_chat_with_a_tenant_renders_the_template_and_streams_the_same(setup, client, ref, name):
    kw = dict(model=name, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    r = client.chat.completions.create(**kw)
    template_ids = ref.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
    assert r.prompt_token_ids == template_ids
    assert r.choices[0].token_ids == ref.ids(name, template_ids)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert "".join((c.choices[0].delta.content or "") for c in chunks if c.choices) == r.choices[0].message.content


def test_logprobs_with_a_tenant_match_the_reference(setup, client, ref):
    prompt = PROMPTS[2]
    r = completion(client, setup, "tenant-b", prompt, logprobs=2)
    lp = r.choices[0].logprobs
    out_ids = r.choices[0].token_ids
    assert out_ids == ref.ids("tenant-b", ref.prompt_ids(prompt))
    want = ref.logprobs("tenant-b", ref.prompt_ids(prompt), out_ids)
    assert len(lp.token_logprobs) == len(out_ids) and all(len(t) >= 2 for t in lp.top_logprobs)
    assert lp.token_logprobs == pytest.approx(want, abs=2e-3)
    streamed = [x for c in completion(client, setup, "tenant-b", prompt, logprobs=2, stream=True)
                if c.choices for x in (c.choices[0].logprobs.token_logprobs or [])]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_n_samples_with_a_seed_are_reproducible_and_use_the_tenant(setup, client):
    def sample(name):
        r = completion(client, setup, name, PROMPTS[0], n=3, temperature=1.0, seed=1234, max_tokens=8)
        return [c.token_ids for c in sorted(r.choices, key=lambda c: c.index)]

    first = sample("tenant-a")
    assert len(first) == 3 and all(len(c) == 8 for c in first)
    assert sample("tenant-a") == first
    assert sample("base") != first  # the tenant's vectors are applied to every sample


def test_structured_outputs_with_tenants(setup, client):
    choices = ["alpha", "beta", "gamma"]
    for name in ("tenant-a", "lora-a", "base"):
        r = completion(client, setup, name, PROMPTS[1], max_tokens=8,
                       extra_body={"ignore_eos": False, "structured_outputs": {"choice": choices}})
        assert r.choices[0].text in choices, (name, r.choices[0].text)
        r = completion(client, setup, name, PROMPTS[0], max_tokens=8,
                       extra_body={"ignore_eos": False, "structured_outputs": {"regex": "[0-9]{3}"}})
        assert len(r.choices[0].text) == 3 and r.choices[0].text.isdigit(), (name, r.choices[0].text)


def test_a_pedro_prompt_longer_than_a_step_is_a_400_and_base_prompts_are_chunked(setup, client, ref):
    from vllm_pedro.testing import CORPUS

    long_ids = ref.tokenizer(CORPUS * 2)["input_ids"][:100]
    with pytest.raises(openai.BadRequestError) as e:
        completion(client, setup, "tenant-a", long_ids)
    assert "100 tokens" in str(e.value) and str(STEP_TOKENS) in str(e.value)
    for name in ("base", "lora-a"):  # chunked over two steps, exact
        out = completion(client, setup, name, long_ids)
        assert out.choices[0].token_ids == ref.ids(name, long_ids), name
    out = completion(client, setup, "tenant-a", long_ids[:60])
    assert out.choices[0].token_ids == ref.ids("tenant-a", long_ids[:60])


def test_a_name_in_both_module_lists_is_refused_before_the_engine_starts(setup):
    from vllm_pedro.vllm.args import apply_cli_args
    from vllm_pedro.vllm.server import make_serve_parser

    args = make_serve_parser().parse_args([setup["model"], "--enable-lora", "--lora-modules", "x=/a",
                                          "--enable-pedro", "--pedro-modules", "x=/b"])
    with pytest.raises(ValueError, match="both name x"):
        apply_cli_args(args, device="cpu")


def scrape(setup) -> dict:
    """/metrics as {(series, frozenset(labels)): value}, vllm:pedro_* only."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(setup["base_url"] + "/metrics", timeout=30).text
    return {(s.name, frozenset((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine"))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples if s.name.startswith("vllm:pedro_")}


def settled_scrape(setup, timeout: float = 15.0) -> dict:
    """/metrics once the engine has written everything so far (it writes every 0.5 s when
    something changed): two scrapes a second apart that agree."""
    import time

    deadline, last = time.monotonic() + timeout, scrape(setup)
    while True:
        time.sleep(1.0)
        now = scrape(setup)
        if now == last or time.monotonic() > deadline:
            return now
        last = now


def value(snap, name, **labels):
    return snap.get((name, frozenset(labels.items())), 0)


def test_metrics_follow_the_traffic(setup, client, ref):
    """N tenants never requested before, each twice: N misses and disk reads, then N store
    hits, 2N finished requests, one load-time observation per read; per-tenant series
    capped at --pedro-metrics-tenant-labels."""
    import time

    before = settled_scrape(setup)  # what earlier tests did, written out
    for i in range(N_BY_NAME):
        for _ in range(2):
            out = completion(client, setup, f"t{i}", PROMPTS[0], max_tokens=4)
            assert out.choices[0].token_ids == ref.by_name(f"t{i}", ref.prompt_ids(PROMPTS[0]), 4)
    deadline = time.monotonic() + 15  # the engine writes its numbers every 0.5 s
    while True:
        after = scrape(setup)
        delta = lambda name, **kw: value(after, name, **kw) - value(before, name, **kw)  # noqa: E731
        if delta("vllm:pedro_requests_finished_total", finished_reason="length") >= 2 * N_BY_NAME \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert delta("vllm:pedro_adapter_disk_reads_total") == N_BY_NAME
    assert delta("vllm:pedro_store_misses_total") == N_BY_NAME
    assert delta("vllm:pedro_store_hits_total") == N_BY_NAME
    assert delta("vllm:pedro_store_adapters") == N_BY_NAME
    assert delta("vllm:pedro_adapter_load_seconds_count") == N_BY_NAME
    assert delta("vllm:pedro_requests_finished_total", finished_reason="length") == 2 * N_BY_NAME
    assert value(after, "vllm:pedro_requests_running") == 0
    assert value(after, "vllm:pedro_requests_waiting_for_adapter") == 0
    assert 0 < value(after, "vllm:pedro_device_rows_used") <= value(after, "vllm:pedro_device_rows") == 4
    assert value(after, "vllm:pedro_store_capacity") >= N_BY_NAME
    assert sum(value(after, "vllm:pedro_adapter_load_failures_total", cause=c) for c in
               ("missing", "changed", "invalid", "io", "internal")) == 0
    tenants = {dict(k[1])["tenant"]: v for k, v in after.items() if k[0] == "vllm:pedro_tenant_requests_total"}
    assert len(tenants) == 3 and "__other__" in tenants, tenants  # 2 labels + the rest
    before_total = sum(v for k, v in before.items() if k[0] == "vllm:pedro_tenant_requests_total")
    assert sum(tenants.values()) - before_total == 2 * N_BY_NAME


@pytest.mark.parametrize("bad", ["evil\nINFO forged line", " leading", "trailing ", "tab\tname", "x" * 257,
                                 "zero\u200bwidth"])
def test_tenant_names_that_break_the_rule_are_refused(setup, bad):
    r = post(setup, "/v1/load_pedro_adapter", {"pedro_name": bad, "pedro_path": setup["paths"]["tenant-c"]})
    assert r.status_code == 400 and "tenant name is printable text" in r.json()["error"]["message"], r.text
    r = httpx.post(setup["base_url"] + "/v1/completions", json={"model": bad, "prompt": "hi", "max_tokens": 2},
                   timeout=60)
    assert r.status_code in (400, 404), r.text
    log = setup["log_path"].read_text()
    assert "\nINFO forged line" not in log


def test_tenant_name_of_the_base_model_is_refused(setup):
    r = post(setup, "/v1/load_pedro_adapter", {"pedro_name": setup["model"], "pedro_path": setup["paths"]["tenant-c"]})
    assert r.status_code == 400 and "base model" in r.json()["error"]["message"]


def test_sigint_stops_the_server_with_exit_code_0(setup):
    import signal

    proc = setup["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    assert stop_server(proc) and not group_alive(proc.pid)
