"""Adapter save / load: an exact round trip, and every malformed or mismatched adapter
refused with an AdapterError that names the problem."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from vllm_pedro import AdapterError, PedroConfig, PedroModel, get_pedro_model
from vllm_pedro.adapter_io import expected_tensor_shapes, load_adapter, save_adapter, validate_tensors
from vllm_pedro.config import CONFIG_NAME, WEIGHTS_NAME, BaseShapes
from vllm_pedro.hf.model import base_shapes_of
from vllm_pedro.testing import build_random_adapters, randomize_generators

FIRST_ID = 5


def load(directory: str):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def randomize(pm: PedroModel, seed: int) -> None:
    randomize_generators(pm, seed, std=0.3, rational_std=0.05)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load(tiny_llama_dir)


@pytest.fixture
def saved(tmp_path, llama):
    """A saved random adapter for the tiny llama: (directory, config, tensors)."""
    pm = get_pedro_model(llama, PedroConfig(r=4))
    randomize(pm, 0)
    directory = str(tmp_path / "adapter")
    pm.save_pretrained(directory)
    tensors = {k: v.clone() for k, v in pm.adapter_state_dict().items()}
    config = pm.config
    pm.unload()
    return directory, config, tensors


def refuse(directory, llama, *words):
    """load_adapter and PedroModel.from_pretrained both refuse, naming every word."""
    for attempt in (lambda: load_adapter(directory, base=base_shapes_of(llama)),
                    lambda: PedroModel.from_pretrained(llama, directory)):
        with pytest.raises(AdapterError) as e:
            attempt()
        for w in words:
            assert w in str(e.value), (w, str(e.value))
    return str(e.value)


# -- round trip -----------------------------------------------------------------------------
@pytest.mark.parametrize("pooler, activation, targets, dtype", [
    ("attention", "rational", ("q", "v", "up"), "float32"),
    ("last", "gelu", ("k", "q"), "float32"),
    ("mean", "rational", ("q", "k", "v", "up"), "bfloat16"),
])
def test_save_load_round_trip_is_exact(tmp_path, tiny_llama_dir, pooler, activation, targets, dtype):
    model = load(tiny_llama_dir)
    pm = get_pedro_model(model, PedroConfig(r=5, pooler=pooler, activation=activation, targets=targets,
                                            dtype=dtype))
    randomize(pm, 3)
    directory = str(tmp_path / "a")
    pm.save_pretrained(directory)
    assert sorted(os.listdir(directory)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    on_disk = load_file(os.path.join(directory, WEIGHTS_NAME))
    want = expected_tensor_shapes(pm.config)
    assert {k: tuple(v.shape) for k, v in on_disk.items()} == want
    cfg = json.loads(open(os.path.join(directory, CONFIG_NAME)).read())
    s = base_shapes_of(model)
    assert cfg["base_shapes"] == {"num_layers": s.num_layers, "hidden_size": s.hidden_size,
                                  "q_size": s.q_size, "kv_size": s.kv_size, "ff_size": s.ff_size}
    assert cfg["base_model_name_or_path"] == tiny_llama_dir and cfg["method"] == "pedro"

    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(FIRST_ID, model.config.vocab_size, (2, 7), generator=gen)
    out = pm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                      output_logits=True, return_dict_in_generate=True)
    own = {k: v.clone() for k, v in pm.adapter_state_dict().items()}
    pm.unload()

    back = PedroModel.from_pretrained(load(tiny_llama_dir), directory)
    assert back.config == pm.config
    theirs = back.adapter_state_dict()
    assert sorted(theirs) == sorted(own)
    for k, v in own.items():
        assert theirs[k].dtype == v.dtype and torch.equal(theirs[k], v), k
    out2 = back.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out2.sequences, out.sequences)
    for a, b in zip(out2.logits, out.logits):
        assert torch.equal(a, b)


def test_expected_tensor_shapes_match_hand_list():
    s = BaseShapes(num_layers=2, hidden_size=12, q_size=16, kv_size=8, ff_size=20)
    c = PedroConfig(r=3, targets=("v", "up"), base_shapes=s)
    out = 8 + 20
    want = {}
    for i in range(2):
        want.update({f"generators.{i}.pool_w": (12,), f"generators.{i}.down.weight": (3, 12),
                     f"generators.{i}.down.bias": (3,), f"generators.{i}.rat_num": (7,),
                     f"generators.{i}.rat_den": (5,), f"generators.{i}.up.weight": (out, 3),
                     f"generators.{i}.up.bias": (out,)})
    assert expected_tensor_shapes(c) == want
    c2 = PedroConfig(r=3, pooler="mean", activation="silu", targets=("q",), base_shapes=s)
    assert set(expected_tensor_shapes(c2)) == {f"generators.{i}.{n}" for i in range(2)
                                               for n in ("down.weight", "down.bias", "up.weight", "up.bias")}


# -- missing files, pickle ------------------------------------------------------------------
def test_missing_directory_is_refused(tmp_path, llama):
    missing = str(tmp_path / "nope")
    refuse(missing, llama, "does not exist", missing)


def test_missing_config_is_refused(saved, llama):
    directory, _, _ = saved
    os.remove(os.path.join(directory, CONFIG_NAME))
    refuse(directory, llama, f"missing {CONFIG_NAME}")


def test_missing_weights_is_refused(saved, llama):
    directory, _, _ = saved
    os.remove(os.path.join(directory, WEIGHTS_NAME))
    refuse(directory, llama, f"missing {WEIGHTS_NAME}")


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was (wrongly) opened."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["adapter_model.bin", "model.pt", "weights.pkl"])
def test_pickle_instead_of_safetensors_is_refused_unopened(saved, llama, tmp_path, name):
    directory, _, tensors = saved
    os.remove(os.path.join(directory, WEIGHTS_NAME))
    tripwire = tmp_path / "unpickled"
    with open(os.path.join(directory, name), "wb") as f:
        pickle.dump({"weights": tensors, "x": _Tripwire(str(tripwire))}, f)
    refuse(directory, llama, "pickle", name)
    assert not tripwire.exists()


# -- tensors ---------------------------------------------------------------------------------
def rewrite(directory, tensors):
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME))


@pytest.mark.parametrize("seed", range(3))
def test_wrong_tensor_shape_names_tensor_and_both_shapes(saved, llama, seed):
    directory, config, tensors = saved
    gen = torch.Generator().manual_seed(seed)
    name = sorted(tensors)[int(torch.randint(len(tensors), (1,), generator=gen))]
    good = tuple(tensors[name].shape)
    bad = good[:-1] + (good[-1] + 1 + seed,)
    tensors[name] = torch.randn(bad)
    rewrite(directory, tensors)
    refuse(directory, llama, repr(name), str(bad), str(good))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(saved, llama, value):
    directory, _, tensors = saved
    gen = torch.Generator().manual_seed(hash(str(value)) % 100)
    name = sorted(tensors)[int(torch.randint(len(tensors), (1,), generator=gen))]
    flat = tensors[name].flatten()
    flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = value
    tensors[name] = flat.reshape(tensors[name].shape)
    rewrite(directory, tensors)
    refuse(directory, llama, repr(name), "non-finite")


def test_missing_unexpected_and_integer_tensors_are_refused(saved, llama):
    directory, _, tensors = saved
    t = dict(tensors)
    del t["generators.1.up.bias"]
    rewrite(directory, t)
    refuse(directory, llama, "missing tensors", "generators.1.up.bias")
    t = dict(tensors)
    t["generators.0.lora_A"] = torch.zeros(2)
    rewrite(directory, t)
    refuse(directory, llama, "unexpected tensors", "generators.0.lora_A")
    t = dict(tensors)
    t["generators.0.down.bias"] = torch.zeros_like(t["generators.0.down.bias"], dtype=torch.int32)
    rewrite(directory, t)
    refuse(directory, llama, "'generators.0.down.bias'", "dtype 'I32'", "float32, float16 or bfloat16")


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty", "header"])
def test_corrupt_safetensors_bytes_are_refused(saved, llama, corruption):
    directory, _, _ = saved
    path = os.path.join(directory, WEIGHTS_NAME)
    data = open(path, "rb").read()
    gen = torch.Generator().manual_seed(0)
    junk = bytes(torch.randint(0, 256, (len(data),), generator=gen, dtype=torch.uint8).tolist())
    new = {"garbage": junk, "truncated": data[:len(data) // 2], "empty": b"",
           "header": data[:8] + junk[8:40] + data[40:]}[corruption]
    open(path, "wb").write(new)
    refuse(directory, llama, "not a valid safetensors file")


# -- config ------------------------------------------------------------------------------------
def edit_config(directory, **changes):
    path = os.path.join(directory, CONFIG_NAME)
    d = json.load(open(path))
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    json.dump(d, open(path, "w"))


def test_malformed_json_is_refused(saved, llama):
    directory, _, _ = saved
    path = os.path.join(directory, CONFIG_NAME)
    open(path, "w").write(open(path).read()[:-10])
    refuse(directory, llama, "not valid JSON")


def test_unknown_config_keys_are_refused(saved, llama):
    directory, _, _ = saved
    edit_config(directory, lora_alpha=32)
    refuse(directory, llama, "unknown keys", "lora_alpha")


@pytest.mark.parametrize("key, value", [("pooler", "max"), ("activation", "tanh"), ("targets", ["q", "o_proj"])])
def test_unknown_pooler_activation_target_are_refused(saved, llama, key, value):
    directory, _, _ = saved
    edit_config(directory, **{key: value})
    refuse(directory, llama, repr(value[-1] if isinstance(value, list) else value))


@pytest.mark.parametrize("value", [[2, 64], "2x64", 7, {"num_layers": "2"}, {"hidden_size": -128},
                                   {"ff_size": 1.5}])
def test_malformed_base_shapes_are_refused(saved, llama, value):
    directory, _, _ = saved
    edit_config(directory, base_shapes=value)
    refuse(directory, llama, "base_shapes")


# -- an adapter made for another base --------------------------------------------------------
@pytest.mark.parametrize("field, delta", [("num_layers", 1), ("hidden_size", 32)])
def test_adapter_for_another_base_names_field_and_both_values(tmp_path, llama, field, delta):
    """A genuine adapter of a different model (one more layer / a wider hidden state)."""
    c = llama.config
    head_dim = c.hidden_size // c.num_attention_heads
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
              num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
              head_dim=head_dim, intermediate_size=c.intermediate_size)
    key = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size"}[field]
    kw[key] += delta
    other = AutoModelForCausalLM.from_config(LlamaConfig(**kw))
    pm = get_pedro_model(other, PedroConfig(r=4))
    randomize(pm, 1)
    directory = str(tmp_path / "other")
    pm.save_pretrained(directory)
    mine, theirs = getattr(base_shapes_of(other), field), getattr(base_shapes_of(llama), field)
    assert mine != theirs
    msg = refuse(directory, llama, field, f"is {mine} in the adapter", f"but {theirs} in")
    assert "another base model" in msg
    load_adapter(directory)  # without a base to check against, the adapter itself is valid


def test_save_refuses_invalid_tensors_and_writes_nothing(tmp_path, saved):
    _, config, tensors = saved
    bad = dict(tensors)
    bad["generators.0.up.weight"] = bad["generators.0.up.weight"][:, :-1]
    directory = str(tmp_path / "never")
    with pytest.raises(AdapterError, match="generators.0.up.weight"):
        save_adapter(directory, config, bad)
    assert not os.path.exists(directory)
    validate_tensors(config, tensors)  # the good ones pass


def test_random_adapters_are_distinct_and_load(tmp_path, tiny_llama_dir, llama):
    """tiny.build_random_adapters (tests, demo, benchmarks): one base load, one adapter
    per seed; W_up non-zero, the rational coefficients near their GELU fit."""
    from vllm_pedro.generator import GELU_NUMERATOR

    dirs = {3: str(tmp_path / "a"), 4: str(tmp_path / "b")}
    assert build_random_adapters(tiny_llama_dir, dirs, std=0.2, rational_std=0.01, r=3) == list(dirs.values())
    base = base_shapes_of(llama)
    (ca, ta), (cb, tb) = (load_adapter(d, base) for d in dirs.values())
    assert ca.r == cb.r == 3 and set(ta) == set(tb)
    for name in ta:
        assert not torch.equal(ta[name], tb[name]), name
        if name.endswith("rat_num"):
            torch.testing.assert_close(ta[name], torch.tensor(GELU_NUMERATOR), atol=0.05, rtol=0)
        elif name.endswith("up.weight"):
            assert ta[name].abs().min() > 0 and 0.1 < float(ta[name].std()) < 0.3
    # the same seed gives the same adapter
    again = build_random_adapters(tiny_llama_dir, {3: str(tmp_path / "c")}, std=0.2, rational_std=0.01, r=3)
    for name, t in load_adapter(again[0], base)[1].items():
        assert torch.equal(t, ta[name]), name
