"""PiSSA: Principal Singular values and Singular vectors Adaptation (Meng et al., 2024, arXiv 2404.02948).

The adapter starts as the top-r singular part of W; the frozen base keeps the rest (model/lora_variants/
residual.py). With W = U S Vᵀ (SVD in fp32):

    B₀ = U[:, :r] · diag(√(S[:r]/s))     [out, r]
    A₀ = diag(√(S[:r]/s)) · Vᵀ[:r]       [r, in]        so s·B₀A₀ = U_r S_r V_rᵀ
    W_res = W − s·B₀A₀,   ‖W_res‖²_F = Σ_{i>r} σᵢ²

``--pissa_niter K`` > 0 uses the fast randomised SVD (``torch.svd_lowrank``, K power iterations) instead.
The file is saved as a plain LoRA of rank 2r on the original W. Trainable: r·(in + out) per layer.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from model.common import TinyMindError
from model.lora_variants.registry import Variant, adapter_layers, register
from model.lora_variants.residual import export_residual, set_residual


def pissa_factors(w: torch.Tensor, r: int, s: float, niter: int = 0):
    """(A₀ [r, in], B₀ [out, r]) with s·B₀A₀ = the best rank-r approximation of w (fp32)."""
    w = w.float()
    if niter > 0:
        U, S, V = torch.svd_lowrank(w, q=r, niter=niter)   # w ≈ U diag(S) Vᵀ
        Vh = V.t()
    else:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = (S[:r] / s).sqrt()                               # [r]
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


def prepare(model, name, setup):
    for n, m in adapter_layers(model, name):
        niter = m.configs[name].options.get("niter", 0)
        A0, B0 = pissa_factors(m.base.weight, m.configs[name].rank, m.scaling[name], niter)
        set_residual(model, name, n, m, A0, B0)


def add_args(g):
    g.add_argument("--pissa_niter", type=int, default=0,
                   help="0: exact SVD of W; K > 0: randomised SVD with K power iterations (PEFT's pissa_niter_K)")


def configure(args, cfg):
    if args.pissa_niter < 0:
        raise TinyMindError("--pissa_niter must be >= 0")
    return replace(cfg, options={"niter": args.pissa_niter})


register(Variant("pissa", paper="2404.02948", add_args=add_args, configure=configure, prepare=prepare,
                 export=export_residual,
                 summary="A, B start as W's top-r singular part, the base keeps the rest (W_res = W − s·BA)"))
