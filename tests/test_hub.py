"""Adapters from the Hugging Face Hub by id ("org/repo") through huggingface_hub's cache,
with no network: a cache folder laid out as huggingface_hub writes it (blobs, a snapshot of
symlinks, refs/main) is built here and the Hub is switched off (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_pedro import PedroModel
from vllm_pedro.config import AdapterError
from vllm_pedro.hub import is_repo_id, resolve_adapter
from vllm_pedro.testing import build_random_adapter

REVISION = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: str, repo: str, adapter: str) -> str:
    """huggingface_hub's cache layout: blobs by sha256, the snapshot's files as relative
    symlinks to them, refs/main naming the snapshot."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snap = os.path.join(root, "snapshots", REVISION)
    os.makedirs(os.path.join(root, "blobs"))
    os.makedirs(snap)
    os.makedirs(os.path.join(root, "refs"))
    for name in os.listdir(adapter):
        data = open(os.path.join(adapter, name), "rb").read()
        blob = os.path.join(root, "blobs", hashlib.sha256(data).hexdigest())
        open(blob, "wb").write(data)
        os.symlink(os.path.relpath(blob, snap), os.path.join(snap, name))
    open(os.path.join(root, "refs", "main"), "w").write(REVISION)
    return snap


@pytest.fixture
def hub(tmp_path, tiny_llama_dir, monkeypatch):
    adapter = build_random_adapter(tiny_llama_dir, str(tmp_path / "local"), seed=21, r=4)
    cache = str(tmp_path / "hf-cache")
    snap = fake_hub_cache(cache, "acme/support-bot", adapter)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return dict(adapter=adapter, cache=cache, snapshot=snap)


def test_repo_ids_and_local_paths():
    assert is_repo_id("acme/support-bot") and is_repo_id("acme/support-bot@v1")
    assert not is_repo_id("./adapters") and not is_repo_id("/abs/path") and not is_repo_id("one-segment")
    assert resolve_adapter("/no/such/local/folder") == "/no/such/local/folder"  # not an id: the reader says why


def test_a_hub_id_resolves_to_its_cached_snapshot_without_network(hub, tiny_llama_dir):
    assert os.path.realpath(resolve_adapter("acme/support-bot")) == os.path.realpath(hub["snapshot"])
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = tok("The quick brown fox", return_tensors="pt")
    outs = []
    for source in ("acme/support-bot", hub["adapter"]):
        pm = PedroModel.from_pretrained(model, source)
        outs.append(pm.generate(**ids, max_new_tokens=8, do_sample=False).tolist())
        pm.unload()
    assert outs[0] == outs[1]


def test_a_missing_id_offline_is_a_clear_error(hub):
    with pytest.raises(AdapterError, match=r"'acme/nobody' is not in the local Hugging Face cache .*HF_HUB_OFFLINE=1"):
        resolve_adapter("acme/nobody")


HUB_DRIVER = r"""
import json, sys
from vllm import SamplingParams
from vllm_pedro import LLM, PedroRequest
if __name__ == "__main__":
    model, local = sys.argv[1:3]
    llm = LLM(model, enable_pedro=True, dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4)
    reqs = [PedroRequest("hub", 1, "acme/support-bot"), PedroRequest("local", 2, local),
            PedroRequest("missing", 3, "acme/nobody")]
    outs = llm.generate(["The quick brown fox"] * 3, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                        pedro_request=reqs, use_tqdm=False)
    print("OUT=" + json.dumps([[list(o.outputs[0].token_ids), getattr(o, "pedro_error", None)] for o in outs]))
"""


def test_the_offline_llm_serves_a_hub_id(hub, tiny_llama_dir, tmp_path):
    script = tmp_path / "hub_driver.py"
    script.write_text(HUB_DRIVER)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, str(script), tiny_llama_dir, hub["adapter"]], env=env,
                          capture_output=True, text=True, timeout=600)
    line = [x for x in proc.stdout.splitlines() if x.startswith("OUT=")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    import json

    (hub_tokens, e1), (local_tokens, e2), (missing, err) = json.loads(line[0][4:])
    assert hub_tokens == local_tokens and len(hub_tokens) == 8 and e1 is None and e2 is None
    assert missing == [] and "not in the local Hugging Face cache" in err
