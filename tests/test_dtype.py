"""The training dtype on a CPU and the bf16 step: ``--dtype auto`` picks bf16 only where the CPU has native
bf16 (flags patched here both ways), and the step's fast paths compute what the plain code computes."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import model.common as common
import model.model as model_module
from conftest import build_model, quiet, tokens
from model.common import cpu_bf16_path, native_bf16, setup_device
from model.loss_fused import fused_ce_applies, fused_cross_entropy

REAL_CPU_NATIVE_BF16 = common.cpu_native_bf16   # conftest patches it to "no native bf16" for every test


def cpu_with_flags(monkeypatch, *flags):
    """The real detection, reading ``flags`` as this CPU's feature flags."""
    monkeypatch.setattr(common, "cpu_native_bf16", REAL_CPU_NATIVE_BF16)
    monkeypatch.setattr(common, "cpu_flags", lambda: {"fpu", "sse2", "avx2", *flags})


# ------------------------------------------------------------------------------------------ detection

def test_native_bf16_reads_the_flags():
    assert native_bf16(["fpu", "avx2", "avx512f", "avx512bw"]) == []   # AVX-512 alone converts bf16 too
    assert native_bf16(["avx2", "AVX512_BF16"]) == ["avx512_bf16"]
    assert native_bf16(["avx512_bf16", "amx_tile", "amx_bf16"]) == ["amx_bf16", "avx512_bf16"]
    assert cpu_bf16_path(["avx512_bf16"]) == "native bf16 (avx512_bf16)"
    capability = torch.backends.cpu.get_cpu_capability()
    assert cpu_bf16_path([]) == f"no native bf16 ({capability}): bf16 is emulated"


def test_cpu_flags_agree_with_torch():
    flags = common.cpu_flags()
    assert isinstance(flags, set)
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        assert "avx512_bf16" in flags   # torch's probe counts even where /proc/cpuinfo is missing
    assert REAL_CPU_NATIVE_BF16() == native_bf16(flags)


# ------------------------------------------------------------------------------------------ --dtype auto

def test_auto_trains_in_fp32_on_a_cpu_without_native_bf16(monkeypatch, capsys):
    cpu_with_flags(monkeypatch)
    ctx = setup_device("cpu", "auto")
    assert ctx.dtype == torch.float32 and ctx.scaler is None
    out = capsys.readouterr().out
    assert "dtype float32 [auto: this CPU has no native bf16 (" in out and "bf16 is emulated" in out
    # an explicit choice is kept either way
    assert setup_device("cpu", "bfloat16", log=False).dtype == torch.bfloat16


def test_auto_trains_in_bf16_on_a_cpu_with_native_bf16(monkeypatch, capsys):
    cpu_with_flags(monkeypatch, "avx512_bf16")
    ctx = setup_device("cpu", "auto")
    assert ctx.dtype == torch.bfloat16 and ctx.scaler is None   # bf16 has fp32's range: no loss scaling
    assert "dtype bfloat16 [auto: this CPU has native bf16 (avx512_bf16)]" in capsys.readouterr().out
    assert setup_device("cpu", "float32", log=False).dtype == torch.float32
    # inference on a CPU stays fp32 (the weights' dtype there is --dtype's business, not autocast's)
    assert setup_device("cpu", "auto", log=False, inference=True).dtype == torch.float32


def test_trainer_default_follows_the_cpu(ws, tmp_path, monkeypatch):
    from trainer import train_pretrain

    argv = ["--preset", "smoke", "--data_path", ws["pre"], "--tokenizer_path", ws["tok"], "--cache_dir", ws["cache"],
            "--device", "cpu", "--max_seq_len", "16", "--batch_size", "2", "--max_steps", "1",
            "--eval_interval", "0", "--val_ratio", "0"]
    cpu_with_flags(monkeypatch, "amx_bf16")
    metrics, log = quiet(train_pretrain.main, argv + ["--save_dir", str(tmp_path / "a")])
    assert "dtype bfloat16 [auto: this CPU has native bf16 (amx_bf16)]" in log and metrics["steps"] == 1
    cpu_with_flags(monkeypatch)
    _, log = quiet(train_pretrain.main, argv + ["--save_dir", str(tmp_path / "b")])
    assert "dtype float32 [auto: this CPU has no native bf16" in log


# ------------------------------------------------------------------------------------------ the fused loss

def reference_ce(logits, targets, grad_scale):
    """The plain line of model.py, its loss and the gradient w.r.t. the logits (times ``grad_scale``)."""
    x = logits.detach().requires_grad_()
    loss = F.cross_entropy(x.float(), targets)
    (loss * grad_scale).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_equals_the_plain_line(dtype, monkeypatch):
    import model.loss_fused

    monkeypatch.setattr(model.loss_fused, "CHUNK_ELEMENTS", 7 * 300)   # 7 rows a chunk: the last one is short
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(45, 300, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 300, (45,), generator=g)
    grad_scale = 1 / 3   # accumulation over three micro-batches: not a power of two
    want_loss, want_grad = reference_ce(logits, targets, grad_scale)

    x = logits.clone().requires_grad_()
    assert fused_ce_applies(x) == (dtype == torch.bfloat16)   # the function itself is right for both dtypes
    loss = fused_cross_entropy(x, targets)
    (loss * grad_scale).backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(x.grad, want_grad, rtol=1e-5, atol=1e-8)
    else:   # both round to bf16 (the fused one before the 1/3, the plain one after): at most an ulp or two
        torch.testing.assert_close(x.grad.float(), want_grad.float(), rtol=2 ** -7, atol=1e-7)


def test_fused_cross_entropy_applies_only_to_cpu_training_steps():
    x = torch.randn(4, 10, requires_grad=True)
    assert fused_ce_applies(x.bfloat16())
    assert not fused_ce_applies(x)                        # fp32: the plain line, so fp32 results do not move
    with torch.no_grad():
        assert not fused_ce_applies(x)                    # validation: the plain line
    assert not fused_ce_applies(x.detach())
    assert not fused_ce_applies(x.half())                 # an fp16 gradient written before the loss scale
    assert not fused_ce_applies(x[:0])
    assert not fused_ce_applies(torch.randn(4, 10, device="meta", requires_grad=True))


def step_grads(model, ids, dtype):
    """Loss and every parameter's gradient of one training forward/backward (bf16: autocast, as trainers)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.bfloat16])   # fp32 takes the plain line itself
def test_training_step_with_the_fused_loss_equals_the_plain_one(dtype, monkeypatch):
    model = build_model(seed=0).train()
    ids = tokens(seed=1, B=2, T=24)
    ids[1, 15:] = 0
    loss, grads = step_grads(model, ids, dtype)
    monkeypatch.setattr(model_module, "fused_ce_applies", lambda logits: False)
    want_loss, want_grads = step_grads(model, ids, dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss, want_loss, **tol)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, **tol, msg=name)


class MixedProducts(TorchDispatchMode):
    """Counts the elementwise products that mix a bf16 and an fp32 tensor (each makes an fp32 copy)."""

    def __init__(self):
        super().__init__()
        self.mixed = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = {a.dtype for a in args if torch.is_tensor(a)}
        if func is torch.ops.aten.mul.Tensor and dtypes == {torch.bfloat16, torch.float32}:
            self.mixed += 1
        return func(*args, **(kwargs or {}))


def test_bf16_step_rotates_in_bf16_and_stays_close_to_fp32():
    """Under bf16 autocast RoPE runs on bf16 q/k (no fp32 copies for attention to cast back), and the
    step's loss and gradients stay within bf16's precision of the fp32 step."""
    model = build_model(seed=0).train()
    ids = tokens(seed=2, B=2, T=24)
    with MixedProducts() as mode, torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=ids)
    assert mode.mixed == 0
    loss16, grads16 = step_grads(model, ids, torch.bfloat16)
    loss32, grads32 = step_grads(model, ids, torch.float32)
    assert abs(loss16.item() - loss32.item()) < 1e-2 * loss32.item()
    for name, want in grads32.items():
        cos = F.cosine_similarity(grads16[name].flatten(), want.flatten(), dim=0)
        assert cos > 0.99, (name, cos.item())
