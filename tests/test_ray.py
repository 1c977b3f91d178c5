"""PEDRO on Ray (vllm_pedro.ray), on a local Ray cluster this module starts and stops.

* Ray Serve: `vllm-pedro ray-serve` deploys 2 replicas (tenants t1, t2 from
  --pedro-modules, t3, t4 from --pedro-adapter-dir); requests for every tenant and the
  base model are spread over both replicas (the x-pedro-replica header says which), and
  every output is token for token the offline single engine's (vllm_pedro.LLM in a
  subprocess, float32, greedy, ignore_eos). Then a replica is killed while streams are in
  flight on it: each of its requests gets an error or completes correctly, Serve starts
  a new replica, and requests after that succeed.
* Ray Data: 64 rows naming their tenants on 2 engine actors equal the single engine's
  outputs, in input order.
* vLLM's Ray executor path: vLLM's own RayWorkerWrapper, as a Ray actor, loads the
  plugin and builds the PEDRO worker and runner from `worker_cls` (the Ray executor
  itself refuses the CPU platform, also checked).

The module prints the wall time of each part (run with -s to see it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve.llm")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

from vllm_pedro.testing import build_random_adapters, build_tiny_model, free_port  # noqa: E402

MODULES = {"t1": 1, "t2": 2}  # served with --pedro-modules (name -> adapter seed)
DIR_TENANTS = {"t3": 3, "t4": 4}  # served by name from --pedro-adapter-dir
PROMPTS = ["The quick brown fox", "name: Alpha, food: Italian, area:", "Is the sky blue? yes. Is fire cold?"]
MAX_TOKENS = 12
LONG_TOKENS = 400  # the streams in flight when a replica is killed
BATCH_ROWS, BATCH_TOKENS = 64, 8
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=8)
ENGINE_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "8"]
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
TIMES: dict[str, float] = {}

REFERENCE_SCRIPT = r'''
import json, sys
from vllm import SamplingParams
from vllm_pedro import LLM, PedroRequest

def main():
    cfg = json.loads(open(sys.argv[1]).read())
    llm = LLM(cfg["model"], enable_pedro=True, **cfg["engine"])
    reqs = {name: PedroRequest(name, i, path) for i, (name, path) in enumerate(sorted(cfg["adapters"].items()), 1)}
    prompts = [p for p, _, _ in cfg["jobs"]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, _, n in cfg["jobs"]]
    outs = llm.generate(prompts, params, pedro_request=[reqs[t] if t else None for _, t, _ in cfg["jobs"]],
                        use_tqdm=False)
    print("REFERENCE=" + json.dumps([[list(o.outputs[0].token_ids), o.outputs[0].text] for o in outs]))

if __name__ == "__main__":
    main()
'''


def batch_rows() -> list[dict]:
    names = ["", *MODULES, *DIR_TENANTS]
    return [{"i": i, "prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}", "pedro_adapter": names[i % len(names)]}
            for i in range(BATCH_ROWS)]


class Reference:
    """The offline single-engine outputs, computed in a subprocess started at once."""

    def __init__(self, work, model: str, adapters: dict[str, str]):
        self.serve_jobs = [(p, t, MAX_TOKENS) for t in (None, *adapters) for p in PROMPTS]
        self.long_jobs = [(PROMPTS[0], t, LONG_TOKENS) for t in (None, *adapters)]
        self.batch_jobs = [(r["prompt"], r["pedro_adapter"] or None, BATCH_TOKENS) for r in batch_rows()]
        cfg = work / "reference.json"
        cfg.write_text(json.dumps(dict(model=model, adapters=adapters, engine=ENGINE,
                                       jobs=self.serve_jobs + self.long_jobs + self.batch_jobs)))
        script = work / "reference.py"
        script.write_text(REFERENCE_SCRIPT)
        env = {**os.environ, **ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        self.proc = subprocess.Popen([sys.executable, str(script), str(cfg)], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._out = None

    def _outputs(self) -> list:
        if self._out is None:
            out, err = self.proc.communicate(timeout=600)
            assert self.proc.returncode == 0, err[-3000:]
            line = [x for x in out.splitlines() if x.startswith("REFERENCE=")][-1]
            self._out = json.loads(line[len("REFERENCE="):])
        return self._out

    def serve(self, prompt, tenant) -> list[int]:
        return self._outputs()[self.serve_jobs.index((prompt, tenant, MAX_TOKENS))][0]

    def long_text(self, tenant) -> str:
        return self._outputs()[len(self.serve_jobs) + self.long_jobs.index((PROMPTS[0], tenant, LONG_TOKENS))][1]

    def batch(self) -> list[list[int]]:
        return [ids for ids, _ in self._outputs()[len(self.serve_jobs) + len(self.long_jobs):]]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The tiny model, 4 adapters (t1, t2 in their own folders, t3, t4 in an adapter
    directory) and the reference run, started now."""
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("ray")
    model = build_tiny_model(str(root / "tiny-llama"))
    paths = {**{n: str(root / "modules" / n) for n in MODULES}, **{n: str(root / "tenants" / n) for n in DIR_TENANTS}}
    seeds = {**MODULES, **DIR_TENANTS}
    build_random_adapters(model, {seeds[n]: p for n, p in paths.items()}, std=0.5, rational_std=0.0, r=8)
    ref = Reference(root, model, paths)
    TIMES["build model and adapters"] = time.monotonic() - t0
    yield dict(root=root, model=model, paths=paths, adapter_dir=str(root / "tenants"), reference=ref)
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


def _alive(procs):
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def cluster(work):
    """A local Ray cluster owned by this process (2 CPUs, no dashboard, its own temp
    dir). At the end every process it started is gone, the engine processes of a killed
    replica (reparented away from this process's tree) included."""
    t0 = time.monotonic()
    temp = tempfile.mkdtemp(prefix="rpd", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    info = ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    tracked: list = []
    state = dict(address=info.address_info["gcs_address"], temp=temp, tracked=tracked)
    TIMES["ray start"] = time.monotonic() - t0
    try:
        yield state
    finally:
        t1 = time.monotonic()
        tracked.extend(psutil.Process().children(recursive=True))
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001
            pass
        ray.shutdown()
        deadline = time.monotonic() + 30
        while _alive(tracked) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _alive(tracked)
        for p in left:  # ours: children of this process (or of a replica this test killed)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        TIMES["ray stop"] = time.monotonic() - t1
        shutil.rmtree(temp, ignore_errors=True)
        print("\n[test_ray] wall time per part (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMES.items()))
        assert not left, f"processes outlived the Ray cluster and were killed: {[p.pid for p in left]}"


# -- Ray Serve --------------------------------------------------------------------------------
def replica_actors() -> dict[str, str]:
    """Serve replica id -> actor name, for the PEDRO application."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::pedro#")]
    return {n.rsplit("#", 1)[1]: n for n in names}


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("pedro")
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def complete(http, model, prompt, max_tokens=MAX_TOKENS):
    r = http.post("/v1/completions", json=dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                ignore_eos=True, return_token_ids=True))
    return r


@pytest.mark.usefixtures("cluster")
class TestServe:
    @pytest.fixture(scope="class")
    @classmethod
    def app(cls, work, cluster):
        """`vllm-pedro ray-serve ... --detach` into the test's cluster; deleted at the end."""
        t0 = time.monotonic()
        port = free_port()
        modules = [f"{n}={work['paths'][n]}" for n in MODULES]
        cmd = [sys.executable, "-m", "vllm_pedro.cli", "ray-serve", work["model"], "--enable-pedro",
               "--pedro-modules", *modules, "--pedro-adapter-dir", work["adapter_dir"], *ENGINE_FLAGS,
               "--num-replicas", "2", "--replica-cpus", "0.25", "--engine-cpus", "0.5",
               "--ray-address", cluster["address"], "--host", "127.0.0.1", "--port", str(port), "--detach",
               "--replica-env", *[f"{k}={v}" for k, v in ENGINE_ENV.items()]]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
        assert "is serving on http://127.0.0.1" in out.stdout
        TIMES["ray-serve: 2 replicas up"] = time.monotonic() - t0
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
        yield dict(http=http, port=port)
        http.close()
        from ray import serve

        serve.delete("pedro")

    def test_two_replicas_serve_every_tenant_like_one_engine(self, app, work):
        t0 = time.monotonic()
        ref, base = work["reference"], work["model"]
        jobs = [(t, p) for t in (None, *MODULES, *DIR_TENANTS) for p in PROMPTS] * 2
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda job: complete(app["http"], job[0] or base, job[1]), jobs))
        served: dict[str, set] = {}
        for (tenant, prompt), r in zip(jobs, results):
            assert r.status_code == 200, (tenant, r.text)
            body = r.json()
            assert body["model"] == (tenant or base)
            assert body["choices"][0]["token_ids"] == ref.serve(prompt, tenant), (tenant, prompt)
            served.setdefault(r.headers["x-pedro-replica"], set()).add(tenant or "base")
        assert len(served) == 2, f"one replica served everything: {served}"
        print(f"\n[test_ray] requests per replica: { {k: sorted(v) for k, v in served.items()} }")
        # The adapters change the output (else the comparison proves little).
        assert len({tuple(ref.serve(PROMPTS[0], t)) for t in (None, *MODULES, *DIR_TENANTS)}) == 5
        TIMES["serve: 30 requests"] = time.monotonic() - t0

    def test_unknown_tenant_is_404_and_models_lists_tenants(self, app, work):
        for name in ("t-nope", "t5"):  # neither served nor a folder of the adapter directory
            r = complete(app["http"], name, PROMPTS[0], max_tokens=2)
            assert r.status_code == 404, (name, r.text)
            assert r.json()["error"]["type"] == "NotFoundError"
        ids = {m["id"] for m in app["http"].get("/v1/models").json()["data"]}
        assert {work["model"], *MODULES} <= ids  # t3, t4 appear once a replica resolved them by name

    def test_killed_replica_restarts_and_no_request_is_lost(self, app, work, cluster):
        """Streams in flight on a killed replica end in an error (or, if Serve retried
        them, complete); none ends normally with a wrong or cut output. Serve starts a new
        replica and later requests succeed, on it too."""
        t0 = time.monotonic()
        ref, base = work["reference"], work["model"]
        tenants = [None, *MODULES, *DIR_TENANTS, "t1"]
        started = threading.Semaphore(0)
        results: dict[int, dict] = {}

        def stream(i, tenant):
            res = results[i] = dict(tenant=tenant, replica=None, text="", done=False, status=None, error=None)
            body = dict(model=tenant or base, prompt=PROMPTS[0], max_tokens=LONG_TOKENS, temperature=0,
                        ignore_eos=True, stream=True)
            signalled = False
            try:
                with app["http"].stream("POST", "/v1/completions", json=body) as r:
                    res["status"], res["replica"] = r.status_code, r.headers.get("x-pedro-replica")
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            res["done"] = True
                            continue
                        chunk = json.loads(line[len("data: "):])
                        if "error" in chunk:
                            res["error"] = chunk["error"]
                            continue
                        res["text"] += "".join(c.get("text", "") for c in chunk.get("choices", []))
                        if not signalled:
                            signalled = True
                            started.release()
            except httpx.HTTPError as e:
                res["error"] = repr(e)
            finally:
                if not signalled:
                    started.release()

        threads = [threading.Thread(target=stream, args=(i, t)) for i, t in enumerate(tenants)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=300)
        on = {}
        for i, res in results.items():
            on.setdefault(res["replica"], []).append(i)
        victim = max((k for k in on if k), key=lambda k: len(on[k]))
        actors = replica_actors()
        assert victim in actors, (victim, actors)
        in_flight = [i for i in on[victim] if not results[i]["done"]]
        assert in_flight, "every stream on the replica ended before it was killed"
        # The victim's engine processes among them: the cluster's teardown checks they are gone.
        procs = psutil.Process().children(recursive=True)
        cluster["tracked"].extend(procs)
        replicas = {}
        for p in procs:
            try:
                if "ServeReplica" in " ".join(p.cmdline()):
                    replicas[p] = p.children(recursive=True)
            except psutil.Error:  # ended meanwhile
                pass
        ray.kill(ray.get_actor(actors[victim], namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        for t in threads:
            t.join(timeout=600)
        assert not any(t.is_alive() for t in threads), "a request hung after the replica died"
        outcomes = {}
        for i, res in results.items():
            complete_ok = res["status"] == 200 and res["done"] and res["error"] is None
            if complete_ok:  # ended normally: it must be whole and right
                assert res["text"] == ref.long_text(res["tenant"]), (i, res["replica"] == victim, res["tenant"])
                outcomes[i] = "completed"
            else:  # an error the client sees: allowed only on the killed replica
                assert res["replica"] == victim, (i, res)
                outcomes[i] = "error"
        errored = [i for i in in_flight if outcomes[i] == "error"]
        print(f"\n[test_ray] killed replica {victim} with {len(in_flight)} streams in flight: "
              f"{len(errored)} ended in an error, {len(in_flight) - len(errored)} completed (retried or "
              f"finished first); {sum(v == 'completed' for v in outcomes.values())}/{len(outcomes)} completed in all; "
              f"what a client saw: {[(results[i]['status'], results[i]['done'], results[i]['error']) for i in errored][:2]}")

        # Serve replaces the replica.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            now = replica_actors()
            if victim not in now and len(now) == 2 and running_replicas() == 2:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"Serve did not restart the replica: {replica_actors()}, {running_replicas()} running")
        new = (set(replica_actors()) - set(actors)).pop()
        TIMES["serve: replica restart"] = time.monotonic() - killed_at
        # The killed replica's engine processes (EngineCore, its worker) exit with it.
        engines = [c for p, children in replicas.items() if not p.is_running() for c in children]
        assert engines, "the killed replica's engine processes were not found"
        assert not _alive(engines), f"engine processes outlived their killed replica: {_alive(engines)}"
        seen = set()
        for _ in range(5):
            jobs = [(t, p) for t in (None, *MODULES, *DIR_TENANTS) for p in PROMPTS[:2]]
            with ThreadPoolExecutor(8) as pool:
                rs = list(pool.map(lambda job: complete(app["http"], job[0] or base, job[1]), jobs))
            for (tenant, prompt), r in zip(jobs, rs):
                assert r.status_code == 200, (tenant, r.text)
                assert r.json()["choices"][0]["token_ids"] == ref.serve(prompt, tenant)
                seen.add(r.headers["x-pedro-replica"])
            if new in seen:
                break
        assert new in seen and victim not in seen, (new, victim, seen)
        TIMES["serve: kill test"] = time.monotonic() - t0


# -- Ray Data ---------------------------------------------------------------------------------
def test_ray_data_batch_matches_one_engine_in_order(cluster, work):
    from vllm_pedro.ray.batch import generate

    t0 = time.monotonic()
    ds = ray.data.from_items(batch_rows(), override_num_blocks=8)
    out = generate(ds, work["model"], tenants={n: work["paths"][n] for n in MODULES},
                   pedro_adapter_dir=work["adapter_dir"],
                   sampling_params=dict(max_tokens=BATCH_TOKENS, temperature=0, ignore_eos=True),
                   engine_kwargs=ENGINE, num_engines=2, batch_size=8, num_cpus_per_engine=0.5,
                   runtime_env={"env_vars": {**ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}})
    rows = out.take_all()
    assert [r["i"] for r in rows] == list(range(BATCH_ROWS))
    assert all(r["pedro_error"] == "" and r["finish_reason"] == "length" for r in rows)
    got = [list(r["generated_token_ids"]) for r in rows]
    assert got == work["reference"].batch()
    assert "MapBatches(PedroEngine)" in out.stats()
    TIMES["ray data: 64 rows on 2 engines"] = time.monotonic() - t0


# -- vLLM's Ray executor path -----------------------------------------------------------------
@pytest.mark.parametrize("plugins", ["entry-point", "VLLM_PLUGINS=none"])
def test_pedro_worker_in_vllms_ray_worker_actor(cluster, work, plugins, monkeypatch):
    """What vLLM's Ray executor does with each worker, on the CPU: its RayWorkerWrapper
    as a Ray actor, init_worker (general plugins, then `worker_cls` by name), init_device,
    load_model, the memory profile. With VLLM_PLUGINS excluding the plugin (as on a node
    that got vllm-pedro through a runtime_env, without its entry point), the worker class
    registers it itself."""
    import cloudpickle
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.network_utils import get_distributed_init_method, get_open_port
    from vllm.v1.executor.ray_utils import RayWorkerWrapper

    from vllm_pedro.ray.engine import pedro_engine_kwargs

    # Probes run inside the actor (nested: cloudpickle sends them by value).
    def _probe_plugins(wrapper):
        from vllm.plugins import load_general_plugins

        import vllm_pedro.vllm.plugin as plugin

        before = plugin._done
        load_general_plugins()
        return before, plugin._done

    def _probe_worker(wrapper):
        import torch

        from vllm_pedro.vllm import layers

        w = wrapper.worker
        ops = [op for op in (layers.PREFILL_OP, layers.SCALE_QKV_OP, layers.SCALE_UP_OP) if hasattr(torch.ops.vllm, op)]
        return dict(worker=type(w).__name__, runner=[c.__name__ for c in type(w.model_runner).__mro__],
                    ops=ops, slots=w.model_runner.pedro.slots.num_slots)

    t0 = time.monotonic()
    for k, v in ENGINE_ENV.items():  # read where the config is made (the CPU KV-cache size)
        monkeypatch.setenv(k, v)
    kwargs = pedro_engine_kwargs(ENGINE, {"pedro_modules": [f"t1={work['paths']['t1']}"]})
    assert kwargs["worker_cls"] == "vllm_pedro.ray.worker.PedroWorker"
    config = EngineArgs(model=work["model"], **kwargs).create_engine_config()
    env = dict(ENGINE_ENV)
    if plugins != "entry-point":
        env["VLLM_PLUGINS"] = "none"
    actor = ray.remote(num_cpus=0)(RayWorkerWrapper).options(runtime_env={"env_vars": env}).remote(rpc_rank=0)
    try:
        before, loaded = ray.get(actor.execute_method.remote(cloudpickle.dumps(_probe_plugins)), timeout=300)
        assert before is False and loaded is (plugins == "entry-point")
        init = dict(vllm_config=config, local_rank=0, rank=0, is_driver_worker=True,
                    distributed_init_method=get_distributed_init_method("127.0.0.1", get_open_port()))
        for method, args in (("init_worker", ([init],)), ("init_device", ()), ("load_model", ())):
            ray.get(actor.execute_method.remote(method, *args), timeout=300)
        probe = ray.get(actor.execute_method.remote(cloudpickle.dumps(_probe_worker)), timeout=120)
        assert probe["worker"] == "PedroCPUWorker"
        assert probe["runner"][:3] == ["PedroCPUModelRunner", "PedroRunnerMixin", "CPUModelRunner"]
        assert len(probe["ops"]) == 3 and probe["slots"] == ENGINE["max_num_seqs"]
        assert ray.get(actor.execute_method.remote("determine_available_memory"), timeout=120) > 0
    finally:
        ray.kill(actor)
    TIMES[f"ray worker actor ({plugins})"] = time.monotonic() - t0


def test_vllm_ray_executor_refuses_the_cpu(cluster, work, monkeypatch):
    """A known limit: vLLM's Ray executor runs on GPU platforms only (the mp executor
    runs tensor parallel on the CPU). Fails if vLLM lifts it."""
    from vllm_pedro import LLM

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for k, v in ENGINE_ENV.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="does not support ray"):
        LLM(work["model"], enable_pedro=True, distributed_executor_backend="ray", **ENGINE)


# -- no cluster -------------------------------------------------------------------------------
def test_ray_serve_command_config_round_trip(work, capsys):
    """`vllm-pedro ray-serve ... --print-config` prints a Serve config whose args build
    the application: PEDRO's engine arguments with the per-worker worker class."""
    import yaml

    from vllm_pedro.cli import main
    from vllm_pedro.ray.serve import llm_config

    rc = main(["ray-serve", work["model"], "--enable-pedro", "--pedro-modules", f"t1={work['paths']['t1']}",
               "--pedro-adapter-dir", work["adapter_dir"], "--max-pedro-adapters", "2", *ENGINE_FLAGS,
               "--min-replicas", "1", "--max-replicas", "3", "--accelerator", "cpu", "--port", "8001",
               "--print-config"])
    assert rc == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    [app] = doc["applications"]
    assert app["import_path"] == "vllm_pedro.ray.serve:build_app" and doc["http_options"]["port"] == 8001
    args = app["args"]
    assert args["engine_kwargs"] == {"dtype": "float32", "enforce_eager": True, "max_model_len": 512,
                                     "max_num_seqs": 8}
    assert args["deployment_config"]["autoscaling_config"]["max_replicas"] == 3
    cfg = llm_config(args)
    ek = cfg.engine_kwargs
    assert ek["worker_cls"] == "vllm_pedro.ray.worker.PedroWorker"
    assert ek["scheduler_cls"] == "vllm_pedro.vllm.scheduler.PedroScheduler" and "enable_chunked_prefill" not in ek
    pedro = ek["additional_config"]["pedro"]
    assert pedro["max_adapters"] == 2 and pedro["adapter_dir"] == work["adapter_dir"]
    assert [m["name"] for m in pedro["modules"]] == ["t1"]
    assert cfg.model_id == work["model"]


def test_ray_serve_config_refusals(work):
    from vllm_pedro.ray.serve import llm_config

    base = {"model": work["model"], "accelerator": "cpu"}
    with pytest.raises(ValueError, match="one replica"):
        llm_config({**base, "pedro_allowed_roots": ["/tmp"]})
    with pytest.raises(ValueError, match="unknown PEDRO Ray Serve option"):
        llm_config({**base, "num_replica": 2})
    with pytest.raises(ValueError, match="PEDRO sets worker_cls"):
        llm_config({**base, "engine_kwargs": {"worker_cls": "my.Worker"}})
    # chunked prefill is the user's choice (PEDRO prompts are prefilled whole either way)
    assert llm_config({**base, "engine_kwargs": {"enable_chunked_prefill": True}}).engine_kwargs[
        "enable_chunked_prefill"] is True
    with pytest.raises(ValueError, match="model"):
        llm_config({"accelerator": "cpu"})


def test_serve_run_key_value_args(work):
    """`serve run vllm_pedro.ray.serve:build_app key=value ...` hands the builder strings."""
    from vllm_pedro.ray.serve import llm_config

    cfg = llm_config({"model": work["model"], "accelerator": "cpu", "max_pedro_adapters": "3",
                      "pedro_modules": f"t1={work['paths']['t1']} t2={work['paths']['t2']}",
                      "pedro_adapter_dir": work["adapter_dir"]})
    pedro = cfg.engine_kwargs["additional_config"]["pedro"]
    assert pedro["max_adapters"] == 3 and [m["name"] for m in pedro["modules"]] == ["t1", "t2"]
    assert cfg.accelerator_config.kind == "cpu"


def test_worker_class_is_resolved_for_the_platform():
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from vllm_pedro.ray.worker import WORKER_CLS

    assert resolve_obj_by_qualname(WORKER_CLS).__name__ == "PedroCPUWorker"


def test_batch_rows_name_tenants_and_fail_alone():
    """PedroEngine's row handling without an engine: an unknown tenant fails its row,
    empty and null names are the base model, the rest goes to the engine."""
    from types import SimpleNamespace

    from vllm_pedro.ray.batch import PedroEngine
    from vllm_pedro.vllm.request import PedroRequest

    calls = []

    class FakeLLM:
        def generate(self, prompts, params, pedro_request, use_tqdm):
            calls.append((prompts, pedro_request))
            return [SimpleNamespace(outputs=[SimpleNamespace(text=f"<{p}>", token_ids=[1, 2], finish_reason="length")])
                    for p in prompts]

    eng = PedroEngine.__new__(PedroEngine)
    eng.llm, eng.params, eng.by_dir = FakeLLM(), None, False
    eng.tenants = {"a": PedroRequest("a", 1, "/x/a")}
    eng.prompt_column, eng.adapter_column = "prompt", "pedro_adapter"
    out = eng({"prompt": ["p0", "p1", "p2", "p3"], "pedro_adapter": ["", "a", "zz", None]})
    assert calls == [(["p0", "p1", "p3"], [None, eng.tenants["a"], None])]
    assert out["generated_text"] == ["<p0>", "<p1>", "", "<p3>"]
    assert out["finish_reason"][2] == "error" and "unknown PEDRO tenant 'zz'" in out["pedro_error"][2]
    assert out["pedro_error"][:2] == ["", ""]
