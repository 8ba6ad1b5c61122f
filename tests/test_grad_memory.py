"""LoRA on a large base with less memory: each mechanism computes what the plain path computes.

- the chunked LM head (model/loss_chunked.py): loss and gradients equal the whole head's, in fp32, under
  bf16 autocast, with a head that trains (tied embedding) and without one, and for validation;
- gradient checkpointing (model/model.py::TinyMindModel): the same loss and gradients, dropout included;
- the frozen base held in bf16 (model/lora_frozen_base.py): fp32 adapters whose gradients match an fp32
  base's within bf16 tolerance, a file that loads onto the fp32 base, the demo-sized base left in fp32;
- train_lora.py's flags: a run with all three on, its log lines and its peak memory.
"""
import pytest
import torch
from conftest import build_model, expect_user_error, lora_argv, lora_model, quiet, tokens, with_base

from model.loss_chunked import chunked_head_loss, head_chunk_rows
from model.lora_frozen_base import base_dtype, hold_frozen_base
from model.model import load_model
from model.model_lora import adapter_state, base_fingerprint, load_lora
from trainer import train_lora


def labels_with_ignored(x: torch.Tensor) -> torch.Tensor:
    """Labels = the ids, with a prompt-like ignored span (-100) in each row."""
    labels = x.clone()
    labels[:, :4] = -100
    labels[1, -3:] = -100
    return labels


def loss_and_grads(model, x, labels, dtype=torch.float32):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = model(x, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a: dict, b: dict, **tol):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------- the chunked head

@pytest.mark.parametrize("lora", [False, True], ids=["full-ft-tied-head", "lora-frozen-head"])
def test_chunked_head_gives_the_whole_heads_loss_and_gradients(lora):
    model = (lora_model() if lora else build_model()).train()
    x = tokens(B=3, T=20)
    labels = labels_with_ignored(x)
    loss, grads = loss_and_grads(model, x, labels)
    model.head_chunk_rows = 7   # 3 x 19 positions, 46 labelled: chunks of 7 and a ragged last one
    chunked_loss, chunked_grads = loss_and_grads(model, x, labels)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=1e-6)
    assert_close(chunked_grads, grads, rtol=1e-5, atol=1e-7)
    if not lora:   # the tied embedding/head trains: its gradient comes through the chunked dW too
        assert "lm_head.weight" in grads or "model.embed_tokens.weight" in grads


def test_chunked_head_under_bf16_autocast_and_in_validation():
    model = lora_model().train()
    x = tokens(B=2, T=16)
    labels = labels_with_ignored(x)
    loss, grads = loss_and_grads(model, x, labels, torch.bfloat16)
    model.head_chunk_rows = 5
    chunked_loss, chunked_grads = loss_and_grads(model, x, labels, torch.bfloat16)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-3, atol=1e-3)
    assert_close(chunked_grads, grads, rtol=2e-2, atol=1e-4)
    with torch.no_grad():   # validation: the loss alone, chunk by chunk
        model.head_chunk_rows = 0
        plain = model(x, labels=labels).loss
        model.head_chunk_rows = 5
        torch.testing.assert_close(model(x, labels=labels).loss, plain, rtol=1e-6, atol=1e-6)


def test_chunked_head_loss_function_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 8, generator=g, requires_grad=True)
    W = torch.randn(30, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 30, (11,), generator=g)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, W), t)
    dh, dW = torch.autograd.grad(ref * 3, (h, W))
    got = chunked_head_loss(h, W, t, rows=4)
    gh, gW = torch.autograd.grad(got * 3, (h, W))   # a loss scale reaches both gradients
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(gh, dh)
    torch.testing.assert_close(gW, dW)


def test_head_chunk_auto_only_for_large_vocabularies():
    assert head_chunk_rows("auto", 6400) == 0          # the demo's tokenizer: the plain line, numbers unchanged
    assert head_chunk_rows("auto", 49152) == 256       # SmolLM2
    assert head_chunk_rows("0", 151936) == 0 and head_chunk_rows("64", 6400) == 64


# ----------------------------------------------------------------------------- gradient checkpointing

@pytest.mark.parametrize("lora", [False, True], ids=["full-ft", "lora"])
def test_checkpointing_gives_the_same_gradients(lora):
    model = (lora_model(dropout=0.1) if lora else build_model(dropout=0.1)).train()
    x = tokens(B=2, T=16)
    labels = labels_with_ignored(x)
    torch.manual_seed(5)
    loss, grads = loss_and_grads(model, x, labels)
    model.model.gradient_checkpointing = True
    torch.manual_seed(5)   # the same dropout masks: checkpoint replays the RNG when it recomputes a block
    ck_loss, ck_grads = loss_and_grads(model, x, labels)
    assert torch.equal(ck_loss, loss)
    assert_close(ck_grads, grads, rtol=1e-6, atol=1e-8)


def saved_activation_numbers(model, x) -> int:
    """Numbers autograd keeps for the backward of one forward, weights left out (they exist anyway)."""
    weights = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in weights:
            saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, labels=x).loss
    return sum(saved)


def test_checkpointing_keeps_fewer_activations_and_only_in_training():
    model = lora_model().train()
    model.head_chunk_rows = 32   # the head keeps only (N, C) gradients: what remains is the blocks'
    x = tokens(B=2, T=64)
    plain = saved_activation_numbers(model, x)
    model.model.gradient_checkpointing = True
    assert saved_activation_numbers(model, x) < 0.5 * plain   # the blocks' inputs (+ the head's) only
    model.eval()   # evaluation and generation never recompute
    with torch.no_grad():
        model(x, labels=x)
    assert model.model.gradient_checkpointing and not model.training


# ----------------------------------------------------------------------------- the bf16 frozen base

def test_bf16_base_adapter_gradients_match_the_fp32_base():
    ref = lora_model().train()
    model = lora_model().train()
    fingerprint = base_fingerprint(model)
    saved = hold_frozen_base(model, torch.bfloat16)
    mats = [p for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2]
    assert mats and all(p.dtype == torch.bfloat16 for p in mats)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad or "norm" in n)
    assert saved == sum(p.numel() * 2 for p in mats)
    assert model.lm_head.weight is model.model.embed_tokens.weight   # still tied
    assert base_fingerprint(model) == fingerprint                    # the file will name the original base
    x = tokens(B=2, T=16)
    labels = labels_with_ignored(x)
    ref_loss, ref_grads = loss_and_grads(ref, x, labels)
    loss, grads = loss_and_grads(model, x, labels)
    assert all(g.dtype == torch.float32 for g in grads.values())
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    # bf16 keeps 8 bits of mantissa: gradients agree to a few percent of their own scale
    for k in ref_grads:
        err = (grads[k] - ref_grads[k]).norm() / ref_grads[k].norm()
        assert err < 0.05, f"{k}: relative error {err:.3f}"
    # and under bf16 autocast (what a CPU with native bf16 or a GPU runs)
    auto_loss, _ = loss_and_grads(model, x, labels, torch.bfloat16)
    torch.testing.assert_close(auto_loss, ref_loss, rtol=2e-2, atol=2e-2)


def test_base_dtype_rule():
    cpu = torch.device("cpu")
    assert base_dtype("auto", torch.bfloat16, 3_600_000, cpu) == torch.float32      # the demo stays fp32
    assert base_dtype("auto", torch.bfloat16, 135_000_000, cpu) == torch.bfloat16   # a released model
    assert base_dtype("auto", torch.float32, 135_000_000, cpu) == torch.float32     # no autocast: fp32
    assert base_dtype("bfloat16", torch.float32, 1, cpu) == torch.bfloat16
    with pytest.raises(Exception, match="GPU"):
        base_dtype("float16", torch.float32, 1, cpu)


@pytest.mark.slow   # trains
def test_train_lora_on_a_bf16_base_with_checkpointing_and_chunked_head(ws, tmp_path):
    out = with_base(ws, tmp_path)
    argv = lora_argv(ws, out, "--max_steps", 3, "--base_dtype", "bfloat16", "--grad_checkpoint", 1,
                     "--head_chunk", 16, "--watch_prompts", "none")
    metrics, log = quiet(train_lora.main, argv)
    assert metrics["steps"] == 3 and metrics["peak_memory_mb"] > 0
    assert "memory: frozen base in bfloat16" in log and "gradient checkpointing on" in log
    assert "LM head loss in chunks of 16 rows" in log and "peak memory: " in log
    # the file belongs to the fp32 base: it loads there (fingerprint check) with fp32 adapters
    model, _ = load_model(out / "full_sft_64.pth")
    load_lora(model, out / "lora_identity_64.pth")
    state = adapter_state(model, "lora_identity")
    assert all(t.dtype == torch.float32 for t in state.values())
    assert any(t.abs().sum() > 0 for k, t in state.items() if k.endswith("lora_B"))


def test_train_lora_refuses_bad_memory_flags(ws, tmp_path, capsys):
    out = with_base(ws, tmp_path)
    expect_user_error(capsys, train_lora.main, lora_argv(ws, out, "--head_chunk", "lots"), "--head_chunk")
    expect_user_error(capsys, train_lora.main, lora_argv(ws, out, "--base_dtype", "float16"), "GPU")
    expect_user_error(capsys, train_lora.main, lora_argv(ws, out, "--base_dtype", "bfloat16",
                                                         "--lora_variant", "dora"), "dora")
