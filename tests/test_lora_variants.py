"""Tests for the LoRA variants in model/lora_variants (DoRA, VeRA, PiSSA, OLoRA, LoRA-GA, QLoRA, AdaLoRA).

For every variant: output at init = base (residual inits: W_res + s·BA = W), frozen tensors bit-identical
after optimizer steps, merged = unmerged (1e-5), save -> load exact, another base refused. Then each
variant's own claim, and against PEFT (when installed) on the same weights at the layer level.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

from conftest import build_model, logits, tokens
from model.common import TinyMindError
from model.lora_variants import TrainSetup, get_variant
from model.lora_variants.adalora import AdaLoRABudget, orthogonal_penalty
from model.lora_variants.qlora import NF4_CODE, NF4Linear, dequantize_nf4, quantize_nf4
from model.lora_adapters import combine_adapters
from model.model_lora import (LoRAConfig, adapter_names, apply_lora, load_lora, lora_modules, merge_lora, save_lora,
                              unmerge_lora)

OPTIONS = {"pissa": {"niter": 0}, "qlora": {"block_size": 64, "double_quant": 0},
           "lora_ga": {"batches": 2, "stable_gamma": 16.0}, "vera": {"d_initial": 0.1, "seed": 0},
           "adalora": {"init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0, "delta_t": 1, "beta1": 0.85,
                       "beta2": 0.85, "orth_reg": 0.5}}
MINE = ("dora", "vera", "pissa", "olora", "lora_ga", "qlora", "adalora")
RESIDUAL = ("pissa", "olora", "lora_ga")


make_model = build_model  # a seeded smoke-sized model (tests/conftest.py)


class FakeCtx:
    device = torch.device("cpu")

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def log(self, msg):
        pass


def fake_setup():
    """Two batches of random sequences for LoRA-GA's gradient."""
    items = [(t, t.clone()) for t in tokens(seed=5, B=8, T=10)]

    def collate(batch):
        ids = torch.stack([b[0] for b in batch])
        return ids, torch.stack([b[1] for b in batch]), torch.ones_like(ids)

    class Args:
        batch_size = 4
    return TrainSetup(items, collate, FakeCtx(), Args())


def variant_model(variant, seed=0, rank=4, alpha=12.0, **cfg):
    model = make_model(seed)
    apply_lora(model, LoRAConfig(rank=rank, alpha=alpha, variant=variant, options=OPTIONS.get(variant, {}), **cfg))
    spec = get_variant(variant)
    if spec.prepare is not None:
        spec.prepare(model, "default", fake_setup())
    return model


def perturb(model, seed=1, std=0.05):
    """Random values for every trainable tensor, so nothing hides behind a zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------------------- every variant

@pytest.mark.parametrize("variant", [v for v in MINE if v != "qlora"])
def test_output_at_init_equals_the_base(variant):
    x = tokens()
    want = logits(make_model(), x)
    torch.testing.assert_close(logits(variant_model(variant), x), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", MINE)
def test_frozen_tensors_stay_bit_identical_while_training(variant):
    model = variant_model(variant).train()
    frozen = {n: t.clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())
              if not t.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for step in range(3):
        model(tokens(step), labels=tokens(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if n in frozen:
            assert torch.equal(t, frozen[n]), n
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before) if p.numel() > 1) or variant == "vera"


@pytest.mark.parametrize("variant", [v for v in MINE if v != "qlora"])
def test_merged_equals_unmerged_and_unmerge_restores(variant):
    model, x = variant_model(variant), tokens()
    perturb(model)
    w0 = {n: m.base.weight.clone() for n, m in lora_modules(model)}
    want = logits(model, x)
    merge_lora(model)
    torch.testing.assert_close(logits(model, x), want, rtol=0, atol=1e-5)
    merge_lora(model)                                                  # a second merge is a no-op
    torch.testing.assert_close(logits(model, x), want, rtol=0, atol=1e-5)
    unmerge_lora(model)
    for n, m in lora_modules(model):
        torch.testing.assert_close(m.base.weight, w0[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, x), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", MINE)
def test_file_round_trip_on_the_original_base_and_refuses_another(variant, tmp_path):
    model, x = variant_model(variant), tokens()
    perturb(model)
    save_lora(model, tmp_path / "a.pth")
    fresh = make_model()
    assert load_lora(fresh, tmp_path / "a.pth") == "default"
    if variant == "qlora":   # trained on the NF4 base; on the fp32 base it is the same A, B
        live = {k: p for k, p in model.named_parameters() if "lora_" in k}
        for k, p in fresh.named_parameters():
            if "lora_" in k:
                assert torch.equal(p, live[k])
    else:
        torch.testing.assert_close(logits(fresh, x), logits(model, x), rtol=0, atol=1e-5)
    with pytest.raises(TinyMindError, match="other base weights"):
        load_lora(make_model(seed=7), tmp_path / "a.pth")


def test_companion_adapters_are_recorded_and_required(tmp_path):
    model = variant_model("dora")
    perturb(model)
    save_lora(model, tmp_path / "first.pth")
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets="q_proj"), adapter_name="second")
    perturb(model, seed=2)
    save_lora(model, tmp_path / "second.pth", adapter_name="second")
    with pytest.raises(TinyMindError, match=r"trained on top of adapter 'default'.*not active"):
        load_lora(make_model(), tmp_path / "second.pth")
    fresh = make_model()
    load_lora(fresh, tmp_path / "first.pth")
    load_lora(fresh, tmp_path / "second.pth")
    assert adapter_names(fresh, active_only=True) == ("default", "second")
    torch.testing.assert_close(logits(fresh, tokens()), logits(model, tokens()), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- residual-base inits

@pytest.mark.parametrize("variant", RESIDUAL)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_residual_inits_keep_w_and_save_a_plain_rank_2r_lora(variant, use_rslora, tmp_path):
    base = make_model()
    model = variant_model(variant, use_rslora=use_rslora)
    originals = dict(base.named_modules())
    for n, m in lora_modules(model):
        w = originals[n].weight
        rebuilt = m.base.weight + m.scaling["default"] * m.lora_B["default"] @ m.lora_A["default"]
        torch.testing.assert_close(rebuilt, w, rtol=0, atol=1e-5)
    perturb(model)
    save_lora(model, tmp_path / "a.pth")
    saved = torch.load(tmp_path / "a.pth", weights_only=True)
    cfg = saved["lora_config"]
    assert cfg["variant"] == "lora" and cfg["rank"] == 8 and cfg["options"]["trained_as"] == variant
    assert cfg["alpha"] == pytest.approx(12.0 * (math.sqrt(2) if use_rslora else 2.0))
    fresh = make_model()
    load_lora(fresh, tmp_path / "a.pth")
    torch.testing.assert_close(logits(fresh, tokens()), logits(model, tokens()), rtol=0, atol=1e-5)


def test_pissa_residual_holds_the_small_singular_values():
    base, model = make_model(), variant_model("pissa")
    originals = dict(base.named_modules())
    for n, m in lora_modules(model):
        s = torch.linalg.svdvals(originals[n].weight.detach())
        res = m.base.weight.detach().pow(2).sum()
        torch.testing.assert_close(res, s[4:].pow(2).sum(), rtol=1e-4, atol=1e-6)


def test_olora_b_has_orthonormal_columns():
    for _, m in lora_modules(variant_model("olora")):
        B = m.lora_B["default"].detach()
        torch.testing.assert_close(B.t() @ B, torch.eye(4), rtol=0, atol=1e-5)


def test_lora_ga_init_follows_the_gradient():
    """s·B₀A₀ lies in the span of G's top singular vectors: A₀'s rows are G's first right vectors."""
    model = make_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=12.0, variant="lora_ga", options=OPTIONS["lora_ga"]))
    setup = fake_setup()
    from model.lora_variants.lora_ga import average_gradients
    from model.lora_variants import adapter_layers
    layers = adapter_layers(model, "default")
    grads = average_gradients(model, layers, setup, 2)
    get_variant("lora_ga").prepare(model, "default", fake_setup())
    for n, m in layers:
        _, _, Vh = torch.linalg.svd(grads[n], full_matrices=False)
        A = m.lora_A["default"].detach()
        zeta = m.out_features ** 0.25 / 4.0
        torch.testing.assert_close((A / zeta) @ (A / zeta).t(), torch.eye(4), rtol=0, atol=1e-4)
        proj = (A / zeta) @ Vh[:4].t()                               # rotation inside the top-r subspace
        torch.testing.assert_close(proj.abs().sum(dim=1), torch.ones(4), rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------- QLoRA / NF4

def test_nf4_code_book_is_the_qlora_construction():
    """NF4 as QLoRA builds it (arXiv 2305.14314; bitsandbytes' create_normal_map): 8 quantiles of N(0, 1) at
    probabilities linspace(delta, 1/2, 9)[:-1], minus 7 at linspace(delta, 1/2, 8)[:-1], and an exact 0, sorted
    and divided by the largest; delta halfway between 1 - 1/(2*15) and 1 - 1/(2*16) (0.9677083)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    delta = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    positive = normal.icdf(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])
    code = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    code = code / code.max()
    torch.testing.assert_close(NF4_CODE.double(), code, rtol=0, atol=1e-6)   # fp32 rounding: ~2e-7
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert NF4_CODE[0] == -1.0 and NF4_CODE[-1] == 1.0 and (NF4_CODE == 0).sum() == 1   # exact ends and zero
    assert (NF4_CODE[1:] > NF4_CODE[:-1]).all()


def test_nf4_code_book_equals_installed_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional")
    assert NF4_CODE.tolist() == bnb.get_4bit_type("nf4", device="cpu").tolist()


def test_nf4_error_bound_block_maxima_and_zeros():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g) * 0.02
    w[3, :7] = 0.0
    q = quantize_nf4(w, 64)
    back = dequantize_nf4(q, w.shape, 64)
    blocks, back_blocks = w.reshape(-1, 64), back.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1)
    assert ((blocks - back_blocks).abs().amax(dim=1) <= 0.1519 * absmax + 1e-12).all()
    where = blocks.abs().argmax(dim=1)
    assert torch.equal(back_blocks.gather(1, where[:, None]), blocks.gather(1, where[:, None]))
    assert (back[3, :7] == 0).all()
    assert q["packed"].dtype == torch.uint8 and q["packed"].numel() == w.numel() // 2
    idx = torch.bucketize(blocks[0, :2] / absmax[0], (NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
    assert q["packed"][0].item() == (idx[0].item() << 4) | idx[1].item()   # first value in the high nibble
    dq = dequantize_nf4(quantize_nf4(w, 64, double_quant=True), w.shape, 64)
    assert (w - dq).abs().max() <= 0.16 * w.abs().max()


def test_nf4_linear_stores_about_four_bits_per_weight():
    lin = nn.Linear(512, 512, bias=False)
    nbytes = lambda m: sum(b.numel() * b.element_size() for b in m.buffers())   # noqa: E731
    q, dq = NF4Linear(lin, 64, False), NF4Linear(lin, 64, True)
    assert nbytes(q) * 8 / lin.weight.numel() == pytest.approx(4.5)
    assert nbytes(dq) * 8 / lin.weight.numel() == pytest.approx(4.127, abs=0.01)
    torch.testing.assert_close(q.weight, dequantize_nf4(quantize_nf4(lin.weight), (512, 512)))


def test_qlora_cannot_merge_into_nf4():
    model = variant_model("qlora")
    with pytest.raises(TinyMindError, match="cannot merge exactly into a 4-bit"):
        merge_lora(model)


# ---------------------------------------------------------------------------- DoRA, VeRA, AdaLoRA

def test_dora_cannot_be_combined_by_concatenation():
    model = variant_model("dora")
    with pytest.raises(TinyMindError, match="not low-rank"):
        combine_adapters(model, ["default"], [1.0], "mix")


def test_dora_with_dropout_feeds_the_base_term_the_dropped_input():
    """y = Wx + (m/n − 1) ⊙ W·drop(x) + (m/n) ⊙ s·B(A·drop(x)), one dropout mask for both terms."""
    from model.model_lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12, bias=False))
    layer.add_adapter("d", LoRAConfig(rank=4, alpha=6.0, dropout=0.5, variant="dora"))
    layer.active = ("d",)
    with torch.no_grad():
        layer.lora_B["d"].normal_(std=0.1)
        layer.variants["d"].magnitude.mul_(1.3)
    layer.train()
    x = torch.randn(3, 16)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    h = layer.lora_dropout["d"](x)
    W, A, B = layer.base.weight, layer.lora_A["d"], layer.lora_B["d"]
    n = (W + 1.5 * B @ A).norm(dim=1)
    scale = layer.variants["d"].magnitude / n
    want = x @ W.t() + (scale - 1) * (h @ W.t()) + scale * (1.5 * h @ A.t() @ B.t())
    torch.testing.assert_close(y, want, rtol=0, atol=1e-6)


def test_vera_trainable_count_and_shared_matrices():
    model = make_model()
    info = apply_lora(model, LoRAConfig(rank=16, variant="vera", options=OPTIONS["vera"]))
    mods = lora_modules(model)
    assert info["trainable"] == sum(m.out_features + 16 for _, m in mods)
    a0, a1 = mods[0][1].variants["default"], mods[-1][1].variants["default"]
    width = min(a0.vera_A.shape[1], a1.vera_A.shape[1])
    assert torch.equal(a0.vera_A[:, :width], a1.vera_A[:, :width])   # slices of one shared matrix


def test_adalora_budget_masks_and_penalty():
    model = make_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, variant="adalora", options=OPTIONS["adalora"],
                                 targets="q_proj"))
    opts = {**OPTIONS["adalora"], "tinit": 2, "tfinal": 3}
    hook = AdaLoRABudget(model, "default", opts)
    hook.on_train_start(model, None, 20)
    L = len(hook.layers)
    for t in range(1, 21):
        b, do_mask = hook.budget(t)
        if t <= 2:
            assert (b, do_mask) == (4 * L, False)
        elif t > 17:
            assert (b, do_mask) == (2 * L, True)
        else:
            assert b == int(2 * L * (1 - (t - 2) / 15) ** 3 + 2 * L)
    # masks on hand-set scores: keep the `budget` best triplets across layers
    scores = [torch.tensor([0.1, 0.9, 0.5, 0.3]), torch.tensor([0.8, 0.2, 0.7, 0.05])]
    hook.layers = hook.layers[:2]
    hook.init_budget = 8
    hook.mask_to(5, scores)
    masks = [m.variants["default"].rank_mask.tolist() for _, m in hook.layers]
    assert masks == [[0, 1, 1, 1], [1, 0, 1, 0]]   # the 5 best: 0.9, 0.8, 0.7, 0.5, 0.3
    # penalty = mean over P, Q of the Frobenius norms of PᵀP − I and QQᵀ − I
    want = []
    for _, m in lora_modules(model):
        Q, P = m.lora_A["default"], m.lora_B["default"]
        want += [torch.linalg.norm(Q @ Q.t() - torch.eye(4)), torch.linalg.norm(P.t() @ P - torch.eye(4))]
    torch.testing.assert_close(orthogonal_penalty(model, "default"), torch.stack(want).mean())


# ---------------------------------------------------------------------------- against PEFT

class Toy(nn.Module):
    """Three bias-free linear layers of different shapes (VeRA slices its shared matrices per shape)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 24, bias=False)
        self.b = nn.Linear(24, 16, bias=False)
        self.c = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def peft_pair(peft_config, cfg):
    """(our toy with the adapter, PEFT's toy with its adapter), same base weights."""
    peft = pytest.importorskip("peft")
    ours, theirs = Toy(), Toy()
    apply_lora(ours, cfg, targets="a,b,c")
    spec = get_variant(cfg.variant)
    if spec.prepare is not None:
        spec.prepare(ours, "default", None)
    return ours, peft.get_peft_model(theirs, peft_config)


def test_dora_output_and_gradients_equal_peft():
    peft = pytest.importorskip("peft")
    ours, theirs = peft_pair(peft.LoraConfig(r=4, lora_alpha=12, target_modules=["a", "b", "c"], use_dora=True),
                             LoRAConfig(rank=4, alpha=12.0, variant="dora"))
    perturb(ours)
    P = dict(theirs.named_parameters())
    with torch.no_grad():
        for n, m in lora_modules(ours):
            P[f"base_model.model.{n}.lora_A.default.weight"].copy_(m.lora_A["default"])
            P[f"base_model.model.{n}.lora_B.default.weight"].copy_(m.lora_B["default"])
            P[f"base_model.model.{n}.lora_magnitude_vector.default.weight"].copy_(m.variants["default"].magnitude)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=1e-5)
    y_ours.pow(2).sum().backward()
    y_theirs.pow(2).sum().backward()
    for n, m in lora_modules(ours):
        for mine, key in ((m.lora_A["default"], "lora_A.default.weight"), (m.lora_B["default"], "lora_B.default.weight"),
                          (m.variants["default"].magnitude, "lora_magnitude_vector.default.weight")):
            torch.testing.assert_close(mine.grad, P[f"base_model.model.{n}.{key}"].grad, rtol=1e-4, atol=1e-5)


def test_vera_matches_peft_matrices_and_output():
    peft = pytest.importorskip("peft")
    ours, theirs = peft_pair(peft.VeraConfig(r=8, target_modules=["a", "b", "c"], d_initial=0.1),
                             LoRAConfig(rank=8, variant="vera", options=OPTIONS["vera"]))
    perturb(ours, std=0.5)
    P = dict(theirs.named_parameters())
    B = dict(theirs.named_buffers())
    with torch.no_grad():
        for n, m in lora_modules(ours):
            v = m.variants["default"]
            P[f"base_model.model.{n}.vera_lambda_b.default"].copy_(v.vera_b)
            P[f"base_model.model.{n}.vera_lambda_d.default"].copy_(v.vera_d)
    shared_A = next(t for k, t in B.items() if k.endswith("vera_A.default"))
    shared_B = next(t for k, t in B.items() if k.endswith("vera_B.default"))
    for _, m in lora_modules(ours):
        v = m.variants["default"]
        assert torch.equal(v.vera_A, shared_A[:, :m.in_features]) and torch.equal(v.vera_B, shared_B[:m.out_features])
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant,init", [("pissa", "pissa"), ("olora", "olora")])
def test_residual_inits_equal_peft(variant, init):
    peft = pytest.importorskip("peft")
    ours, theirs = peft_pair(peft.LoraConfig(r=4, lora_alpha=12, target_modules=["a", "b", "c"], init_lora_weights=init),
                             LoRAConfig(rank=4, alpha=12.0, variant=variant, options=OPTIONS.get(variant, {})))
    P = dict(theirs.named_parameters())
    for n, m in lora_modules(ours):
        BA = m.lora_B["default"] @ m.lora_A["default"]
        peft_BA = P[f"base_model.model.{n}.lora_B.default.weight"] @ P[f"base_model.model.{n}.lora_A.default.weight"]
        torch.testing.assert_close(BA, peft_BA, rtol=0, atol=1e-5)
        torch.testing.assert_close(m.base.weight, P[f"base_model.model.{n}.base_layer.weight"], rtol=0, atol=1e-5)


def test_adalora_output_equals_peft():
    peft = pytest.importorskip("peft")
    ours, theirs = peft_pair(peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                                                target_modules=["a", "b", "c"]),
                             LoRAConfig(rank=4, alpha=8.0, variant="adalora", options=OPTIONS["adalora"]))
    perturb(ours, std=0.3)
    P = dict(theirs.named_parameters())
    with torch.no_grad():
        for n, m in lora_modules(ours):
            P[f"base_model.model.{n}.lora_A.default"].copy_(m.lora_A["default"])
            P[f"base_model.model.{n}.lora_B.default"].copy_(m.lora_B["default"])
            P[f"base_model.model.{n}.lora_E.default"].copy_(m.variants["default"].lora_E[:, None])
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
