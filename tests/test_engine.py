"""Tests for model/engine.py: the fast one-token step equals the plain forward, the engine's generate gives
the plain generate's tokens, the chat prompt, batched greedy replies, and loading a model with its adapters."""
import pytest
import torch
from conftest import build_model, randomize_lora_B

from model import engine
from model.engine import decode_step, decode_weights, fast_decode_supported
from model.model import KVCache, save_model
from model.model_lora import apply_lora, merge_lora, save_lora

make_model = build_model  # a seeded smoke-sized model (tests/conftest.py)


def rand_ids(B, T, seed=1, vocab=6400):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (B, T), generator=g)   # never pad/bos/eos


# ----------------------------------------------------------------------------- the one-token step
def plain_step_logits(m, ids, n_prompt):
    """Per-step logits of the plain forward with the KV cache, the reference for the fast step."""
    cache = KVCache(m.config.num_hidden_layers, ids.size(1))
    m(ids[:, :n_prompt], kv_cache=cache)
    return torch.stack([m(ids[:, t:t + 1], kv_cache=cache, start_pos=t).logits[:, -1]
                        for t in range(n_prompt, ids.size(1))])                       # (steps, B, V)


def fast_step_logits(m, ids, n_prompt):
    cache = KVCache(m.config.num_hidden_layers, ids.size(1))
    m(ids[:, :n_prompt], kv_cache=cache)
    w = decode_weights(m)
    return torch.stack([decode_step(m, w, ids[:, t:t + 1], cache, t) for t in range(n_prompt, ids.size(1))])


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"num_key_value_heads": 4}])
def test_fast_decode_equals_plain_forward(overrides):
    """Fused, re-laid-out weights and the one-token step give the plain forward's logits (fp32, 1e-6)
    and greedy tokens; fails if a fused matrix, RoPE for one position or the cache write is wrong."""
    m, ids = make_model(**overrides), rand_ids(3, 20)
    with torch.inference_mode():
        fast, plain = fast_step_logits(m, ids, 5), plain_step_logits(m, ids, 5)
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)
    a = engine.generate(m, ids[:, :5], max_new_tokens=40, temperature=0, eos_token_id=None)
    b = m.generate(ids[:, :5], max_new_tokens=40, temperature=0, eos_token_id=None)
    c = m.generate(ids[:, :5], max_new_tokens=40, temperature=0, eos_token_id=None, use_cache=False)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_fast_decode_is_used_and_follows_weight_changes(monkeypatch):
    """The engine's generate takes the fast path; its weight copies are rebuilt after in-place updates,
    load_state_dict and .to(dtype); they never enter the state dict."""
    m, ids = make_model(), rand_ids(1, 6)
    keys = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    calls = []
    real_step = engine.decode_step
    monkeypatch.setattr(engine, "decode_step", lambda *a: calls.append(1) or real_step(*a))

    def check():   # fast path (cached) == recomputing everything without the cache
        calls.clear()
        a = engine.generate(m, ids, max_new_tokens=12, temperature=0, eos_token_id=None)
        assert len(calls) == 11
        assert torch.equal(a, m.generate(ids, max_new_tokens=12, temperature=0, eos_token_id=None, use_cache=False))
        with torch.inference_mode():   # logits too: stale copies would show here even when tokens agree
            torch.testing.assert_close(fast_step_logits(m, a, 6), plain_step_logits(m, a, 6), rtol=1e-5, atol=1e-4)

    check()
    with torch.no_grad():   # an optimizer step or a merge writes into the parameters in place
        g = torch.Generator().manual_seed(5)
        for p in (m.model.layers[0].self_attn.k_proj.weight, m.model.layers[1].mlp.up_proj.weight, m.lm_head.weight):
            p.add_(torch.randn(p.shape, generator=g))
    check()
    m.load_state_dict(make_model(seed=3).state_dict())
    check()
    m.double()
    check()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == keys   # no extra entries
    calls.clear()
    m.generate(ids, max_new_tokens=12, temperature=0, eos_token_id=None)
    assert not calls   # the model's own generate is the plain one: it never reaches the engine


def test_fast_decode_with_lora_merged_or_live():
    """A live LoRA branch falls back to the plain forward, a merged one decodes fast: both equal uncached."""
    m, ids = make_model(), rand_ids(2, 6)
    apply_lora(m, rank=4, targets="all-linear")
    randomize_lora_B(m, std=0.2)
    m.eval()
    for merged in (False, True):
        if merged:
            merge_lora(m)
        assert fast_decode_supported(m) == merged
        a = engine.generate(m, ids, max_new_tokens=16, temperature=0, eos_token_id=None)
        assert torch.equal(a, m.generate(ids, max_new_tokens=16, temperature=0, eos_token_id=None, use_cache=False))


def test_engine_generate_equals_plain_generate_when_sampling():
    """Same tokens as the model's plain generate for sampling (same random draws), EOS stops, the
    streamer and a left-padded batch (where the engine leaves the plain path in charge)."""
    m, ids = make_model(), rand_ids(2, 6)
    kw = dict(max_new_tokens=20, temperature=1.2, top_k=50, top_p=0.9, repetition_penalty=1.3, eos_token_id=None)
    torch.manual_seed(7)
    plain = m.generate(ids, **kw)
    torch.manual_seed(7)
    assert torch.equal(engine.generate(m, ids, **kw), plain)
    eos = int(m.generate(ids, max_new_tokens=20, temperature=0, eos_token_id=None)[0, 9])
    seen_plain, seen_fast = [], []
    a = m.generate(ids, max_new_tokens=20, temperature=0, eos_token_id=eos, streamer=seen_plain.append)
    b = engine.generate(m, ids, max_new_tokens=20, temperature=0, eos_token_id=eos, streamer=seen_fast.append)
    assert torch.equal(a, b) and len(seen_plain) == len(seen_fast)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    assert torch.equal(engine.generate(m, ids, max_new_tokens=8, temperature=0, attention_mask=mask),
                       m.generate(ids, max_new_tokens=8, temperature=0, attention_mask=mask))


# ----------------------------------------------------------------------------- prompts and replies
class FakeTok:
    """Token ids are characters' code points; ChatML as in model/tokenizer.py."""
    pad_id, bos_id, eos_id = 0, 1, 2
    stop_ids = (2,)   # the end-of-turn ids a reply stops at

    def apply_chat_template(self, messages, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}|" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text):
        return [ord(c) % 6000 + 3 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i > 2 or not skip_special_tokens)


def test_encode_chat_and_prompt_ids_drop_the_oldest_turn():
    tok = FakeTok()
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "a" * 20},
            {"role": "assistant", "content": "b" * 20}, {"role": "user", "content": "q"}]
    assert engine.encode_chat(tok, msgs) == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
    assert engine.prompt_ids(tok, msgs, True, 1000, 10) == engine.encode_chat(tok, msgs)
    kept = engine.prompt_ids(tok, msgs, True, 40, 10)   # the whole conversation does not fit 40 - 10
    assert kept == engine.encode_chat(tok, [msgs[0], msgs[3]])
    assert engine.prompt_ids(tok, msgs, False, 40, 10) == [tok.bos_id] + tok.encode("q")


def test_greedy_replies_batched_equal_one_at_a_time():
    """Batched (left-padded, sorted by length) greedy replies equal one prompt at a time, in the prompts'
    order; the reply is cut at <|im_end|>; the model's training mode is given back."""
    m, tok = make_model(), FakeTok()
    prompts = [rand_ids(1, n, seed=20 + n)[0].tolist() for n in (7, 3, 12, 5)]
    alone = engine.greedy_replies(m, tok, prompts, max_new_tokens=10)
    for p, reply in zip(prompts, alone):
        new = m.generate(torch.tensor([p]), max_new_tokens=10, temperature=0)[0, len(p):].tolist()
        assert reply == tok.decode(new[:new.index(2)] if 2 in new else new).strip()
    m.train()
    assert engine.greedy_replies(m, tok, prompts, max_new_tokens=10, batch_size=3) == alone
    assert m.training


# ----------------------------------------------------------------------------- loading
def test_load_base_and_adapters_and_discovery(tmp_path):
    m = make_model()
    save_model(m, tmp_path / "full_sft_64.pth", stage="sft")
    apply_lora(m, adapter_name="mine", rank=2)
    save_lora(m, tmp_path / "mine_64.pth", adapter_name="mine")
    other = make_model(seed=9)
    apply_lora(other, adapter_name="theirs", rank=2)
    save_lora(other, tmp_path / "theirs_64.pth", adapter_name="theirs")   # made for other weights
    model, ckpt, path = engine.load_base(tmp_path, "full_sft")
    assert path.name == "full_sft_64.pth" and ckpt["stage"] == "sft" and not model.training
    assert engine.adapters_for_base(model, tmp_path, skip="full_sft") == ["mine"]
    assert engine.load_adapters(model, tmp_path, ["mine"]) == [tmp_path / "mine_64.pth"]
