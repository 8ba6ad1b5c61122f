"""The LoRA variants that change the optimizer (LoRA+, LoRA-FA, LoRA-Pro) or act during training (Delta-LoRA,
LoRA-drop): model/lora_variants/{lora_plus,lora_fa,lora_pro,delta_lora,lora_drop}.py.

Each test checks the variant's defining identity, so a wrong sign, a missing s^2 or an unshared Parameter fails.
``run_steps`` takes its steps through the loop's own ``update_weights``, so the hooks run where they do in training.
"""
import copy

import pytest
import torch

from conftest import lora_model, tokens   # lora_model: rank 4, alpha 12 (alpha != r: a forgotten s shows)
from model.common import DeviceContext
from model.model_lora import lora_modules, merge_lora, unmerge_lora
from model.lora_variants.delta_lora import DeltaLoRAHook
from model.lora_variants.lora_drop import lora_output_scores, reset_adapter, select_layers, share_lora
from model.lora_variants.lora_fa import LoRAFAHook, freeze_lora_A, lora_fa_grad
from model.lora_variants.lora_plus import make_loraplus_optimizer
from model.lora_variants.lora_pro import LoRAProHook, lora_pro_grads, solve_sylvester_sym
from model.train_hook import TrainHook
from trainer.train_loop import build_optimizer, set_lr, update_weights


def batch(seed=0, B=2, T=12):
    x = tokens(seed, B, T)
    return x, x.clone()


def run_steps(model, n, hooks=(), make_optimizer=None, lr=1e-2, clip=1.0):
    """n steps through the loop's own step function (backward, then hooks, clip, step, hooks, zero_grad)."""
    model.train()
    opt = (make_optimizer or build_optimizer)(model, lr, 0.0)
    ctx = DeviceContext(device=torch.device("cpu"))
    for h in hooks:
        h.on_train_start(model, opt, n)
    for step in range(1, n + 1):
        x, y = batch(step)
        model(x, labels=y).loss.backward()
        update_weights(model, opt, ctx, clip, hooks, step)
    return opt


def projections(A, B):
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A     # [in, in]
    P_B = B @ torch.linalg.inv(B.T @ B) @ B.T     # [out, out]
    return P_A, P_B


def random_lora_grads(seed=0, out=24, inp=20, r=4, s=3.0):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
    G = torch.randn(out, inp, generator=g)
    return A, B, G, s * B.T @ G, s * G @ A.T       # g_A = s B^T G [r, in], g_B = s G A^T [out, r]


# ----------------------------------------------------------------------------- LoRA+

def test_loraplus_groups_equal_peft():
    peft_opt = pytest.importorskip("peft.optimizers")
    model = lora_model()
    ours = make_loraplus_optimizer(16.0)(model, 1e-3, 0.0)
    theirs = peft_opt.create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)

    def by_lr(opt):   # lr -> ids of its parameters (PEFT splits B's group by decay; the lrs are what count)
        out = {}
        for g in opt.param_groups:
            out.setdefault(round(g["lr"], 12), set()).update(id(p) for p in g["params"])
        return {lr: ids for lr, ids in out.items() if ids}

    assert by_lr(ours) == by_lr(theirs)
    assert set(by_lr(ours)) == {1e-3, 1.6e-2}
    B_ids = {id(m.lora_B["default"]) for _, m in lora_modules(model)}
    assert by_lr(ours)[1.6e-2] == B_ids
    assert {g["lr_scale"] for g in ours.param_groups} == {1.0, 16.0}


def test_loraplus_puts_trainable_vectors_in_Bs_group_without_decay():
    model = lora_model()
    model.model.norm.weight.requires_grad_(True)          # a 1-D tensor that trains (like DoRA's magnitude)
    opt = make_loraplus_optimizer(4.0)(model, 1e-3, 0.1)
    group = next(g for g in opt.param_groups if any(p is model.model.norm.weight for p in g["params"]))
    assert group["lr"] == pytest.approx(4e-3) and group["lr_scale"] == 4.0 and group["weight_decay"] == 0.0


def test_loraplus_step_equals_adamw_at_ratio_lr_on_B():
    model = lora_model()
    ref = copy.deepcopy(model)
    opt = make_loraplus_optimizer(16.0)(model, 1e-3, 0.0)
    set_lr(opt, 5e-4)                                     # what the loop does with its schedule's lr
    x, y = batch()
    model(x, labels=y).loss.backward()
    ref(x, labels=y).loss.backward()
    opt.step()
    for (_, m), (_, r) in zip(lora_modules(model), lora_modules(ref)):
        for name, lr in (("lora_A", 5e-4), ("lora_B", 8e-3)):
            p = getattr(r, name)["default"]
            torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.95), weight_decay=0.0).step()
            assert torch.equal(getattr(m, name)["default"], p)


# ----------------------------------------------------------------------------- LoRA-FA

def test_lora_fa_gradient_gives_the_projection_of_G():
    A, B, G, g_A, g_B = random_lora_grads()
    s = 3.0
    g_B_fa = lora_fa_grad(A, g_B, s)
    P_A, _ = projections(A, B)
    torch.testing.assert_close(s * g_B_fa @ A, G @ P_A, rtol=0, atol=1e-5)


def test_lora_fa_keeps_A_bit_identical_and_trains_B():
    model = lora_model()
    frozen = freeze_lora_A(model, "default")
    layers = [m for _, m in lora_modules(model)]
    assert frozen == sum(m.lora_A["default"].numel() for m in layers)
    A0 = [m.lora_A["default"].clone() for m in layers]
    run_steps(model, 3, hooks=[LoRAFAHook()])
    assert all(torch.equal(m.lora_A["default"], a) for m, a in zip(layers, A0))
    assert all(m.lora_B["default"].abs().sum() > 0 for m in layers)


def test_lora_fa_hook_rewrites_the_gradient():
    model = lora_model()
    freeze_lora_A(model, "default")
    x, y = batch()
    model(x, labels=y).loss.backward()
    m = model.model.layers[0].self_attn.q_proj
    expected = lora_fa_grad(m.lora_A["default"], m.lora_B["default"].grad.clone(), m.scaling["default"])
    LoRAFAHook().after_backward(model, 1)
    torch.testing.assert_close(m.lora_B["default"].grad, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- LoRA-Pro

def test_lora_pro_equivalent_gradient_identity():
    s = 3.0
    A, B, G, g_A, g_B = random_lora_grads(s=s)
    new_A, new_B = lora_pro_grads(A, B, g_A, g_B, s)
    P_A, P_B = projections(A, B)
    equivalent = s * (B @ new_A + new_B @ A)
    target = P_B @ G + G @ P_A - P_B @ G @ P_A
    torch.testing.assert_close(equivalent, target, rtol=0, atol=1e-5)
    # the closest such update: what is left of G is orthogonal to every s (B dA + dB A)
    torch.testing.assert_close(B.T @ (G - equivalent), torch.zeros_like(g_A), rtol=0, atol=1e-4)
    torch.testing.assert_close((G - equivalent) @ A.T, torch.zeros_like(g_B), rtol=0, atol=1e-4)
    plain = s * (B @ g_A + g_B @ A)
    assert torch.linalg.norm(G - equivalent) < torch.linalg.norm(G - plain)


def test_lora_pro_X_is_the_sylvester_solution_closest_to_plain_grads():
    s = 3.0
    A, B, G, g_A, g_B = random_lora_grads(seed=1, s=s)
    new_A, new_B = lora_pro_grads(A, B, g_A, g_B, s)
    # X minimises ||g_A' - g_A||^2 + ||g_B' - g_B||^2 over the (g_A' + D A, g_B' - B D) that keep g~:
    # the derivative in D, (g_A' - g_A) A^T - B^T (g_B' - g_B), is zero there
    stationary = (new_A - g_A) @ A.T - B.T @ (new_B - g_B)
    torch.testing.assert_close(stationary, torch.zeros(4, 4), rtol=0, atol=1e-4)
    g = torch.Generator().manual_seed(5)
    P, Q, C = B.T @ B, A @ A.T, torch.randn(4, 4, generator=g)
    X = solve_sylvester_sym(P, Q, C)
    torch.testing.assert_close(P @ X + X @ Q, C, rtol=0, atol=1e-4)


def test_lora_pro_at_B_zero_trains_B_only_and_hook_runs():
    s = 3.0
    A, B, G, g_A, g_B = random_lora_grads(s=s)
    B = torch.zeros_like(B)
    new_A, new_B = lora_pro_grads(A, B, s * B.T @ G, s * G @ A.T, s)
    P_A, _ = projections(A, torch.eye(24, 4))
    assert torch.count_nonzero(new_A) == 0
    torch.testing.assert_close(s * new_B @ A, G @ P_A, rtol=0, atol=1e-5)
    model = lora_model()
    run_steps(model, 2, hooks=[LoRAProHook()])
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- Delta-LoRA

def base_weights(model):
    return {n: m.base.weight.detach().clone() for n, m in lora_modules(model)}


def test_delta_lora_with_lambda_zero_is_plain_lora():
    plain, delta = lora_model(), lora_model()
    run_steps(plain, 3)
    run_steps(delta, 3, hooks=[DeltaLoRAHook(update_ratio=0.0, start_step=0)])
    for (k, v), w in zip(plain.state_dict().items(), delta.state_dict().values()):
        assert torch.equal(v, w), k


def test_delta_lora_telescopes_and_W_gets_no_grad_or_state():
    K, T, lam = 1, 4, 2.0
    model = lora_model()
    w0 = base_weights(model)
    hook = DeltaLoRAHook(update_ratio=lam, start_step=K)
    snaps = {}

    class Snap(TrainHook):   # records B_K A_K right after step K
        def after_optimizer_step(self, model, optimizer, step):
            if step == K:
                snaps.update({n: m.delta_weight("default") for n, m in lora_modules(model)})

    opt = run_steps(model, T, hooks=[hook, Snap()])
    for n, m in lora_modules(model):
        assert not m.base.weight.requires_grad and m.base.weight not in opt.state
        expected = w0[n] + lam * (m.delta_weight("default") - snaps[n])   # W_K = W_0: it starts after step K
        torch.testing.assert_close(m.base.weight, expected, rtol=0, atol=1e-5)
        assert not torch.equal(m.base.weight, w0[n])


def test_delta_lora_refuses_dropout():
    from model.common import TinyMindError
    with pytest.raises(TinyMindError, match="dropout"):
        run_steps(lora_model(dropout=0.1), 1, hooks=[DeltaLoRAHook()])


# ----------------------------------------------------------------------------- LoRA-drop

def test_lora_drop_scores_on_hand_set_delta_w():
    model = lora_model(b_seed=None)                     # B = 0 except on the two layers set below
    layers = dict(lora_modules(model))
    q0, v1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layers[q0].lora_B["default"].copy_(torch.randn(layers[q0].lora_B["default"].shape, generator=g))
        layers[v1].lora_B["default"].copy_(torch.randn(layers[v1].lora_B["default"].shape, generator=g))
    inputs = {}
    hooks = [layers[n].register_forward_pre_hook(lambda m, i, n=n: inputs.setdefault(n, i[0].detach().clone()))
             for n in (q0, v1)]
    x, _ = batch(B=2, T=10)
    mask = torch.ones(2, 10)
    mask[1, 6:] = 0                                     # padding must not count
    scores = lora_output_scores(model, [(x, mask)], "default")
    for h in hooks:
        h.remove()
    for n in (q0, v1):
        dW = layers[n].delta_weight("default")          # s B A, [out, in]
        expected = ((inputs[n] @ dW.T).square().sum(-1) * mask).sum()
        assert scores[n] == pytest.approx(expected.item(), rel=1e-5)
    assert all(v == 0.0 for n, v in scores.items() if n not in (q0, v1))


def test_lora_drop_selection_is_the_smallest_prefix_over_the_threshold():
    scores = {"a": 1.0, "b": 5.0, "c": 3.0, "d": 1.0}  # sorted: b 5, c 3, a 1, d 1 (total 10)
    assert select_layers(scores, 0.9) == ["b", "c", "a"]
    assert select_layers(scores, 0.8) == ["b", "c"]
    assert select_layers(scores, 0.81) == ["b", "c", "a"]
    assert select_layers(scores, 0.5) == ["b"]
    assert select_layers({"a": 0.0, "b": 0.0}, 0.9) == ["a", "b"]


def test_lora_drop_shared_layers_hold_the_same_parameters_and_merge_per_layer():
    model = lora_model()
    names = [n for n, _ in lora_modules(model)]
    keep = [n for n in names if n.startswith("model.layers.0.")]
    groups = share_lora(model, "default", keep)
    layers = dict(lora_modules(model))
    assert len(groups) == 4        # one pair per shape: q/o [64,64], k/v [32,64], gate/up [I,64], down [64,I]
    for owner, users in groups.items():
        for u in users:
            assert layers[u].lora_A["default"] is layers[owner].lora_A["default"]
            assert layers[u].lora_B["default"] is layers[owner].lora_B["default"]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(trainable) == 2 * (len(keep) + len(groups))
    reset_adapter(model, "default")
    run_steps(model, 2)
    for owner, users in groups.items():
        assert all(torch.equal(layers[u].lora_B["default"], layers[owner].lora_B["default"]) for u in users)
    x, _ = batch()
    model.eval()
    with torch.no_grad():
        y = model(x).logits
        merge_lora(model)
        torch.testing.assert_close(model(x).logits, y, rtol=0, atol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(x).logits, y, rtol=0, atol=1e-5)
