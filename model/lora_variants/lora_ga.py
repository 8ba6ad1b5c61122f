"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang et al., 2024, arXiv 2407.05000).

The adapter starts so that its first step moves W like full fine-tuning's first step would. With G the
gradient of the loss w.r.t. W, averaged over a few batches, and its SVD G = U S Vᵀ (fp32):

    A₀ = ζ · Vᵀ[:r]            [r, in]
    B₀ = ζ · U[:, r:2r]        [out, r]          ζ = d_out^(1/4) / √γ   ("stable" scale, γ = 16)
    W_res = W − s·B₀A₀         frozen (model/lora_variants/residual.py: the file is a plain LoRA of rank 2r)

We follow the paper's code: both A and B are scaled by ζ and S is not used. PEFT's init_lora_weights=
"lora_ga" comes from the same reference code; TinyMind's tests check the formula above, not PEFT's
numbers. Trainable: r·(in + out) per layer.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from model.common import TinyMindError
from model.lora_variants.registry import Variant, adapter_layers, register
from model.lora_variants.residual import export_residual, set_residual


def loraga_factors(grad: torch.Tensor, r: int, gamma: float):
    """(A₀ [r, in], B₀ [out, r]) from the averaged weight gradient [out, in]."""
    U, S, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    if U.shape[1] < 2 * r:
        raise TinyMindError(f"LoRA-GA needs 2r <= min(in, out); r = {r}, layer {tuple(grad.shape)}")
    zeta = grad.shape[0] ** 0.25 / gamma ** 0.5
    return zeta * Vh[:r], zeta * U[:, r:2 * r]


def average_gradients(model, layers, setup, n_batches: int) -> dict[str, torch.Tensor]:
    """Mean gradient of the loss w.r.t. each layer's W over the first n_batches training batches."""
    ctx, bs = setup.ctx, setup.args.batch_size
    model.to(ctx.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    for _, m in layers:
        m.base.weight.requires_grad_(True)
    n = min(n_batches, max(1, len(setup.train_set) // bs))
    for i in range(n):
        input_ids, labels, _ = setup.collate_fn([setup.train_set[j] for j in range(i * bs, (i + 1) * bs)])
        with ctx.autocast():
            loss = model(input_ids.to(ctx.device), labels=labels.to(ctx.device)).loss
        (loss / n).backward()
    grads = {}
    for name, m in layers:
        grads[name] = m.base.weight.grad.detach().float()
        m.base.weight.grad = None
        m.base.weight.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    return grads


def prepare(model, name, setup):
    layers = adapter_layers(model, name)
    opts = layers[0][1].configs[name].options
    grads = average_gradients(model, layers, setup, opts["batches"])
    for n, m in layers:
        A0, B0 = loraga_factors(grads[n], m.configs[name].rank, opts["stable_gamma"])
        set_residual(model, name, n, m, A0, B0)
    setup.ctx.log(f"LoRA-GA: initialised {len(layers)} layers from the gradient of "
                  f"{opts['batches']} batch(es)")


def add_args(g):
    g.add_argument("--loraga_batches", type=int, default=8,
                   help="batches whose mean gradient sets the init (the paper uses 64 samples)")
    g.add_argument("--loraga_stable_gamma", type=float, default=16.0, help="γ of the stable scale (paper: 16)")


def configure(args, cfg):
    if args.loraga_batches < 1 or args.loraga_stable_gamma <= 0:
        raise TinyMindError("--loraga_batches must be >= 1 and --loraga_stable_gamma > 0")
    return replace(cfg, options={"batches": args.loraga_batches, "stable_gamma": args.loraga_stable_gamma})


register(Variant("lora_ga", paper="2407.05000", add_args=add_args, configure=configure, prepare=prepare,
                 export=export_residual,
                 summary="A, B start from the SVD of the full fine-tuning gradient, the base keeps W − s·BA"))
