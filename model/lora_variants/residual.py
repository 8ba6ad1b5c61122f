"""Shared by PiSSA, OLoRA and LoRA-GA: inits that move part of W into the adapter.

Each picks B₀ [out, r] and A₀ [r, in] from W (or from its gradient) and freezes the rest,

    W_res = W − s·B₀A₀          so   W_res + s·B₀A₀ = W   and the output at init is unchanged.

The frozen base is now W_res, so an adapter file saved as is would only work on W_res. ``export_residual``
instead writes it as a plain LoRA on the *original* W (PEFT does the same when converting):

    W_res + s·BA = W + s·(BA − B₀A₀) = W + s·[B | −B₀] [A ; A₀]      (rank 2r)

with alpha doubled (rsLoRA: alpha·√2) so that s stays the same; that file loads, merges and combines
like any LoRA file. B₀, A₀ are kept on each layer in ``residual_init`` (not saved: resuming recomputes them).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from model.lora_variants.registry import adapter_layers
from model.model_lora import adapter_state, base_fingerprint


def set_residual(model, name: str, layer_name: str, layer, A0: torch.Tensor, B0: torch.Tensor) -> None:
    """Install A₀ [r, in], B₀ [out, r] (fp32) as adapter ``name``'s start and W ← W − s·B₀A₀ (in fp32)."""
    core = model
    if getattr(core, "lora_base_fingerprint", None) is None:   # the original base, for the adapter file
        core.lora_base_fingerprint = base_fingerprint(core)
    w = layer.base.weight
    A0 = A0.to(w.dtype)   # the offset uses the rounded values the adapter holds, so W_res + s·B₀A₀ = W
    B0 = B0.to(w.dtype)
    with torch.no_grad():
        layer.lora_A[name].copy_(A0)
        layer.lora_B[name].copy_(B0)
        w.copy_((w.float() - layer.scaling[name] * (B0.float() @ A0.float())).to(w.dtype))
    if not hasattr(layer, "residual_init"):
        layer.residual_init = {}
    layer.residual_init[name] = (A0.detach().clone(), B0.detach().clone())


def export_residual(model, name: str):
    """(plain LoRAConfig of rank 2r, tensors) equal to the trained adapter on the original base."""
    layers = adapter_layers(model, name)
    cfg = layers[0][1].configs[name]
    if not all(name in getattr(m, "residual_init", {}) for _, m in layers):   # loaded, never initialised here
        return cfg, adapter_state(model, name)
    alpha = cfg.alpha * (math.sqrt(2.0) if cfg.use_rslora else 2.0)     # s = alpha/r = (2 alpha)/(2r)
    plain = replace(cfg, rank=2 * cfg.rank, alpha=alpha, variant="lora",
                    options={"trained_as": cfg.variant, "trained_rank": cfg.rank, **cfg.options})
    out = {}
    for n, m in layers:
        A0, B0 = m.residual_init[name]
        out[f"{n}.lora_A"] = torch.cat([m.lora_A[name].detach(), A0], dim=0)    # [2r, in]
        out[f"{n}.lora_B"] = torch.cat([m.lora_B[name].detach(), -B0], dim=1)   # [out, 2r]
    return plain, out
