"""LoRA-FA (arXiv 2308.03303): A is frozen at its random init, only B trains, with a corrected gradient.

    y = W x + s * B (A x)       (model/model_lora.py; W [out, in], A [r, in] frozen, B [out, r] trains)

Half the trainable numbers, and A's input x need not be kept for backward. Writing G = dL/dW [out, in], B's
gradient is g_B = s G A^T [out, r]; a step along it changes W by s g_B A = s^2 G A^T A, which is not the best
a frozen A allows. PEFT's LoRA-FA optimizer uses instead

    g_B~ = (1 / s^2) g_B (A A^T)^-1          so that  s g_B~ A = G A^T (A A^T)^-1 A = G P_A,

the projection of the full gradient onto A's row space (the closest update W can get with this A). The
correction runs in the loop's ``after_backward`` slot, then AdamW steps as usual. A LoRA-FA file is a plain
LoRA file and merges exactly. What this file implements: ``freeze_lora_A``, ``lora_fa_grad``, ``LoRAFAHook``,
``trained_pairs`` (the adapters being trained, also used by LoRA-Pro) and the registration.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from model.lora_variants.registry import Variant, register
from model.model_lora import LoRALinear, lora_modules
from model.train_hook import TrainHook

EPS = 1e-8   # ridge before each pseudo-inverse (PEFT's delta): B = 0 at the start makes B^T B singular


def trained_pairs(model: nn.Module) -> list[tuple[LoRALinear, str]]:
    """(layer, adapter name) for every adapter whose B trains (A may be frozen, as here)."""
    return [(m, name) for _, m in lora_modules(model) for name in m.lora_B if m.lora_B[name].requires_grad]


def pinv_ridge(M: torch.Tensor) -> torch.Tensor:
    """(M + EPS * I)^+ for a small symmetric [r, r] matrix."""
    return torch.linalg.pinv(M + EPS * torch.eye(M.shape[0], dtype=M.dtype, device=M.device))


def math_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16 gradients (the inverses need it); fp64 stays fp64."""
    return torch.promote_types(t.dtype, torch.float32)


def freeze_lora_A(model: nn.Module, adapter_name: str) -> int:
    """A keeps its random init for good (a fixed projection); returns how many numbers froze."""
    frozen = 0
    for _, m in lora_modules(model):
        if adapter_name in m.lora_A:
            m.lora_A[adapter_name].requires_grad_(False)
            frozen += m.lora_A[adapter_name].numel()
    return frozen


def lora_fa_grad(A: torch.Tensor, g_B: torch.Tensor, s: float) -> torch.Tensor:
    """g_B~ = (1/s^2) g_B (A A^T + EPS I)^+, shape [out, r] (A [r, in], g_B [out, r])."""
    dt = math_dtype(g_B)
    A = A.to(dt)
    return (g_B.to(dt) @ pinv_ridge(A @ A.T)) / s ** 2


class LoRAFAHook(TrainHook):
    """after_backward: each trained B's gradient becomes ``lora_fa_grad`` (grads complete and unscaled)."""

    def after_backward(self, model: nn.Module, step: int):
        for m, name in trained_pairs(model):
            B = m.lora_B[name]
            if B.grad is not None:
                B.grad.copy_(lora_fa_grad(m.lora_A[name].detach(), B.grad, m.scaling[name]).to(B.grad.dtype))


register(Variant("lora_fa", paper="2308.03303",
                 summary="A frozen at its random init; B trains on g_B (A A^T)^-1 / s^2",
                 setup=freeze_lora_A,   # also when a file is loaded: going on training keeps A frozen
                 hooks=lambda model, name, args: [LoRAFAHook()]))
