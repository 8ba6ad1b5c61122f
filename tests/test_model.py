"""Tests for model/model.py: sizes, causality, KV cache, attention paths, generation, checkpoints."""
import inspect
import math
import os
import pickle

import pytest
import torch
from conftest import build_model
import torch.nn.functional as F

from model.common import TinyMindError
from model.model import (KVCache, PRESETS, TinyMindConfig, TinyMindForCausalLM, apply_rope, get_config,
                         load_model, save_model, state_fingerprint, unwrap_model)


make_model = build_model  # a seeded smoke-sized model (tests/conftest.py)


def rand_ids(B, T, seed=1, vocab=6400):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g)   # never pad/bos/eos


# ----------------------------------------------------------------------------- config and sizes
@pytest.mark.parametrize("preset,expected", [("small", 25.83e6), ("base", 104.03e6)])
def test_parameter_counts_match_minimind2(preset, expected):
    with torch.device("meta"):
        n = TinyMindForCausalLM(get_config(preset)).num_parameters()   # tied embeddings counted once
    assert abs(n - expected) / expected < 0.005, n


def test_config_dict_round_trip_and_errors():
    cfg = get_config("tiny", hidden_size=384, dropout=None)   # None overrides are ignored
    assert cfg.hidden_size == 384 and cfg.dropout == 0.0
    assert cfg.intermediate_size == 64 * math.ceil(int(8 * 384 / 3) / 64)
    assert TinyMindConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TinyMindError, match="bogus"):
        TinyMindConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(TinyMindError, match="smoke"):
        get_config("huge")
    with pytest.raises(TinyMindError):
        TinyMindConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    assert set(PRESETS) == {"smoke", "tiny", "small", "base", "minimind3"}


def test_parameter_names_are_llama_names():
    names = set(make_model().state_dict())
    for n in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
              "model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.o_proj.weight",
              "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
              "model.layers.1.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight",
              "model.layers.1.post_attention_layernorm.weight"]:
        assert n in names
    assert not any("rope" in n or "bias" in n for n in names)
    m = make_model()
    assert m.lm_head.weight is m.model.embed_tokens.weight


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("flash", [True, False])
def test_causality(flash):
    m, ids = make_model(flash_attn=flash), rand_ids(2, 16)
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 7) % 6400   # change token 10 only
    with torch.no_grad():
        a, b = m(ids).logits, m(changed).logits
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6, rtol=0)   # earlier positions cannot see it
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_loss_is_shifted_and_ignores_minus_100():
    m, ids = make_model(), rand_ids(2, 12)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 9:] = -100                              # right padding
    rows = []
    hook = m.lm_head.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    out = m(ids, labels=labels)
    hook.remove()
    assert out.logits is None and rows == [int((labels[:, 1:] != -100).sum())]   # the head ran on labelled rows only
    full = m(ids).logits
    ref = F.cross_entropy(full[:, :-1].reshape(-1, 6400), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, ref, atol=1e-6, rtol=0)
    out.loss.backward()   # trains: gradients reach the tied embedding, the same as through the full head
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref.backward()
    for n, p in m.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("flash", [True, False])
def test_kv_cache_incremental_equals_full_forward(flash):
    m, ids = make_model(flash_attn=flash), rand_ids(2, 20)
    with torch.no_grad():
        full = m(ids).logits
        cache = KVCache(m.config.num_hidden_layers, 32)
        parts = [m(ids[:, :8], kv_cache=cache).logits]                       # prefill
        parts += [m(ids[:, 8:11], kv_cache=cache, start_pos=8).logits]      # a chunk after cached tokens
        parts += [m(ids[:, t:t + 1], kv_cache=cache, start_pos=t).logits for t in range(11, 20)]  # one by one
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_sdpa_equals_manual_attention():
    fast, slow = make_model(flash_attn=True), make_model(flash_attn=False)
    slow.load_state_dict(fast.state_dict())
    ids = rand_ids(3, 17)
    mask = torch.ones_like(ids)
    mask[0, :4], mask[2, :9] = 0, 0
    with torch.no_grad():
        assert torch.allclose(fast(ids).logits, slow(ids).logits, atol=1e-5, rtol=0)
        assert torch.allclose(fast(ids, attention_mask=mask).logits, slow(ids, attention_mask=mask).logits,
                              atol=1e-5, rtol=0)
        stepped = []
        for m in (fast, slow):   # prefill, then one cached decoding step (the grouped-query fast path)
            cache = KVCache(2, 18)
            stepped.append(torch.cat([m(ids[:, :16], kv_cache=cache).logits,
                                      m(ids[:, 16:], kv_cache=cache, start_pos=16).logits], 1))
        assert torch.allclose(stepped[0], stepped[1], atol=1e-5, rtol=0)


def reference_attention(attn, x, theta):
    """Plain multi-head causal attention written from scratch: RoPE as explicit 2-D rotations of the
    pairs (i, i + hd/2), a loop over query heads, each reading its own key/value head."""
    B, T, C = x.shape
    nh, nkv, hd = attn.n_head, attn.n_kv, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(B, T, nh, hd)
    k = (x @ attn.k_proj.weight.T).view(B, T, nkv, hd)
    v = (x @ attn.v_proj.weight.T).view(B, T, nkv, hd)
    half = hd // 2
    ang = torch.arange(T)[:, None] * theta ** (-torch.arange(half) * 2 / hd)   # (T, hd/2)
    c, s = ang.cos()[:, None], ang.sin()[:, None]                              # (T, 1, hd/2)

    def rot(t):
        a, b = t[..., :half], t[..., half:]
        return torch.cat([a * c - b * s, a * s + b * c], -1)

    q, k = rot(q), rot(k)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(nh):
        kh = h // (nh // nkv)   # with nkv == nh: every query head has its own key/value head
        scores = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kh]) / math.sqrt(hd)
        heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, :, kh])   # (B, T, hd)
    return torch.cat(heads, -1) @ attn.o_proj.weight.T


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("flash", [True, False])
def test_attention_matches_reference_multi_head(kv_heads, flash):
    m = make_model(num_key_value_heads=kv_heads, flash_attn=flash)
    attn = m.model.layers[0].self_attn
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        T = x.size(1)
        y = attn(x, m.model.rope_cos[:T], m.model.rope_sin[:T])
        assert torch.allclose(y, reference_attention(attn, x, m.config.rope_theta), atol=1e-5, rtol=0)


def test_left_padding_forward_equals_prompt_alone():
    m = make_model()
    a, b = rand_ids(1, 5, seed=3), rand_ids(1, 9, seed=4)
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1), b])
    mask = (torch.arange(9) >= torch.tensor([[4], [0]])).long()
    with torch.no_grad():
        out = m(ids, attention_mask=mask).logits
        assert torch.allclose(out[0, 4:], m(a).logits[0], atol=1e-5, rtol=0)
        assert torch.allclose(out[1], m(b).logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_runs_in_fp32(model_dtype):
    norm = make_model().model.norm.to(model_dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 100).to(model_dtype)
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.float()
    y = norm(x)
    assert y.dtype == model_dtype
    assert torch.allclose(y.float(), ref.to(model_dtype).float(), rtol=1e-2 if model_dtype != torch.float32 else 1e-5,
                          atol=1e-6)


# ----------------------------------------------------------------------------- generate
def test_greedy_generate_cached_equals_uncached():
    m, ids = make_model(), rand_ids(2, 7)
    a = m.generate(ids, max_new_tokens=64, temperature=0, eos_token_id=None)
    b = m.generate(ids, max_new_tokens=64, temperature=0, eos_token_id=None, use_cache=False)
    assert a.shape == (2, 71) and torch.equal(a, b) and torch.equal(a[:, :7], ids)


def test_batch_with_left_padding_equals_each_prompt_alone():
    m = make_model()
    prompts = [rand_ids(1, n, seed=10 + n)[0] for n in (5, 11, 2)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    batch = m.generate(ids, max_new_tokens=24, temperature=0, eos_token_id=None, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = m.generate(p[None], max_new_tokens=24, temperature=0, eos_token_id=None)
        assert torch.equal(batch[i, T:], alone[0, len(p):])
    uncached = m.generate(ids, max_new_tokens=24, temperature=0, eos_token_id=None, attention_mask=mask,
                          use_cache=False)
    assert torch.equal(batch, uncached)


def test_eos_stops_each_row_and_streamer_sees_every_step():
    m, ids = make_model(), rand_ids(2, 6, seed=5)
    free = m.generate(ids, max_new_tokens=20, temperature=0, eos_token_id=None)[:, 6:]
    # an EOS id that row 0 emits at some step i (first time) and row 1 never emits
    i = next(i for i in range(20) if free[0, i] not in free[1] and free[0, i] not in free[0, :i])
    eos = int(free[0, i])
    seen = []
    out = m.generate(ids, max_new_tokens=20, temperature=0, eos_token_id=eos, streamer=seen.append)[:, 6:]
    assert torch.equal(out[0, :i + 1], free[0, :i + 1]) and (out[0, i + 1:] == 0).all()   # pad after EOS
    assert torch.equal(out[1], free[1])                                                    # row 1 runs on
    assert torch.equal(torch.stack(seen, 1), out)
    one = m.generate(ids[:1], max_new_tokens=20, temperature=0, eos_token_id=eos)          # all finished: stop
    assert one.shape == (1, 6 + i + 1) and one[0, -1] == eos


def test_sampling_filters():
    m, ids = make_model(), rand_ids(2, 5)
    greedy = m.generate(ids, max_new_tokens=8, temperature=0, eos_token_id=None)
    torch.manual_seed(0)
    assert torch.equal(m.generate(ids, max_new_tokens=8, temperature=0.9, top_k=1, eos_token_id=None), greedy)
    assert torch.equal(m.generate(ids, max_new_tokens=8, temperature=0.9, top_p=1e-9, eos_token_id=None), greedy)
    out = m.generate(ids, max_new_tokens=8, temperature=1.2, top_k=50, top_p=0.9, repetition_penalty=1.3,
                     eos_token_id=None)
    assert out.shape == (2, 13) and out.min() >= 0 and out.max() < 6400
    rep = m.generate(ids, max_new_tokens=16, temperature=0, repetition_penalty=1e9, eos_token_id=None)
    assert all(len(set(r.tolist())) == len(r) for r in rep)   # a huge penalty forbids any repeat


def test_context_limit():
    m = make_model(max_position_embeddings=40)
    with pytest.raises(TinyMindError, match="prompt has 40 tokens"):
        m.generate(rand_ids(1, 40), max_new_tokens=1)
    out = m.generate(rand_ids(1, 35), max_new_tokens=100, temperature=0, eos_token_id=None)
    assert out.shape == (1, 40)   # generation stops at the context limit
    with pytest.raises(TinyMindError, match="max_position_embeddings"):
        m(rand_ids(1, 41))


# ----------------------------------------------------------------------------- reference implementation
def test_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    m = make_model(num_hidden_layers=3)
    c = m.config
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
              num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
              num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
              rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True, hidden_act="silu",
              attention_bias=False, mlp_bias=False)
    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:   # v5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": c.rope_theta}
    else:
        kw["rope_theta"] = c.rope_theta
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    hf.load_state_dict(m.state_dict(), strict=True)
    ids = rand_ids(2, 33)
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- q/k norms (minimind-3, Qwen3)
def test_qk_norm_off_leaves_names_and_files_as_before():
    m = make_model()
    assert not any("q_norm" in n or "k_norm" in n for n in m.state_dict())
    assert "qk_norm" not in m.config.to_dict()   # a checkpoint without q/k norms is written exactly as before
    assert TinyMindConfig.from_dict(m.config.to_dict()).qk_norm is False
    on = make_model(qk_norm=True)
    assert on.config.to_dict()["qk_norm"] is True and TinyMindConfig.from_dict(on.config.to_dict()) == on.config


@pytest.mark.parametrize("flash", [True, False])
def test_qk_norm_normalises_each_head_before_rope(flash):
    m = make_model(qk_norm=True, flash_attn=flash)
    attn = m.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    B, T, nh, nkv, hd = 2, 7, 4, 2, 16
    x = torch.randn(B, T, 64, generator=torch.Generator().manual_seed(3))
    cos, sin = m.model.rope_cos[:T], m.model.rope_sin[:T]

    def norm(t, w):   # RMS over each head's hd features, then the (hd,) weight
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + m.config.rms_norm_eps) * w

    with torch.no_grad():
        q = norm(attn.q_proj(x).view(B, T, nh, hd).transpose(1, 2), attn.q_norm.weight)
        k = norm(attn.k_proj(x).view(B, T, nkv, hd).transpose(1, 2), attn.k_norm.weight)
        v = attn.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(~torch.ones(T, T).bool().tril(), float("-inf"))
        want = attn.o_proj((att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 64))
        assert torch.allclose(attn(x, cos, sin), want, atol=1e-5, rtol=0)
        ids = rand_ids(2, 12)
        cache = KVCache(2, 12)
        stepped = torch.cat([m(ids[:, :9], kv_cache=cache).logits] +
                            [m(ids[:, t:t + 1], kv_cache=cache, start_pos=t).logits for t in range(9, 12)], 1)
        assert torch.allclose(stepped, m(ids).logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_is_exact(tmp_path):
    m = make_model(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)   # not the preset's shape
    path = save_model(torch.compile(m), tmp_path / "ckpt.pth", stage="pretrain", weight="pretrain")
    assert not (tmp_path / "ckpt.pth.tmp").exists()
    back, ckpt = load_model(path)                    # no architecture flags: the file rebuilds it
    assert ckpt["format"] == "tinymind-model" and ckpt["stage"] == "pretrain"
    assert back.config == m.config and not back.training
    assert back.lm_head.weight is back.model.embed_tokens.weight
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = rand_ids(2, 10)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, back(ids).logits)
    assert state_fingerprint(sd) == state_fingerprint(sd2) == state_fingerprint(torch.compile(m).state_dict())
    half, _ = load_model(path, dtype="bfloat16")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert state_fingerprint(half.state_dict()) == state_fingerprint(sd)   # bf16 copy: same base model
    with torch.no_grad():
        m.model.norm.weight[0] += 0.5
    assert state_fingerprint(m.state_dict()) != state_fingerprint(sd2)


def test_unwrap_model():
    m = make_model()
    assert unwrap_model(torch.compile(m)) is m and unwrap_model(m) is m


class Evil:
    def __reduce__(self):
        return os.system, (f"touch {os.environ['TINYMIND_MARKER']}",)


def test_load_refuses_bad_files(tmp_path, monkeypatch):
    good = save_model(make_model(), tmp_path / "good.pth")
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TINYMIND_MARKER", str(marker))
    (tmp_path / "evil_raw.pth").write_bytes(pickle.dumps({"format": "tinymind-model", "x": Evil()}, protocol=2))
    torch.save({"format": "tinymind-model", "config": {}, "model": Evil()}, tmp_path / "evil_zip.pth")
    for name in ["truncated.pth", "text.pth", "evil_raw.pth", "evil_zip.pth", "missing.pth"]:
        with pytest.raises(TinyMindError):
            load_model(tmp_path / name)
    assert not marker.exists()

    ckpt = torch.load(good, weights_only=True)
    bad = {
        "wrong_format": {**ckpt, "format": "tinymind-lora"},
        "no_config": {k: v for k, v in ckpt.items() if k != "config"},
        "unknown_key": {**ckpt, "config": {**ckpt["config"], "n_experts": 4}},
        "missing_weight": {**ckpt, "model": {k: v for k, v in ckpt["model"].items() if "norm" not in k}},
        "extra_weight": {**ckpt, "model": {**ckpt["model"], "model.extra.weight": torch.zeros(2)}},
        "wrong_shape": {**ckpt, "config": {**ckpt["config"], "intermediate_size": 128}},
    }
    for name, obj in bad.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        with pytest.raises(TinyMindError, match=r"format|config|missing|unknown|shape|n_experts"):
            load_model(tmp_path / f"{name}.pth")


def test_save_refuses_foreign_state(tmp_path):
    m = make_model()
    with pytest.raises(TinyMindError, match="unknown tensor"):
        save_model(m, tmp_path / "x.pth", state_dict={**m.state_dict(), "lora_A": torch.zeros(1)})
    with pytest.raises(TinyMindError, match="reserved"):
        save_model(m, tmp_path / "x.pth", config={})
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.slow   # torch.compile (about a minute on 2 cores)
def test_compiled_training_step_equals_eager(make_model):
    """--use_compile 1 (torch.compile, what dev/bench.py's train_compile times): the same loss and the
    same gradients as the eager model, to float tolerance."""
    torch.manual_seed(0)
    model = make_model(seed=3)
    ids = torch.randint(3, model.config.vocab_size, (2, 24))
    labels = ids.clone()
    labels[:, :5] = -100                                  # a prompt without labels, as in SFT
    eager = model(ids, labels=labels).loss
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)(ids, labels=labels).loss
    compiled.backward()
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5, rtol=1e-4), n
