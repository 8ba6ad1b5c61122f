"""OLoRA: Orthonormal Low-Rank Adaptation (Büyükakyüz, 2024, arXiv 2406.01775).

The adapter starts from W's QR decomposition (in fp32), W = Q R:

    B₀ = Q[:, :r]   [out, r]  (orthonormal columns: B₀ᵀB₀ = I)
    A₀ = R[:r]      [r, in]   (not divided by s)
    W_res = W − s·B₀A₀       (model/lora_variants/residual.py: frozen, and the file is a plain LoRA of rank 2r)

Trainable: r·(in + out) per layer.
"""
from __future__ import annotations

import torch

from model.lora_variants.registry import Variant, adapter_layers, register
from model.lora_variants.residual import export_residual, set_residual


def olora_factors(w: torch.Tensor, r: int):
    """(A₀ [r, in], B₀ [out, r]) from the QR decomposition of w."""
    Q, R = torch.linalg.qr(w.float())   # Q: [out, k], R: [k, in], k = min(out, in)
    return R[:r], Q[:, :r]


def prepare(model, name, setup):
    for n, m in adapter_layers(model, name):
        A0, B0 = olora_factors(m.base.weight, m.configs[name].rank)
        set_residual(model, name, n, m, A0, B0)


register(Variant("olora", paper="2406.01775", prepare=prepare, export=export_residual,
                 summary="A, B start as the first r columns / rows of W = QR, the base keeps W − s·BA"))
