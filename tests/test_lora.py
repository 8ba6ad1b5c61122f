"""Tests for model/model_lora.py (and the files beside it: lora_fused, lora_file, lora_adapters) and scripts/merge_lora.py.

LoRA configs use alpha != r and adapters get a random non-zero B, so a wrong scaling or a forgotten
adapter cannot hide behind B = 0.
"""
import copy

import pytest
import torch
from conftest import LORA_CFG as CFG, build_model, logits, lora_model, randomize_lora_B, tokens
import torch.nn as nn

from model.common import TinyMindError, atomic_save, safe_load
from model.model import load_model, save_model
import model.lora_variants  # noqa: F401  (registers the variants some tests use)
from model.lora_adapters import combine_adapters, disable_adapters, set_active_adapters
from model.lora_fused import FusedLoRA, fused_applies, use_plain_loop
from model.model_lora import (LoRAConfig, LoRAEmbedding, LoRALinear, adapter_names, apply_lora, base_state_dict,
                              load_lora, lora_modules, merge_lora, save_lora, unmerge_lora)

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


make_model = build_model  # a seeded smoke-sized model (tests/conftest.py)


# ---------------------------------------------------------------------------- the layer itself

@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_zero_initialised_lora_is_exactly_the_base(init):
    model, x = make_model(), tokens()
    ref = logits(model, x)
    info = apply_lora(model, init=init, **CFG)
    assert torch.equal(logits(model, x), ref)                     # B = 0: bit-identical, not just close
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.scaling["default"] == 3.0
    assert torch.count_nonzero(layer.lora_A["default"]) > 0 and torch.count_nonzero(layer.lora_B["default"]) == 0
    assert info["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info["total"] == sum(p.numel() for p in model.parameters())
    assert len(info["wrapped"]) == 7 * model.config.num_hidden_layers


def test_rslora_scaling_and_config_checks():
    model = make_model()
    apply_lora(model, rank=4, alpha=12.0, use_rslora=True)
    assert model.model.layers[0].mlp.up_proj.scaling["default"] == pytest.approx(6.0)   # 12 / sqrt(4)
    with pytest.raises(TinyMindError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(TinyMindError, match="unknown LoRA option"):
        apply_lora(make_model(), rnak=4)


def test_merge_equals_unmerged_is_idempotent_and_unmerge_restores_w():
    model, x = lora_model(), tokens()
    w0 = {k: v.clone() for k, v in base_state_dict(model).items()}
    y = logits(model, x)
    merge_lora(model)
    assert all(m.merged for _, m in lora_modules(model))
    torch.testing.assert_close(logits(model, x), y, rtol=0, atol=1e-5)
    w1 = {k: v.clone() for k, v in base_state_dict(model).items()}
    assert not torch.equal(w1["model.layers.0.self_attn.q_proj.weight"], w0["model.layers.0.self_attn.q_proj.weight"])
    merge_lora(model)                                              # second merge: a no-op
    assert all(torch.equal(v, w1[k]) for k, v in base_state_dict(model).items())
    unmerge_lora(model)
    unmerge_lora(model)                                            # second unmerge: a no-op
    for k, v in base_state_dict(model).items():
        torch.testing.assert_close(v, w0[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, x), y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_merge_is_done_in_fp32(dtype):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 48, bias=False).to(dtype))
    layer.add_adapter("default", LoRAConfig(**CFG))
    with torch.no_grad():
        layer.lora_B["default"].normal_(std=0.05)
    w16, A, B = layer.base.weight.clone(), layer.lora_A["default"].float(), layer.lora_B["default"].float()
    expected = (w16.float() + 3.0 * (B @ A)).to(dtype)            # fp32 sum, one rounding
    layer.active = ("default",)
    layer.merge()
    assert layer.base.weight.dtype == dtype and torch.equal(layer.base.weight, expected)
    layer.unmerge()
    assert torch.equal(layer.base.weight, (expected.float() - 3.0 * (B @ A)).to(dtype))


def test_dropout_only_in_train_mode_and_only_on_the_lora_branch():
    model, x = lora_model(dropout=0.5), tokens()
    y_eval = logits(model, x)
    merged = copy.deepcopy(model)
    merge_lora(merged)
    torch.testing.assert_close(y_eval, logits(merged, x), rtol=0, atol=1e-5)   # eval: dropout is a no-op
    model.train()
    torch.manual_seed(0)
    y1 = logits(model, x)
    assert not torch.allclose(y1, y_eval, atol=1e-5)                            # train: the branch is dropped
    with disable_adapters(model):                                               # ... but never the base path
        torch.testing.assert_close(logits(model, x), logits(make_model(), x), rtol=0, atol=0)


def test_training_step_changes_only_lora_parameters():
    model = lora_model().train()
    before = {k: v.clone() for k, v in base_state_dict(model).items()}
    lora_before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(lora_before) == 2 * 7 * model.config.num_hidden_layers
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    x = tokens()
    model(x, labels=x).loss.backward()
    opt.step()
    for k, v in base_state_dict(model).items():
        assert torch.equal(v, before[k]), k                         # bit-identical base weights
        assert not v.requires_grad
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, lora_before[n]), n


# ---------------------------------------------------------------------------- targets

def test_targets_on_gqa_kv_and_mlp_have_the_right_shapes():
    model, x = make_model(), tokens()
    cfg = model.config
    kv_out = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert kv_out != cfg.hidden_size                                # GQA: k/v are not square
    info = apply_lora(model, targets="k_proj,v_proj,down_proj", **CFG)
    assert len(info["wrapped"]) == 3 * cfg.num_hidden_layers
    k, d = model.model.layers[1].self_attn.k_proj, model.model.layers[1].mlp.down_proj
    assert k.lora_A["default"].shape == (4, cfg.hidden_size) and k.lora_B["default"].shape == (kv_out, 4)
    assert d.lora_A["default"].shape == (4, cfg.intermediate_size) and d.lora_B["default"].shape == (cfg.hidden_size, 4)
    randomize_lora_B(model)
    y = logits(model, x)
    merge_lora(model)
    torch.testing.assert_close(logits(model, x), y, rtol=0, atol=1e-5)


def test_all_linear_and_regex_targets_never_touch_embeddings_or_lm_head():
    model = make_model()
    info = apply_lora(model, targets="all-linear", **CFG)
    assert len(info["wrapped"]) == 7 * model.config.num_hidden_layers
    assert all(n.rsplit(".", 1)[1] in ALL7 for n in info["wrapped"])
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.model.embed_tokens) is nn.Embedding
    model = make_model()
    assert apply_lora(model, targets="re:.*", **CFG)["wrapped"] == info["wrapped"]
    model = make_model()
    info = apply_lora(model, targets=r"re:model\.layers\.0\.self_attn\.[qv]_proj", **CFG)
    assert info["wrapped"] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert info["trainable"] == 4 * (64 + 64) + 4 * (64 + 32)     # q: 64 -> 64, v (GQA): 64 -> 32


@pytest.mark.parametrize("targets,match", [("q_proj,qkv_proj", "'qkv_proj'"), ("lm_head", "'lm_head'"),
                                           ("re:nothing.*", "nothing"), ("re:(", "bad regex")])
def test_target_that_matches_nothing_is_an_error(targets, match):
    model = make_model()
    with pytest.raises(TinyMindError, match=match):
        apply_lora(model, targets=targets, **CFG)
    assert not lora_modules(model)                                  # nothing was wrapped half-way


def test_second_adapter_on_wrapped_modules_gets_its_own_name():
    model = lora_model(name="a")
    info = apply_lora(model, adapter_name="b", targets="q_proj", rank=2, alpha=5.0)
    q, k = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.k_proj
    assert set(q.lora_A) == {"a", "b"} and set(k.lora_A) == {"a"} and q.active == ("a", "b")
    assert info["trainable"] == model.config.num_hidden_layers * 2 * (64 + 64)   # only the new adapter trains
    assert not q.lora_A["a"].requires_grad and q.lora_A["b"].requires_grad
    with pytest.raises(TinyMindError, match="already loaded"):
        apply_lora(model, adapter_name="b", **CFG)


# ---------------------------------------------------------------------------- files

def test_save_load_round_trip_is_exact_and_self_describing(tmp_path):
    model, x = lora_model(rank=3, alpha=7.0, targets="q_proj,v_proj,up_proj", use_rslora=True), tokens()
    path = save_lora(torch.compile(model), tmp_path / "lora_identity_64.pth", lora_name="lora_identity", step=5)
    obj = safe_load(path)
    assert obj["format"] == "tinymind-lora" and obj["lora_name"] == "lora_identity" and obj["step"] == 5
    assert obj["lora_config"] == LoRAConfig(rank=3, alpha=7.0, targets="q_proj,v_proj,up_proj", use_rslora=True).to_dict()
    assert obj["base_config"] == model.config.to_dict() and len(obj["base_fingerprint"]) == 16
    keys = set(obj["adapter"])
    assert "model.layers.0.self_attn.q_proj.lora_A" in keys and len(keys) == 2 * 3 * model.config.num_hidden_layers
    assert all(k.endswith((".lora_A", ".lora_B")) and not k.startswith(("module.", "_orig_mod.")) for k in keys)

    fresh = make_model()                                            # same base weights, no rank given
    assert load_lora(fresh, path) == "lora_identity"
    assert torch.equal(logits(fresh, x), logits(model, x))
    assert fresh.model.layers[0].self_attn.v_proj.scaling["lora_identity"] == pytest.approx(7.0 / 3 ** 0.5)
    assert load_lora(fresh, path, adapter_name="again") == "again"   # same file, second name


def _saved(tmp_path, **cfg):
    model = lora_model(**cfg)
    return model, save_lora(model, tmp_path / "lora_x_64.pth")


def test_load_refuses_another_base_model_unless_forced(tmp_path):
    _, path = _saved(tmp_path)
    other_config = make_model(rope_theta=1e4)
    with pytest.raises(TinyMindError, match=r"lora_x_64\.pth was made for another base model.*rope_theta"):
        load_lora(other_config, path)
    other_weights = make_model(seed=1)
    with pytest.raises(TinyMindError, match=r"lora_x_64\.pth was trained on other base weights.*fingerprint"):
        load_lora(other_weights, path)
    assert not lora_modules(other_weights)                          # a refused file leaves the model untouched
    assert load_lora(other_weights, path, force=True) == "default"
    assert adapter_names(other_weights) == ("default",)
    with pytest.raises(TinyMindError, match="shape"):               # force never loads wrong shapes
        load_lora(make_model(hidden_size=32, num_attention_heads=2, num_key_value_heads=1), path, force=True)


def test_load_refuses_missing_unknown_and_misshapen_keys_and_non_lora_files(tmp_path):
    model, path = _saved(tmp_path)
    good = safe_load(path)

    def variant(name, edit):
        obj = copy.deepcopy(good)
        edit(obj)
        return atomic_save(obj, tmp_path / name)

    k = "model.layers.1.mlp.gate_proj.lora_B"
    cases = {
        variant("missing.pth", lambda o: o["adapter"].pop(k)): f"1 missing adapter keys: {k}",
        variant("unknown.pth", lambda o: o["adapter"].__setitem__("lm_head.lora_A", torch.zeros(4, 64))):
            "1 unknown adapter keys: lm_head.lora_A",
        variant("shape.pth", lambda o: o["adapter"].__setitem__(k, torch.zeros(64, 5))): r"has shape \(64, 5\)",
        variant("badcfg.pth", lambda o: o["lora_config"].__setitem__("rnak", 3)): "unknown LoRA config keys: rnak",
        variant("nocfg.pth", lambda o: o.pop("base_config")): "lacks .* base_config",
        save_model(model, tmp_path / "full_sft_64.pth", state_dict=base_state_dict(model)): "full model checkpoint",
        atomic_save({"weights": {}}, tmp_path / "junk.pth"): "not a TinyMind LoRA file",
    }
    (tmp_path / "text.pth").write_text("hello")
    cases[tmp_path / "text.pth"] = "not a readable LoRA file"
    for bad, message in cases.items():
        fresh = make_model()
        with pytest.raises(TinyMindError, match=message) as err:
            load_lora(fresh, bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)
        assert not lora_modules(fresh)


# ---------------------------------------------------------------------------- several adapters

def test_combined_adapter_equals_weighted_sum_of_deltas(tmp_path):
    model, x = lora_model(name="a", targets="q_proj,v_proj,down_proj"), tokens()
    apply_lora(model, adapter_name="b", rank=2, alpha=5.0, targets="v_proj,k_proj", use_rslora=True)
    randomize_lora_B(model, "b", seed=2)
    both = logits(model, x)                                         # a and b active: their sum
    combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab")
    torch.testing.assert_close(logits(model, x), both, rtol=0, atol=1e-5)
    combine_adapters(model, ["a", "b"], [0.7, -0.4], "mix")
    assert set(adapter_names(model)) == {"a", "b", "ab", "mix"}
    for _, m in lora_modules(model):
        want = sum(w * m.delta_weight(n) for n, w in (("a", 0.7), ("b", -0.4)) if n in m.lora_A)
        assert m.lora_A["mix"].shape[0] == 6 and m.scaling["mix"] == 1.0   # ranks 4 + 2 concatenated
        torch.testing.assert_close(m.delta_weight("mix"), want, rtol=0, atol=1e-6)
    mixed = logits(model, x)
    fresh = make_model()
    load_lora(fresh, save_lora(model, tmp_path / "mix.pth", adapter_name="mix"))   # a combined file loads too
    torch.testing.assert_close(logits(fresh, x), mixed, rtol=0, atol=0)


# ---------------------------------------------------------------------------- LoRA on the token embedding

def test_embedding_lora_starts_at_zero_is_a_lookup_and_leaves_the_tied_head_frozen():
    model, x = make_model(), tokens()
    base = logits(model, x)
    info = apply_lora(model, targets="embed_tokens", **CFG)
    emb = model.model.embed_tokens
    V, d = model.config.vocab_size, model.config.hidden_size
    assert info["wrapped"] == ["model.embed_tokens"] and isinstance(emb, LoRAEmbedding)
    assert info["trainable"] == CFG["rank"] * (V + d)                      # A [r, vocab], B [dim, r]
    assert torch.equal(logits(model, x), base)                             # A = 0: exactly the base model
    assert model.lm_head.weight is emb.base.weight                         # still one tied matrix
    randomize_lora_B(model)
    E, A, B = emb.base.weight, emb.lora_A["default"], emb.lora_B["default"]
    want = (E + 3.0 * (B @ A).t())[x]                                       # E'[i] = E[i] + s * B @ A[:, i]
    torch.testing.assert_close(emb(x), want, rtol=0, atol=1e-6)
    h = model.model(x)                                                      # the head reads the frozen E
    torch.testing.assert_close(logits(model, x), h.detach() @ E.t(), rtol=0, atol=1e-5)
    model(x, labels=x).loss.backward()                                      # only the seen tokens' columns learn
    seen = torch.zeros(V, dtype=torch.bool)
    seen[x.flatten()] = True
    assert (A.grad[:, ~seen] == 0).all() and (A.grad[:, seen] != 0).any() and E.grad is None


def test_embedding_lora_merges_untied_saves_plain_and_unmerges_to_the_same_tensor(tmp_path):
    model, x = lora_model(targets="q_proj,embed_tokens"), tokens()
    emb, head = model.model.embed_tokens, model.lm_head.weight
    E0 = emb.base.weight.detach().clone()
    before = logits(model, x)
    merge_lora(model)
    torch.testing.assert_close(logits(model, x), before, rtol=0, atol=1e-5)
    assert model.lm_head.weight is head and torch.equal(head, E0)          # the head's matrix was not written
    assert model.config.tie_word_embeddings is False                       # the merged model is untied
    saved = save_model(model, tmp_path / "merged.pth", state_dict=base_state_dict(model))
    plain, _ = load_model(saved)
    assert plain.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(plain, x), before, rtol=0, atol=1e-5)
    unmerge_lora(model)
    assert emb.base.weight is head and torch.equal(head, E0) and model.config.tie_word_embeddings is True
    torch.testing.assert_close(logits(model, x), before, rtol=0, atol=1e-6)   # (q_proj's W: float rounding)


def test_embedding_lora_files_combine_and_linear_only_variants_refuse(tmp_path):
    model, x = lora_model(name="a", targets="embed_tokens,v_proj"), tokens()
    apply_lora(model, adapter_name="b", rank=2, alpha=2.0, targets="embed_tokens,up_proj")
    randomize_lora_B(model, "b", seed=2)
    both = logits(model, x)
    fresh = make_model()
    for n in ("a", "b"):
        set_active_adapters(model, n)                                       # each file on its own
        load_lora(fresh, save_lora(model, tmp_path / f"{n}.pth", adapter_name=n))
    set_active_adapters(model, "a,b")
    torch.testing.assert_close(logits(fresh, x), both, rtol=0, atol=0)   # files round-trip, adapters sum
    combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab")
    torch.testing.assert_close(logits(model, x), both, rtol=0, atol=1e-5)
    model = make_model()
    for variant in ("dora", "vera", "pissa", "lora_fa"):
        with pytest.raises(TinyMindError, match="adapts linear layers only; drop embed_tokens"):
            apply_lora(model, targets="q_proj,embed_tokens", variant=variant, **CFG)
        assert not lora_modules(model)                                      # refused before anything changed


def test_set_active_and_disable_adapters():
    model, x = lora_model(name="a"), tokens()
    base = logits(make_model(), x)
    only_a = logits(model, x)
    apply_lora(model, adapter_name="b", **CFG)
    randomize_lora_B(model, "b", seed=2)
    set_active_adapters(model, "a")
    assert torch.equal(logits(model, x), only_a)
    set_active_adapters(model, ["a", "b"])
    both = logits(model, x)
    assert not torch.allclose(both, only_a)
    with disable_adapters(model):
        assert torch.equal(logits(model, x), base)
    assert torch.equal(logits(model, x), both)                      # restored on exit
    set_active_adapters(model, None)
    assert torch.equal(logits(model, x), base)
    set_active_adapters(model, "off")
    assert torch.equal(logits(model, x), base)
    with pytest.raises(TinyMindError, match="no adapter named 'c'; loaded: a, b"):
        set_active_adapters(model, "a,c")
    set_active_adapters(model, "b")
    merge_lora(model)
    with pytest.raises(TinyMindError, match="unmerge"):
        set_active_adapters(model, "a")
    with pytest.raises(TinyMindError, match="unmerge"):
        with disable_adapters(model):
            pass


# ---------------------------------------------------------------------------- the fused path (FusedLoRA)

def loss_and_grads(model, x, fused):
    use_plain_loop((m for _, m in lora_modules(model)), plain=not fused)
    model.zero_grad(set_to_none=True)
    loss = model(x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_lora_gives_the_loops_loss_and_gradients():
    model, x = lora_model(), tokens(T=40)                 # 80 rows: every layer of smoke takes the fused path
    model.train()
    assert all(fused_applies(m, torch.zeros(80, m.in_features)) for _, m in lora_modules(model))
    loss, grads = loss_and_grads(model, x, fused=False)
    loss_f, grads_f = loss_and_grads(model, x, fused=True)
    assert model(x, labels=x).loss.grad_fn is not None
    torch.testing.assert_close(loss_f, loss, rtol=0, atol=1e-5)
    assert set(grads_f) == set(grads) and len(grads) == 2 * 7 * 2   # A and B of 7 layers x 2 blocks
    for n in grads:
        torch.testing.assert_close(grads_f[n], grads[n], rtol=1e-4, atol=1e-6)
    with torch.no_grad():                                  # evaluation: one product with W + s B A
        model.eval()
        fused_logits = model(x).logits
        use_plain_loop(m for _, m in lora_modules(model))
        torch.testing.assert_close(fused_logits, model(x).logits, rtol=0, atol=1e-5)


def test_fused_lora_backward_is_the_chain_rule_in_fp64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(7, 6, dtype=torch.float64, generator=g)
    A = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: FusedLoRA.apply(x, W, A, B, 2.5), (x, A, B))
    y = FusedLoRA.apply(x, W, A, B, 2.5)
    torch.testing.assert_close(y, x @ W.t() + 2.5 * (x @ A.t()) @ B.t())


def test_fused_lora_only_where_it_computes_the_same_function():
    model = lora_model(dropout=0.1)
    layer = model.model.layers[0].self_attn.q_proj
    many, few = torch.zeros(64, 64), torch.zeros(8, 64)     # 64 x 64: fused from 32 rows on
    assert fused_applies(layer, many) and not fused_applies(layer, few)   # one decoded token: the thin products
    layer.train()
    assert not fused_applies(layer, many)                   # dropout at work on the branch's input
    layer.eval()
    layer.base.weight.requires_grad_(True)
    assert not fused_applies(layer, many)                   # W trains too: it would need dW
    layer.base.weight.requires_grad_(False)
    assert not fused_applies(layer, many.bfloat16())        # bf16: W + s B A would round small updates away
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_applies(layer, many)
    layer.merge()
    assert not fused_applies(layer, many)                   # merged: base(x) is the whole function
    layer.unmerge()
    two = lora_model(seed=0)
    apply_lora(two, adapter_name="second", **CFG)
    set_active_adapters(two, ["default", "second"])
    assert not fused_applies(two.model.layers[0].self_attn.q_proj, many)
    dora = make_model()
    apply_lora(dora, variant="dora", **CFG)
    assert not fused_applies(dora.model.layers[0].self_attn.q_proj, many)


# ---------------------------------------------------------------------------- compile, DDP, merge script

@pytest.mark.slow   # torch.compile
@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")
@pytest.mark.parametrize("T", [12, 40])   # 12: the loop in LoRALinear.forward; 40: FusedLoRA
def test_compiled_model_gives_the_same_output_and_gradients(T):
    model, x = lora_model(), tokens(T=T)
    model.train()
    eager_loss = model(x, labels=x).loss
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    try:
        # fullgraph=True: the LoRA path must trace without a single graph break; aot_eager skips the C++ build
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        loss = compiled(x, labels=x).loss
    except Exception as e:  # pragma: no cover - platforms without a working dynamo
        pytest.skip(f"torch.compile not usable here: {type(e).__name__}: {str(e)[:300]}")
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=1e-5)
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_trains_the_adapter_and_saves_clean_keys(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    try:   # one process, a file rendezvous: no network, no ports
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    except Exception as e:  # pragma: no cover - sandboxes without a usable gloo
        pytest.skip(f"gloo process group unavailable: {type(e).__name__}")
    try:
        model = lora_model()
        ddp, x = DDP(model.train()), tokens()
        ddp(x, labels=x).loss.backward()                            # every trainable param gets a gradient
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        keys = safe_load(save_lora(ddp, tmp_path / "l.pth"))["adapter"]
        assert all(k.startswith("model.layers.") for k in keys)
    finally:
        dist.destroy_process_group()


def test_merge_script_writes_a_plain_checkpoint_with_the_lora_logits(tmp_path, capsys):
    from scripts.merge_lora import main
    base = make_model()
    save_model(base, tmp_path / "full_sft_64.pth", stage="sft")
    model, x = lora_model(name="lora_identity"), tokens()
    save_lora(model, tmp_path / "lora_identity_64.pth", adapter_name="lora_identity")
    want = logits(model, x)

    out = main(["--weight", "full_sft", "--lora_weight", "lora_identity", "--save_dir", str(tmp_path),
                "--hidden_size", "64"])
    assert out == tmp_path / "full_sft_lora_identity_64.pth"
    merged, ckpt = load_model(out)                                  # plain model code, no LoRA
    assert ckpt["stage"] == "merged" and set(ckpt["model"]) == set(base.state_dict())
    torch.testing.assert_close(logits(merged, x), want, rtol=0, atol=1e-5)
    assert "max |logits merged - unmerged|" in capsys.readouterr().out

    # two adapters with weights == the exact weighted combination
    other = lora_model(name="lora_medical", b_seed=3, targets="gate_proj,up_proj")
    save_lora(other, tmp_path / "lora_medical_64.pth", adapter_name="lora_medical")
    main(["--weight", "full_sft", "--lora_weight", "lora_identity,lora_medical", "--lora_scales", "0.5,2",
          "--out_weight", "mix", "--save_dir", str(tmp_path), "--hidden_size", "64"])
    load_lora(model, tmp_path / "lora_medical_64.pth")
    combine_adapters(model, ["lora_identity", "lora_medical"], [0.5, 2.0], "mix")
    torch.testing.assert_close(logits(load_model(tmp_path / "mix_64.pth")[0], x), logits(model, x), rtol=0, atol=1e-5)

    with pytest.raises(TinyMindError, match=r"lora_nope_64\.pth .*full_sft_64.*lora_identity_64"):
        main(["--weight", "full_sft", "--lora_weight", "lora_nope", "--save_dir", str(tmp_path), "--hidden_size", "64"])


# ---------------------------------------------------------------------------- cross-check with PEFT

@pytest.mark.parametrize("use_rslora,embed", [(False, False), (True, False), (False, True)])
def test_same_logits_as_peft(use_rslora, embed):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    targets = list(ALL7) + ["embed_tokens"] * embed
    model, x = lora_model(targets=",".join(targets), use_rslora=use_rslora), tokens()
    c = model.config
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False)).eval()
    llama.load_state_dict(base_state_dict(model), strict=True)
    peft_model = peft.get_peft_model(llama, peft.LoraConfig(r=CFG["rank"], lora_alpha=CFG["alpha"], lora_dropout=0.0,
                                                            target_modules=targets, use_rslora=use_rslora))
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, m in lora_modules(model):
            for ab in "AB":   # PEFT's embedding layer keeps bare parameters lora_embedding_A / _B, same shapes
                key = (f"base_model.model.{name}.lora_embedding_{ab}.default" if isinstance(m, LoRAEmbedding)
                       else f"base_model.model.{name}.lora_{ab}.default.weight")
                peft_params[key].copy_(getattr(m, f"lora_{ab}")["default"])
    with torch.no_grad():
        theirs = peft_model(input_ids=x).logits
    torch.testing.assert_close(logits(model, x), theirs, rtol=0, atol=1e-4)
    with disable_adapters(model):                                   # and the adapters do change the logits
        assert (logits(model, x) - theirs).abs().max() > 1e-2
