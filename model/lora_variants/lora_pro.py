"""LoRA-Pro (arXiv 2407.18242): adjust both gradients so that LoRA's step is the best rank-r step.

    y = W x + s * B (A x)       (model/model_lora.py; W [out, in], A [r, in], B [out, r])

With G = dL/dW [out, in], LoRA's gradients are g_A = s B^T G [r, in] and g_B = s G A^T [out, r], and a step
along (g_A, g_B) changes W by (to first order) the "equivalent gradient" g~ = s (B g_A + g_B A). LoRA-Pro
replaces them by (the paper's Theorem 2.1, in this notation; P_B = B (B^T B)^-1 B^T, P_A = A^T (A A^T)^-1 A)

    g_A' = (1/s^2) (B^T B)^-1 g_A + X A
    g_B' = (1/s^2) (I - P_B) g_B (A A^T)^-1 - B X
    =>  s (B g_A' + g_B' A) = P_B G + G P_A - P_B G P_A     for any X [r, r],

the orthogonal projection of G onto every update s (B dA + dB A) can make: the closest one to G. X is the
solution of the Sylvester equation (Theorem 2.2) that keeps (g_A', g_B') closest to (g_A, g_B):

    (B^T B) X + X (A A^T) = -(1/s^2) (B^T B)^-1 g_A A^T

Only r x r matrices are inverted (pseudo-inverse with a 1e-8 ridge: B = 0 at the start). TinyMind adjusts the
gradients and lets AdamW run on them unchanged; the paper's own optimizer also carries Adam's moments
over into the full space, which this does not. A LoRA-Pro file is a plain LoRA file and merges exactly.
What this file implements: ``solve_sylvester_sym``, ``lora_pro_grads``, ``LoRAProHook``, the registration.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from model.lora_variants.lora_fa import EPS, math_dtype, pinv_ridge, trained_pairs
from model.lora_variants.registry import Variant, register
from model.train_hook import TrainHook


def solve_sylvester_sym(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with P X + X Q = C for symmetric PSD P [r, r] and Q [r, r] (here B^T B and A A^T).

    With P = U diag(p) U^T and Q = V diag(q) V^T the equation decouples entry by entry in those bases:
    (U^T X V)_ij = (U^T C V)_ij / (p_i + q_j). A zero denominator (B = 0 and A rank-deficient) gives 0.
    """
    p, U = torch.linalg.eigh(P)
    q, V = torch.linalg.eigh(Q)
    denom = p[:, None] + q[None, :]
    ok = denom.abs() > EPS
    Y = (U.T @ C @ V) / torch.where(ok, denom, torch.ones_like(denom))   # [r, r]
    Y = torch.where(ok, Y, torch.zeros_like(Y))
    return U @ Y @ V.T


def lora_pro_grads(A: torch.Tensor, B: torch.Tensor, g_A: torch.Tensor, g_B: torch.Tensor, s: float):
    """LoRA-Pro's (g_A' [r, in], g_B' [out, r]) from the plain gradients; P_B ([out, out]) is never formed."""
    dt = math_dtype(g_A)
    A, B, g_A, g_B = A.to(dt), B.to(dt), g_A.to(dt), g_B.to(dt)
    BtB, AAt = B.T @ B, A @ A.T                       # [r, r] each
    BtB_inv, AAt_inv = pinv_ridge(BtB), pinv_ridge(AAt)
    X = solve_sylvester_sym(BtB, AAt, -(BtB_inv @ g_A @ A.T) / s ** 2)
    new_A = BtB_inv @ g_A / s ** 2 + X @ A
    g_B_perp = g_B - B @ (BtB_inv @ (B.T @ g_B))      # (I - P_B) g_B, [out, r]
    new_B = g_B_perp @ AAt_inv / s ** 2 - B @ X
    return new_A, new_B


class LoRAProHook(TrainHook):
    """after_backward: each trained (g_A, g_B) becomes ``lora_pro_grads`` (before clipping and the step)."""

    def after_backward(self, model: nn.Module, step: int):
        for m, name in trained_pairs(model):
            A, B = m.lora_A[name], m.lora_B[name]
            if A.grad is None or B.grad is None:
                continue
            new_A, new_B = lora_pro_grads(A.detach(), B.detach(), A.grad, B.grad, m.scaling[name])
            A.grad.copy_(new_A.to(A.grad.dtype))
            B.grad.copy_(new_B.to(B.grad.dtype))


register(Variant("lora_pro", paper="2407.18242",
                 summary="A and B's gradients adjusted: the step is the rank-r step closest to full fine-tuning's",
                 hooks=lambda model, name, args: [LoRAProHook()]))
