"""PedroConfig: validation, canonical target order, vector layout, JSON round trip."""

from __future__ import annotations

import json
import random

import pytest

from vllm_pedro.adapter_io import load_config
from vllm_pedro.config import (ACTIVATIONS, CONFIG_NAME, POOLERS, TARGETS, AdapterError, BaseShapes,
                               PedroConfig)


def random_shapes(rng: random.Random) -> BaseShapes:
    heads, kv_heads, head_dim = rng.choice([(4, 2), (8, 8), (6, 1)]) + (rng.randint(2, 9),)
    return BaseShapes(num_layers=rng.randint(1, 6), hidden_size=rng.randint(8, 100),
                      q_size=heads * head_dim, kv_size=kv_heads * head_dim, ff_size=rng.randint(8, 300))


def test_defaults_are_the_paper_setting():
    c = PedroConfig()
    assert (c.r, c.pooler, c.activation, c.targets, c.dtype, c.method) == (
        16, "attention", "rational", ("q", "v", "up"), "float32", "pedro")


@pytest.mark.parametrize("seed", range(5))
def test_target_columns_and_out_size_match_hand_layout(seed):
    rng = random.Random(seed)
    shapes = random_shapes(rng)
    targets = rng.sample(TARGETS, rng.randint(1, 4))  # random subset in random order
    c = PedroConfig(r=rng.randint(1, 32), targets=targets, base_shapes=shapes)
    # Oracle: canonical order q, k, v, up; widths by hand; columns side by side.
    width = {"q": shapes.q_size, "k": shapes.kv_size, "v": shapes.kv_size, "up": shapes.ff_size}
    canon = [t for t in ("q", "k", "v", "up") if t in targets]
    assert c.targets == tuple(canon)
    expected, start = {}, 0
    for t in canon:
        expected[t] = (start, width[t])
        start += width[t]
    assert c.target_columns() == expected
    assert c.out_size == start


def test_default_targets_under_gqa_use_kv_width_for_v():
    s = BaseShapes(num_layers=2, hidden_size=64, q_size=64, kv_size=16, ff_size=96)
    c = PedroConfig(base_shapes=s)
    assert c.target_columns() == {"q": (0, 64), "v": (64, 16), "up": (80, 96)}
    assert c.out_size == 64 + 16 + 96


@pytest.mark.parametrize("seed", range(3))
def test_json_round_trip_is_exact(tmp_path, seed):
    rng = random.Random(seed)
    c = PedroConfig(r=rng.randint(1, 64), pooler=rng.choice(POOLERS), activation=rng.choice(ACTIVATIONS),
                    targets=rng.sample(TARGETS, rng.randint(1, 4)), dtype=rng.choice(["float32", "bfloat16"]),
                    base_model_name_or_path=f"org/model-{seed}", base_shapes=random_shapes(rng),
                    extra={"note": seed})
    c.save(str(tmp_path))
    on_disk = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert on_disk == c.to_dict()
    assert isinstance(on_disk["targets"], list) and isinstance(on_disk["base_shapes"], dict)
    back = load_config(str(tmp_path))
    assert back == c
    assert isinstance(back.base_shapes, BaseShapes) and isinstance(back.targets, tuple)
    assert PedroConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("kwargs, words", [
    ({"pooler": "max"}, ["pooler", "'max'"]),
    ({"activation": "tanh"}, ["activation", "'tanh'"]),
    ({"targets": ("q", "o")}, ["targets", "'o'"]),
    ({"targets": ()}, ["targets"]),
    ({"targets": ("q", "q")}, ["duplicate", "'q'"]),
    ({"r": 0}, ["r must be", "0"]),
    ({"r": 2.5}, ["r must be", "2.5"]),
    ({"dtype": "float64"}, ["dtype", "'float64'"]),
    ({"method": "lora"}, ["method", "'lora'"]),
    ({"version": 99}, ["version", "99"]),
])
def test_invalid_options_are_refused_with_named_problem(kwargs, words):
    with pytest.raises(AdapterError) as e:
        PedroConfig(**kwargs)
    for w in words:
        assert w in str(e.value)
    # the same through from_dict (what loading adapter_config.json runs)
    with pytest.raises(AdapterError):
        PedroConfig.from_dict({**PedroConfig().to_dict(), **kwargs})


def test_unknown_keys_are_refused_by_name():
    d = PedroConfig().to_dict()
    d["lora_alpha"] = 16
    d["zz_extra"] = 1
    with pytest.raises(AdapterError, match=r"unknown keys \['lora_alpha', 'zz_extra'\]"):
        PedroConfig.from_dict(d)


def test_malformed_base_shapes_is_an_adapter_error():
    d = PedroConfig(base_shapes=BaseShapes(1, 2, 3, 4, 5)).to_dict()
    d["base_shapes"]["heads"] = 4
    with pytest.raises(AdapterError, match="malformed"):
        PedroConfig.from_dict(d)


def test_load_refuses_missing_file_bad_json_and_non_object(tmp_path):
    with pytest.raises(AdapterError, match=f"missing {CONFIG_NAME}"):
        load_config(str(tmp_path))
    (tmp_path / CONFIG_NAME).write_text('{"r": 4,')
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_config(str(tmp_path))
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(AdapterError, match="JSON object"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("shapes", [[2, 64], {"num_layers": 0, "hidden_size": 8, "q_size": 8, "kv_size": 8,
                                              "ff_size": 8},
                                    {"num_layers": 2, "hidden_size": "8", "q_size": 8, "kv_size": 8,
                                     "ff_size": 8}])
def test_malformed_base_shapes_values_are_refused(shapes):
    with pytest.raises(AdapterError, match="base_shapes"):
        PedroConfig.from_dict({**PedroConfig().to_dict(), "base_shapes": shapes})


def test_parse_json_depth_scan_counts_only_brackets_outside_strings():
    """The depth check (a regex scan) against a plain recursive count: brackets inside
    strings, escaped quotes and backslashes do not count; max_depth levels pass, one more is
    refused; what passes parses as json.loads does."""
    import json
    import random

    from vllm_pedro.config import AdapterError, parse_json

    def depth(obj):
        if isinstance(obj, dict):
            return 1 + max((depth(v) for v in obj.values()), default=0)
        if isinstance(obj, list):
            return 1 + max((depth(v) for v in obj), default=0)
        return 0

    rng = random.Random(0)
    tricky = ['[', ']', '{', '}', '"', '\\', '\\"', '[[{', 'a"b]', '\\\\"]']

    def build(d):
        if d == 0:
            return "".join(rng.choice(tricky) for _ in range(rng.randrange(4)))
        if rng.random() < 0.5:
            return [build(d - 1) for _ in range(rng.randrange(1, 3))]
        return {build(0) + str(i): build(d - 1) for i in range(rng.randrange(1, 3))}

    for _ in range(200):
        obj = build(rng.randrange(0, 9))
        text = json.dumps(obj).encode()
        n = depth(obj)
        assert parse_json(text, "x", max_depth=max(n, 1)) == obj
        if n >= 2:
            with pytest.raises(AdapterError, match="nests deeper than"):
                parse_json(text, "x", max_depth=n - 1)


def test_parse_json_hostile_strings_are_refused_in_linear_time():
    """A header of escaped quotes with no closing quote (each quote a would-be string start)
    made the depth scan quadratic: ~45 minutes holding the GIL at the 1 MiB header bound.
    Now it is refused at once, and brackets inside an unterminated string end as a JSON
    error, never a RecursionError."""
    import threading

    from vllm_pedro.adapter_io import MAX_HEADER_BYTES
    from vllm_pedro.config import AdapterError, parse_json

    hostile = [b'"' + b'\\"' * (MAX_HEADER_BYTES // 2 - 1) + b"\\", b'{"a": "' + b"[" * 100_000]
    errors = []

    def run():
        for data in hostile:
            try:
                parse_json(data, "hostile.json")
            except AdapterError as e:
                errors.append(str(e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=60)  # linear: ~0.1 s; the quadratic scan took ~45 minutes here
    assert not t.is_alive(), "the JSON depth scan did not finish on hostile input"
    assert len(errors) == 2 and all("hostile.json" in e for e in errors), errors
