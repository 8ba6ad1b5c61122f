"""--optimizer muon (trainer/optim.py): which weights Muon trains, its update against torch.optim.Muon,
the loop's lr schedule and GradScaler on the combined optimizer, exact resume, and the default path.
"""
import argparse
import copy

import pytest
import torch

from conftest import assert_bitwise_equal, expect_user_error, lora_argv, quiet, run_interrupted, snapshot, weights
from model.common import TinyMindError, safe_load, setup_device
from model.model import TinyMindForCausalLM, get_config
from trainer import train_lora, train_pretrain
from trainer.optim import Muon, MuonWithAdamW, hidden_matrices, orthogonalize
from trainer.resume import run_key
from trainer.train_loop import build_optimizer, set_lr

BLOCK_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def smoke_model() -> TinyMindForCausalLM:
    torch.manual_seed(0)
    return TinyMindForCausalLM(get_config("smoke", vocab_size=320))


def fake_grads(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def pretrain_argv(ws: dict, save_dir, *extra) -> list[str]:
    return ["--preset", "smoke", "--data_path", ws["pre"], "--tokenizer_path", ws["tok"], "--cache_dir", ws["cache"],
            "--save_dir", str(save_dir), "--device", "cpu", "--max_seq_len", "32", "--batch_size", "8",
            "--learning_rate", "3e-3", "--log_interval", "5", "--eval_interval", "0", "--val_ratio", "0.05",
            *map(str, extra)]


# ------------------------------------------------------------------------------------------ pieces

def test_muon_trains_the_block_matrices_and_adamw_the_rest():
    model = smoke_model()
    names = hidden_matrices(model)
    layers = model.config.num_hidden_layers
    assert len(names) == 7 * layers
    assert all(n.startswith("model.layers.") and n.split(".")[-2] in BLOCK_MATRICES for n in names)
    opt = build_optimizer(model, 1e-3, 0.1, kind="muon")
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt.muon, torch.optim.Muon)
    on_muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    on_adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    params = dict(model.named_parameters())  # the tied LM head is the embedding: listed once
    assert on_muon == {id(params[n]) for n in names}
    assert on_adamw == {id(p) for n, p in params.items() if n not in names}  # every parameter exactly once
    adamw_names = {n for n, p in params.items() if id(p) in on_adamw}
    assert "model.embed_tokens.weight" in adamw_names and "model.norm.weight" in adamw_names
    decay = {id(p) for g in opt.adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(params["model.embed_tokens.weight"])}  # the norms never decay


def test_muon_frozen_weights_stay_out_and_no_hidden_matrix_is_an_error():
    model = smoke_model()
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    assert "model.layers.0.self_attn.q_proj.weight" not in hidden_matrices(model)
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("model.layers."))
    with pytest.raises(TinyMindError, match="no trainable hidden matrices"):
        build_optimizer(model, 1e-3, 0.1, kind="muon")


def test_muon_step_is_torch_muon_with_the_iteration_dtype_left_open():
    torch.manual_seed(0)
    shapes = [(48, 32), (16, 40)]  # tall and wide
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    fp32 = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    opts = [Muon(ours, ns_dtype=torch.bfloat16, **kw), torch.optim.Muon(theirs, **kw), Muon(fp32, **kw)]
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(s, generator=g) for s in shapes]
        for params, opt in zip((ours, theirs, fp32), opts):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
            opt.step()
    for a, b, c in zip(ours, theirs, fp32):
        assert torch.equal(a, b)  # bfloat16 (torch's choice on CUDA): bit for bit torch.optim.Muon
        assert not torch.equal(a, c)  # float32 on the CPU by default ...
        assert torch.allclose(a, c, atol=1e-3)  # ... computing the same step more precisely


def test_newton_schulz_pushes_singular_values_towards_one():
    torch.manual_seed(0)
    g = torch.randn(64, 24) @ torch.diag(torch.logspace(-1.5, 1, 24))
    before = torch.linalg.svdvals(g)
    assert before.max() / before.min() > 100  # a few directions dominate, as in a gradient
    s = torch.linalg.svdvals(orthogonalize(g, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32))
    assert s.min() > 0.6 and s.max() < 1.25  # five iterations: every direction about the same size
    tall = orthogonalize(g.T.contiguous(), (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)
    assert torch.allclose(tall, orthogonalize(g, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32).T)


def test_lr_schedule_and_lr_scale_reach_both_optimizers():
    opt = build_optimizer(smoke_model(), 1e-3, 0.1, kind="muon")
    opt.param_groups[-1]["lr_scale"] = 4.0  # Muon's group
    set_lr(opt, 2e-4)
    assert [g["lr"] for g in opt.adamw.param_groups] == [2e-4, 2e-4]
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(8e-4)


def test_gradscaler_unscales_and_steps_both_optimizers():
    ref, scaled = smoke_model(), smoke_model()
    x = torch.randint(3, 300, (2, 16))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    ref(x, labels=x).loss.backward()
    scaler.scale(scaled(x, labels=x).loss).backward()  # the fp16 path of update_weights
    opt_ref = build_optimizer(ref, 1e-3, 0.1, kind="muon")
    opt_scaled = build_optimizer(scaled, 1e-3, 0.1, kind="muon")
    opt_ref.step()
    scaler.unscale_(opt_scaled)
    scaler.step(opt_scaled)
    scaler.update()
    assert_bitwise_equal(ref.state_dict(), scaled.state_dict())  # a power-of-2 scale divides out exactly


def test_state_dict_round_trip_continues_exactly():
    a, b = smoke_model(), smoke_model()
    opt_a = build_optimizer(a, 1e-3, 0.1, kind="muon")
    for seed in range(2):
        fake_grads(a, seed)
        opt_a.step()
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, 1e-3, 0.1, kind="muon")
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # a copy, as a resume file holds
    for model, opt in ((a, opt_a), (b, opt_b)):
        fake_grads(model, 7)
        opt.step()
    assert_bitwise_equal(a.state_dict(), b.state_dict())
    with pytest.raises(TinyMindError, match="not Muon"):
        opt_b.load_state_dict(build_optimizer(b, 1e-3, 0.1).state_dict())


def test_default_is_the_plain_adamw_and_leaves_the_resume_key_alone():
    opt = build_optimizer(smoke_model(), 1e-3, 0.1)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    args = argparse.Namespace(**{**vars(train_pretrain.build_parser().parse_args([])), "data_path": "x.jsonl"})
    ctx = setup_device("cpu", "float32")
    assert args.optimizer == "adamw" and "optimizer" not in run_key(args, "pretrain", ctx)
    args.optimizer = "muon"
    assert run_key(args, "pretrain", ctx)["optimizer"] == "muon"


def test_train_lora_refuses_muon(ws, tmp_path, capsys):
    expect_user_error(capsys, train_lora.main, lora_argv(ws, tmp_path, "--optimizer", "muon"),
                      "--optimizer muon", "LoRA")
    assert snapshot(tmp_path) == {}


# ------------------------------------------------------------------------------------------ runs

@pytest.mark.slow   # trains
def test_muon_resume_is_bitwise_exact_and_refuses_an_adamw_file(ws, tmp_path, monkeypatch, capsys):
    argv = ["--optimizer", "muon", "--max_steps", 12, "--save_interval", 5]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    m1, log = quiet(train_pretrain.main, pretrain_argv(ws, straight, *argv))
    assert m1["steps"] == 12 and m1["val_loss"] is not None
    resume = safe_load(straight / "pretrain_64_resume.pth")
    assert set(resume["optimizer"]) == {"adamw", "muon"} and resume["run"]["optimizer"] == "muon"

    run_interrupted(monkeypatch, 8, train_pretrain.main, pretrain_argv(ws, cut, *argv))
    m2, log = quiet(train_pretrain.main, pretrain_argv(ws, cut, *argv, "--from_resume", 1))
    assert "at step 8/12" in log and m2["steps"] == 12
    assert_bitwise_equal(weights(straight / "pretrain_64.pth"), weights(cut / "pretrain_64.pth"))

    # an AdamW resume file does not continue as Muon (nor the other way round)
    before = snapshot(cut)
    expect_user_error(capsys, train_pretrain.main,
                      pretrain_argv(ws, cut, "--max_steps", 12, "--save_interval", 5, "--from_resume", 1),
                      "different run", "optimizer")
    assert snapshot(cut) == before
