"""The transformers reference (PedroModel) against oracles: the base model, full
recomputation, one-by-one runs, and the SPEC's parameter formula."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from vllm_pedro import AdapterError, BaseShapes, PedroConfig, PedroModel, get_pedro_model

POOLERS = ["attention", "last", "mean"]
ACTIVATIONS = ["rational", "gelu", "relu", "silu"]
FIRST_ID = 5  # ids below are special tokens (eos=0, pad=1, chat roles)


def load(directory: str):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # fixed-length generations
    return model


def randomize(pm: PedroModel, seed: int, scale: float = 0.3) -> None:
    """Random non-zero generator weights (W_up included), rational coefficients jittered."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.generators.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if name.split(".")[-1].startswith("rat_"):
                p.add_(noise * 0.05)
            else:
                p.copy_(noise * scale)


def vectors(pm: PedroModel) -> dict[int, torch.Tensor]:
    return {k: v.clone() for k, v in pm.state.vectors.items()}


def random_ids(gen: torch.Generator, vocab: int, *shape: int) -> torch.Tensor:
    return torch.randint(FIRST_ID, vocab, shape, generator=gen)


def right_padded(gen, vocab, lengths, pad_id):
    ids = torch.full((len(lengths), max(lengths)), pad_id)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = random_ids(gen, vocab, n)
        mask[b, :n] = 1
    return ids, mask


def greedy(pm, ids, mask, n):
    return pm.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, output_logits=True,
                       output_scores=True, return_dict_in_generate=True)


# -- a fresh adapter is the base model ------------------------------------------------------
@pytest.fixture(scope="module")
def base_runs(tiny_llama_dir, tiny_qwen2_dir):
    """arch -> (model, inputs, base logits): right-padded random batch with prompt lengths."""
    runs = {}
    for arch, directory in (("llama", tiny_llama_dir), ("qwen2", tiny_qwen2_dir)):
        model = load(directory)
        gen = torch.Generator().manual_seed(42)
        ids, mask = right_padded(gen, model.config.vocab_size, [7, 12, 3], model.config.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        runs[arch] = (model, dict(input_ids=ids, attention_mask=mask, prompt_lengths=torch.tensor([4, 12, 1])),
                      logits)
    return runs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("pooler", POOLERS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fresh_adapter_reproduces_base_logits_exactly(base_runs, arch, pooler, activation):
    model, inputs, base_logits = base_runs[arch]
    pm = get_pedro_model(model, PedroConfig(r=4, pooler=pooler, activation=activation))
    try:
        with torch.no_grad():
            logits = pm(**inputs).logits
        assert torch.equal(logits, base_logits)
        # the vectors were computed (all ones), so the hooks really ran
        assert sorted(pm.state.vectors) == [0, 1]
        assert all(torch.equal(v, torch.ones_like(v)) for v in pm.state.vectors.values())
    finally:
        pm.unload()
    with torch.no_grad():
        assert torch.equal(model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits,
                           base_logits)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fresh_adapter_generates_base_tokens(base_runs, arch):
    model, inputs, _ = base_runs[arch]
    gen = torch.Generator().manual_seed(1)
    ids = random_ids(gen, model.config.vocab_size, 2, 6)
    mask = torch.ones_like(ids)
    base = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    pm = get_pedro_model(model, PedroConfig(r=4))
    try:
        out = greedy(pm, ids, mask, 6)
    finally:
        pm.unload()
    assert torch.equal(out.sequences, base.sequences)
    for a, b in zip(out.logits, base.logits):
        assert torch.equal(a, b)


# -- trainable parameters -------------------------------------------------------------------
def small_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama-gqa":  # d=48, d_q=4*16=64 != d, d_v=2*16=32, d_ff=80, 3 layers
        cfg = LlamaConfig(vocab_size=64, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=80)
        widths = dict(d=48, q=64, k=32, v=32, up=80, layers=3)
    else:  # qwen2: d=64, d_q=64, d_v=1*16=16, d_ff=96, 2 layers
        cfg = Qwen2Config(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=1, intermediate_size=96)
        widths = dict(d=64, q=64, k=16, v=16, up=96, layers=2)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), widths


@pytest.mark.parametrize("kind, r, pooler, activation, targets", [
    ("llama-gqa", 8, "attention", "rational", ("q", "v", "up")),
    ("qwen2", 5, "attention", "rational", ("q", "v", "up")),
    ("llama-gqa", 3, "attention", "rational", ("q", "k", "v")),
    ("qwen2", 4, "mean", "gelu", ("up", "k")),
    ("llama-gqa", 2, "last", "rational", ("q", "k", "v", "up")),
])
def test_only_generators_train_and_count_matches_spec_formula(kind, r, pooler, activation, targets):
    model, w = small_model(kind)
    base_total = sum(p.numel() for p in model.parameters())
    pm = get_pedro_model(model, PedroConfig(r=r, pooler=pooler, activation=activation, targets=targets))
    d, widths = w["d"], sum(w[t] for t in targets)
    per_layer = d * r + r + r * widths + widths + (d if pooler == "attention" else 0) + (
        7 + 5 if activation == "rational" else 0)
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("generators.") for n in trainable)
    assert all(not p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in trainable.values()) == w["layers"] * per_layer
    assert pm.trainable_parameters() == (w["layers"] * per_layer, w["layers"] * per_layer + base_total)
    # a training step reaches the generators and nothing else
    randomize(pm, 0)
    ids = random_ids(torch.Generator().manual_seed(0), 64, 2, 9)
    pm(ids, prompt_lengths=torch.tensor([4, 6]), labels=ids).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    for n, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


# -- the adapted model against an independent oracle ---------------------------------------
def naive_vector(g, rows: torch.Tensor) -> torch.Tensor:
    """float64 G_l(H) for one prompt, written out from the SPEC."""
    rows = rows.double()
    if g.pooler == "attention":
        h = (torch.softmax(rows @ g.pool_w.double(), 0)[:, None] * rows).sum(0)
    else:
        h = rows.mean(0) if g.pooler == "mean" else rows[-1]
    z = g.down.weight.double() @ h + g.down.bias.double()
    if g.activation == "rational":
        a, b = g.rat_num.double(), g.rat_den.double()
        z = sum(a[k] * z ** k for k in range(7)) / (1 + sum(b[k].abs() * z.abs() ** (k + 1) for k in range(5)))
    else:
        z = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "silu": torch.nn.functional.silu}[g.activation](z)
    return 1 + g.up.weight.double() @ z + g.up.bias.double()


def oracle_logits(directory, pm, ids, P):
    """No hooks: layer by layer, read H_l (input_layernorm output) of the prompt from a plain
    copy of the base, compute the vectors naively, and fold them into that layer's q/k/v/up
    weights and biases (row l_i scales output i). Then run the whole sequence."""
    oracle = load(directory)
    vecs = {}
    for i, layer in enumerate(oracle.model.layers):
        seen = {}
        handle = layer.input_layernorm.register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
        with torch.no_grad():
            oracle(input_ids=ids[:, :P])
        handle.remove()
        vecs[i] = naive_vector(pm.generators[i], seen["h"][0])
        projections = {"q": layer.self_attn.q_proj, "k": layer.self_attn.k_proj, "v": layer.self_attn.v_proj,
                       "up": layer.mlp.up_proj}
        with torch.no_grad():
            for t, (start, width) in pm.config.target_columns().items():
                scale = vecs[i][start:start + width].float()
                projections[t].weight.mul_(scale[:, None])
                if projections[t].bias is not None:
                    projections[t].bias.mul_(scale)
    with torch.no_grad():
        return oracle(input_ids=ids).logits, vecs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("pooler, activation, targets", [
    ("attention", "rational", ("q", "v", "up")),
    ("last", "gelu", ("q", "k", "v")),
    ("mean", "silu", ("k", "up")),
    ("attention", "relu", ("q", "k", "v", "up")),
])
def test_adapted_forward_matches_weight_folding_oracle(tiny_llama_dir, tiny_qwen2_dir, arch, pooler, activation,
                                                       targets):
    directory = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    pm = get_pedro_model(load(directory), PedroConfig(r=6, pooler=pooler, activation=activation, targets=targets))
    randomize(pm, seed=len(targets))
    gen = torch.Generator().manual_seed(17)
    P, T = 7, 12
    ids = random_ids(gen, pm.base_model.config.vocab_size, 1, T)
    with torch.no_grad():
        got = pm(ids, prompt_lengths=torch.tensor([P])).logits
    want, want_vecs = oracle_logits(directory, pm, ids, P)
    for i, v in want_vecs.items():
        torch.testing.assert_close(pm.state.vectors[i][0].double(), v, atol=1e-5, rtol=1e-5)
        assert (v - 1).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        base = load(directory)(input_ids=ids).logits
    assert (base - want).abs().max() > 1e-2  # the oracle is not the base model


# -- decoding with cached vectors == recomputing from scratch -------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("pooler, activation, targets", [
    ("attention", "rational", ("q", "v", "up")),
    ("last", "silu", ("q", "v", "up")),
    ("mean", "rational", ("q", "k", "v", "up")),
])
def test_generate_equals_full_recompute_every_step(tiny_llama_dir, tiny_qwen2_dir, arch, pooler, activation,
                                                   targets):
    model = load(tiny_llama_dir if arch == "llama" else tiny_qwen2_dir)
    pm = get_pedro_model(model, PedroConfig(r=8, pooler=pooler, activation=activation, targets=targets))
    randomize(pm, seed=len(pooler) + len(targets))
    gen = torch.Generator().manual_seed(3)
    P, N = 9, 8
    ids = random_ids(gen, model.config.vocab_size, 2, P)
    out = greedy(pm, ids, torch.ones_like(ids), N)
    seqs = out.sequences
    assert seqs.shape == (2, P + N) and len(out.logits) == N
    after_generate = vectors(pm)
    assert sorted(after_generate) == [0, 1]

    with torch.no_grad():
        pm(ids)  # the prompt alone
        from_prompt = vectors(pm)
        for i in range(N):
            logits = pm(seqs[:, :P + i], prompt_lengths=torch.tensor([P, P])).logits[:, -1]
            assert torch.equal(logits.argmax(-1), seqs[:, P + i]), f"step {i}"
            torch.testing.assert_close(out.logits[i], logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out.scores[i], out.logits[i], atol=0, rtol=0)
            # the generated tokens never change the vectors
            for layer, v in from_prompt.items():
                torch.testing.assert_close(pm.state.vectors[layer], v, atol=1e-5, rtol=1e-5)
        for layer, v in from_prompt.items():
            torch.testing.assert_close(after_generate[layer], v, atol=1e-5, rtol=1e-5)
            assert (v - 1).abs().max() > 1e-2  # the adapter does something

        # the oracle can tell: vectors from every token, or no adapter, give other logits
        full = seqs[:, :P + N - 1]
        every_token = pm(full).logits[:, -1]
        assert (every_token - out.logits[-1]).abs().max() > 1e-3
        pm.state.enabled = False
        base = pm(full).logits[:, -1]
        pm.state.enabled = True
        assert (base - out.logits[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_beam_search_expands_prompt_vectors_per_beam(tiny_llama_dir, tiny_qwen2_dir, arch):
    directory = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    model = load(directory)
    gen = torch.Generator().manual_seed(4)
    ids = random_ids(gen, model.config.vocab_size, 2, 6)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    base = model.generate(ids, **kw)
    pm = get_pedro_model(model, PedroConfig(r=4))
    assert torch.equal(pm.generate(ids, **kw), base)  # fresh adapter: the base model's beams
    randomize(pm, 2)
    out = pm.generate(ids, **kw)
    assert out.shape == base.shape
    beams = vectors(pm)
    with torch.no_grad():
        pm(ids)
    for layer, v in pm.state.vectors.items():  # every beam of row b holds row b's prompt vectors
        torch.testing.assert_close(beams[layer], v.repeat_interleave(3, dim=0), atol=1e-5, rtol=1e-5)


# -- padded batches == one by one -----------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("pooler", POOLERS)
def test_right_padded_training_forward_equals_one_by_one(tiny_llama_dir, tiny_qwen2_dir, arch, pooler):
    model = load(tiny_llama_dir if arch == "llama" else tiny_qwen2_dir)
    pm = get_pedro_model(model, PedroConfig(r=6, pooler=pooler))
    randomize(pm, seed=11)
    gen = torch.Generator().manual_seed(hash((arch, pooler)) % 1000)
    lengths = [5, 13, 9, 2]
    prompt_lengths = torch.tensor([3, 6, 9, 1])  # a prompt-only row and a one-token prompt
    ids, mask = right_padded(gen, model.config.vocab_size, lengths, model.config.pad_token_id)
    with torch.no_grad():
        batch = pm(ids, attention_mask=mask, prompt_lengths=prompt_lengths).logits
        batch_vectors = vectors(pm)
        # the same prompt mask given explicitly
        pmask = torch.arange(ids.shape[1])[None] < prompt_lengths[:, None]
        torch.testing.assert_close(pm(ids, attention_mask=mask, prompt_mask=pmask).logits, batch,
                                   atol=0, rtol=0)
        for b, n in enumerate(lengths):
            alone = pm(ids[b:b + 1, :n], prompt_lengths=prompt_lengths[b:b + 1]).logits[0]
            torch.testing.assert_close(batch[b, :n], alone, atol=1e-4, rtol=1e-4)
            for layer, v in pm.state.vectors.items():
                torch.testing.assert_close(batch_vectors[layer][b], v[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("pooler", ["attention", "last"])
def test_left_padded_generate_equals_one_by_one(tiny_llama_dir, tiny_qwen2_dir, arch, pooler):
    model = load(tiny_llama_dir if arch == "llama" else tiny_qwen2_dir)
    pm = get_pedro_model(model, PedroConfig(r=6, pooler=pooler))
    randomize(pm, seed=5)
    gen = torch.Generator().manual_seed(8)
    lengths, N = [4, 10, 7, 1], 6
    T = max(lengths)
    ids = torch.full((len(lengths), T), model.config.pad_token_id)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = random_ids(gen, model.config.vocab_size, n)
        mask[b, T - n:] = 1
    out = greedy(pm, ids, mask, N)
    for b, n in enumerate(lengths):
        alone = greedy(pm, ids[b:b + 1, T - n:], mask[b:b + 1, T - n:], N)
        assert torch.equal(out.sequences[b, T:], alone.sequences[0, n:]), f"row {b}"
        for i in range(N):
            torch.testing.assert_close(out.logits[i][b], alone.logits[i][0], atol=1e-4, rtol=1e-4)


# -- structure and misuse ---------------------------------------------------------------------
def test_unsupported_model_structure_names_the_class():
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        get_pedro_model(model, PedroConfig(r=4))


def test_config_for_another_base_is_refused(tiny_llama_dir):
    model = load(tiny_llama_dir)
    c = model.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    other = BaseShapes(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size, q_size=c.hidden_size,
                       kv_size=kv + 8, ff_size=c.intermediate_size)
    with pytest.raises(AdapterError, match=rf"kv_size is {kv + 8} in the adapter .* but {kv} in LlamaForCausalLM"):
        PedroModel(model, PedroConfig(r=4, base_shapes=other))
    other.kv_size = kv  # the right shapes are accepted
    PedroModel(model, PedroConfig(r=4, base_shapes=other))


def test_unload_gives_back_the_untouched_base(tiny_qwen2_dir):
    model = load(tiny_qwen2_dir)
    ids = random_ids(torch.Generator().manual_seed(2), model.config.vocab_size, 2, 8)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        pm = get_pedro_model(model, PedroConfig(r=4))
        randomize(pm, 1)
        adapted = pm(ids).logits
        assert (adapted - base).abs().max() > 1e-2
        assert pm.unload() is model
        assert torch.equal(model(input_ids=ids).logits, base)


def test_row_without_prompt_tokens_and_decoding_without_vectors_are_refused(tiny_llama_dir):
    model = load(tiny_llama_dir)
    pm = get_pedro_model(model, PedroConfig(r=4))
    ids = random_ids(torch.Generator().manual_seed(0), model.config.vocab_size, 2, 5)
    with pytest.raises(ValueError, match="at least one prompt token"):
        pm(ids, prompt_lengths=torch.tensor([3, 0]))
    with pytest.raises(RuntimeError, match="vectors were not computed"):
        model(input_ids=ids)
