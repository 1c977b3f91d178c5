"""A corpus of hostile and broken PEDRO adapter folders, built from one valid adapter.

`build_corpus(valid, root, outside)` writes one folder per kind under `root` (the allowed
root of a server) and returns {kind: (folder, words)}: every kind must be refused with an
AdapterError (a 400 through a server) whose message contains each of `words`. `outside`
is a folder outside the root and beside it (for escapes, '..' included). Kinds in
SERVING_KINDS are valid adapters a server with the default options (max rank 16, targets
q v up) must refuse; the rest are refused by adapter_io itself. Shared by
tests/test_adapter_security.py (adapter_io) and tests/test_faults.py (the server)."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import torch
from safetensors.torch import load_file, save_file

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SERVING_KINDS = ("rank-above-max", "targets-not-served")


def _copy(valid, root, kind):
    d = os.path.join(root, kind)
    shutil.copytree(valid, d)
    return d


def _edit_config(d, **changes):
    path = os.path.join(d, CONFIG)
    cfg = json.load(open(path))
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        elif v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(path, "w"))


def _edit_tensors(d, fn):
    path = os.path.join(d, WEIGHTS)
    t = load_file(path)
    fn(t)
    save_file(t, path)


def _raw_header(d, header_len: int, header: bytes, body: bytes = b""):
    with open(os.path.join(d, WEIGHTS), "wb") as f:
        f.write(header_len.to_bytes(8, "little") + header + body)


def build_corpus(valid: str, root: str, outside: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    os.makedirs(root, exist_ok=True)
    os.makedirs(outside, exist_ok=True)
    cases: dict[str, tuple[str, tuple[str, ...]]] = {}
    first = "generators.0.down.weight"

    def case(kind, *words):
        cases[kind] = (os.path.join(root, kind), words)

    # -- pickles ------------------------------------------------------------------------
    d = _copy(valid, root, "pickle-bin")
    os.remove(os.path.join(d, WEIGHTS))
    torch.save(load_file(os.path.join(valid, WEIGHTS)), os.path.join(d, "adapter_model.bin"))
    case("pickle-bin", "pickle", "adapter_model.bin")
    d = _copy(valid, root, "pickle-named-safetensors")
    with open(os.path.join(d, WEIGHTS), "wb") as f:
        pickle.dump({"x": 1}, f)
    case("pickle-named-safetensors", "not a valid safetensors file")
    # -- adapter_config.json -------------------------------------------------------------
    for kind, text, words in [
            ("config-bad-json", '{"r": 4,', ("not valid JSON",)),
            ("config-array", "[1, 2]", ("JSON object",)),
            ("config-deep-nesting-100k", "[" * 100_000, ("more than",)),  # refused by size first
            ("config-deep-nesting", "[" * 5_000, ("nests deeper",)),
            ("config-empty", "", ("not valid JSON",)),
            ("config-not-utf8", "\udcff", ("not UTF-8",)),
            ("config-huge", '{"pad": "' + "x" * 70_000 + '"}', ("more than",))]:
        d = _copy(valid, root, kind)
        with open(os.path.join(d, CONFIG), "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        case(kind, *words)
    for kind, changes, words in [
            ("config-unknown-key", {"lora_alpha": 8}, ("unknown keys", "lora_alpha")),
            ("config-r-string", {"r": "4"}, ("r must be a positive integer",)),
            ("config-r-zero", {"r": 0}, ("r must be a positive integer",)),
            ("config-r-negative", {"r": -3}, ("r must be a positive integer",)),
            ("config-r-huge", {"r": 10 ** 9}, ()),  # refused before any tensor is read
            ("config-unknown-pooler", {"pooler": "max"}, ("unknown pooler",)),
            ("config-unknown-activation", {"activation": "tanh"}, ("unknown activation",)),
            ("config-unknown-target", {"targets": ["q", "o"]}, ("unknown or empty targets",)),
            ("config-empty-targets", {"targets": []}, ("unknown or empty targets",)),
            ("config-duplicate-targets", {"targets": ["q", "q"]}, ("duplicate targets",)),
            ("config-wrong-method", {"method": "lora"}, ("expected 'pedro'",)),
            ("config-version-2", {"version": 2}, ("format version 2",)),
            ("config-no-base-shapes", {"base_shapes": None}, ("no base_shapes",)),
            ("config-base-shapes-list", {"base_shapes": [2, 64]}, ("base_shapes",)),
            ("config-base-shapes-zero", {"base_shapes": {"num_layers": 0}}, ("base_shapes.num_layers",)),
            ("other-base-layers", {"base_shapes": {"num_layers": 3}}, ("another base model", "num_layers")),
            ("other-base-hidden", {"base_shapes": {"hidden_size": 256}}, ("another base model", "hidden_size"))]:
        d = _copy(valid, root, kind)
        _edit_config(d, **changes)
        case(kind, *words)
    d = _copy(valid, root, "rank-above-max")
    _edit_config(d, r=64)
    _edit_tensors(d, lambda t: _grow_rank(t, 64))
    case("rank-above-max", "max_pedro_rank")
    d = _copy(valid, root, "targets-not-served")  # q, k, v, up: k is not served by default
    shapes = json.load(open(os.path.join(d, CONFIG)))["base_shapes"]
    _edit_config(d, targets=["q", "k", "v", "up"])
    _edit_tensors(d, lambda t: _add_k_target(t, shapes["q_size"], shapes["kv_size"]))
    case("targets-not-served", "not served")
    # -- weights ----------------------------------------------------------------------------
    for kind, fn, words in [
            ("weights-nan", lambda t: t[first].view(-1).__setitem__(0, float("nan")), ("non-finite",)),
            ("weights-inf", lambda t: t[first].view(-1).__setitem__(3, float("inf")), ("non-finite",)),
            ("weights-float8", lambda t: t.__setitem__(first, t[first].to(torch.float8_e4m3fn)), ("F8_E4M3",)),
            ("weights-int32", lambda t: t.__setitem__(first, t[first].to(torch.int32)), ("'I32'",)),
            ("weights-bool", lambda t: t.__setitem__(first, t[first] > 0), ("'BOOL'",)),
            ("weights-float64", lambda t: t.__setitem__(first, t[first].double()), ("'F64'",)),
            ("weights-shape", lambda t: t.__setitem__(first, t[first][:, :-1].contiguous()), ("shape",)),
            ("weights-missing-tensor", lambda t: t.pop(first), ("missing tensors",)),
            ("weights-extra-tensor", lambda t: t.__setitem__("generators.0.lora_A", torch.zeros(2)),
             ("unexpected tensors",))]:
        d = _copy(valid, root, kind)
        _edit_tensors(d, fn)
        case(kind, *words)
    data = open(os.path.join(valid, WEIGHTS), "rb").read()
    for kind, blob, words in [
            ("weights-empty", b"", ("not a valid safetensors file",)),
            ("weights-truncated", data[:len(data) // 2], ("not a valid safetensors file",)),
            ("weights-garbage", bytes(range(256)) * 64, ("not a valid safetensors file",))]:
        d = _copy(valid, root, kind)
        open(os.path.join(d, WEIGHTS), "wb").write(blob)
        case(kind, *words)
    d = _copy(valid, root, "header-giant-length")
    _raw_header(d, 1 << 40, b"{}")
    case("header-giant-length", "header of")
    d = _copy(valid, root, "header-deep-nesting")
    nested = b"[" * 5000
    _raw_header(d, len(nested), nested)
    case("header-deep-nesting", "nests deeper")
    # -- not regular files ------------------------------------------------------------------
    d = _copy(valid, root, "weights-fifo")
    os.remove(os.path.join(d, WEIGHTS))
    os.mkfifo(os.path.join(d, WEIGHTS))
    case("weights-fifo", "not a regular file")
    d = _copy(valid, root, "config-fifo")
    os.remove(os.path.join(d, CONFIG))
    os.mkfifo(os.path.join(d, CONFIG))
    case("config-fifo", "not a regular file")
    d = _copy(valid, root, "weights-directory")
    os.remove(os.path.join(d, WEIGHTS))
    os.mkdir(os.path.join(d, WEIGHTS))
    case("weights-directory", "not a regular file")
    # -- escapes from the allowed root ----------------------------------------------------------
    secret = os.path.join(outside, "secret.json")
    open(secret, "w").write('{"r": 4}')
    shutil.copytree(valid, os.path.join(outside, "valid-outside"), dirs_exist_ok=True)
    d = _copy(valid, root, "symlink-config-out")
    os.remove(os.path.join(d, CONFIG))
    os.symlink(secret, os.path.join(d, CONFIG))
    case("symlink-config-out", "outside the allowed roots")
    d = _copy(valid, root, "symlink-config-etc-passwd")
    os.remove(os.path.join(d, CONFIG))
    os.symlink("/etc/passwd", os.path.join(d, CONFIG))
    case("symlink-config-etc-passwd", "outside the allowed roots")
    d = _copy(valid, root, "symlink-weights-out")
    os.remove(os.path.join(d, WEIGHTS))
    os.symlink(os.path.join(outside, "valid-outside", WEIGHTS), os.path.join(d, WEIGHTS))
    case("symlink-weights-out", "outside the allowed roots")
    os.symlink(os.path.join(outside, "valid-outside"), os.path.join(root, "symlink-dir-out"))
    case("symlink-dir-out", "allowed root")
    d = _copy(valid, root, "hardlink-weights-out")
    os.remove(os.path.join(d, WEIGHTS))
    os.link(os.path.join(outside, "valid-outside", WEIGHTS), os.path.join(d, WEIGHTS))
    case("hardlink-weights-out", "hard links")
    cases["dot-dot-out"] = (os.path.join(root, "..", os.path.basename(outside), "valid-outside"), ("allowed root",))
    cases["missing-dir"] = (os.path.join(root, "does-not-exist"), ("does not exist",))
    return cases


def _grow_rank(t: dict, r: int) -> None:
    for k in list(t):
        v = t[k]
        if k.endswith("down.weight"):
            t[k] = torch.cat([v, torch.zeros(r - v.shape[0], v.shape[1])])
        elif k.endswith("down.bias"):
            t[k] = torch.cat([v, torch.zeros(r - v.shape[0])])
        elif k.endswith("up.weight"):
            t[k] = torch.cat([v, torch.zeros(v.shape[0], r - v.shape[1])], 1)


def _add_k_target(t: dict, q_size: int, kv_size: int) -> None:
    """Columns [q | v | up] -> [q | k | v | up] with k's vectors all ones (W_up = b_up = 0
    there): a valid adapter of the same base that also targets k."""
    for k in [k for k in t if k.endswith("up.weight")]:
        bias = k.replace("weight", "bias")
        w, b = t[k], t[bias]
        t[k] = torch.cat([w[:q_size], torch.zeros(kv_size, w.shape[1]), w[q_size:]])
        t[bias] = torch.cat([b[:q_size], torch.zeros(kv_size), b[q_size:]])
