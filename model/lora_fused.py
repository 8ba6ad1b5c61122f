"""The fused fast path of ``LoRALinear``: the same function as its readable loop, with cheaper products.

``model/model_lora.py::LoRALinear.forward`` defines a LoRA layer as a plain loop:

    y = x W^T + s (x A^T) B^T          x: (rows, in), W: [out, in], A: [r, in], B: [out, r]

That loop is what a learner reads. On a CPU its thin products (x A^T, z B^T, the add, and four more in
the backward) each stream a whole (rows, in) or (rows, out) activation through memory for very little
arithmetic, and autograd lays two of them out in the form a CPU's BLAS runs slowest. This file computes
the same function (to float rounding) as y = x (W + s B A)^T with the backward written out.

What this file implements:
- ``FusedLoRA``: the autograd Function (forward and hand-written backward).
- ``fused_lora``: ``FusedLoRA`` where a gradient is wanted, one product with W + s B A where not.
- ``fused_applies``: where the fused path computes exactly what the loop computes, and is cheaper.
- ``use_plain_loop``: the switch that sends chosen layers through the loop instead (the tests compare
  the two paths; dev/bench.py times both).

It takes the layer it serves as an argument and imports nothing of model_lora: the kernel sits below the layer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FusedLoRA(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T for a frozen W, computed as y = x (W + s B A)^T, with the backward written out.

        forward   W' = W + s B A          (out, in): one small product, cheaper than z B^T plus the add
                  y  = x W'^T             the base's product, with the update inside
                  z  = x A^T              (rows, r), kept (as z^T) for dB
        backward  dz = s dy B             (rows, r)
                  dB = s dy^T z           (out, r)
                  dA = dz^T x             (r, in)
                  dx = dy W + dz A        no dW: W is frozen (LoRA's saving)

    These are the chain rule for y = x W^T + s z B^T, z = x A^T: what autograd derives from the loop.
    tests/test_lora.py checks outputs and every gradient against the loop, and gradcheck in fp64.
    """

    @staticmethod
    def forward(ctx, x, W, A, B, s: float):
        y = F.linear(x, torch.addmm(W, B, A, alpha=s))                    # (..., out)
        zt = A @ x.reshape(-1, W.shape[1]).t()                             # z^T = A x^T: (r, rows), for dB
        ctx.save_for_backward(x, W, A, B, zt)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, dy):
        x, W, A, B, zt = ctx.saved_tensors
        s, (need_x, _, need_A, need_B, _) = ctx.s, ctx.needs_input_grad
        dy2 = dy.reshape(-1, W.shape[0])                                   # (rows, out)
        # Each product is written so that BLAS streams the long (rows) side contiguously:
        # (B^T dy^T)^T rather than dy B, (z^T dy)^T rather than dy^T z (the faster layout on a CPU).
        dz = (B.t() @ dy2.t()).t() * s                                     # (rows, r)
        dA = dz.t() @ x.reshape(-1, W.shape[1]) if need_A else None        # (r, in)
        dB = (zt @ dy2).t() * s if need_B else None                        # (out, r)
        dx = None
        if need_x:
            dx = (dy2 @ W).addmm_(dz, A).view(*dy.shape[:-1], W.shape[1])  # dy W + dz A: (..., in)
        return dx, None, dA, dB, None


def fused_lora(x, W, A, B, s: float) -> torch.Tensor:
    """``FusedLoRA`` where a gradient is wanted; without one (evaluation), just x (W + s B A)^T."""
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return FusedLoRA.apply(x, W, A, B, s)
    return F.linear(x, torch.addmm(W, B, A, alpha=s))


def use_plain_loop(layers, plain: bool = True) -> None:
    """Send ``layers`` (LoRALinear modules) through ``LoRALinear.forward``'s loop (``plain=False``: back to
    the fused path where it applies). A flag on each layer, so one process can time a fused model beside
    a plain copy of it."""
    for layer in layers:
        layer.plain_loop = plain


def fused_applies(layer: nn.Module, x: torch.Tensor) -> bool:
    """Where ``FusedLoRA`` computes exactly what the loop in ``layer.forward`` computes, and is cheaper.

    One plain adapter (no variant module, no dropout at work) on an unmerged, frozen nn.Linear, all in
    fp32 or fp64 without autocast (in bf16, W + s B A would round small updates away), and enough rows
    that forming W + s B A (reads and writes in * out numbers) costs less than the branch's thin
    products on x and y (about rows * (in + out)): a training batch or a prompt, not one decoded token.
    """
    if getattr(layer, "plain_loop", False):   # use_plain_loop
        return False
    if layer.merged or len(layer.active) != 1 or layer.variants or type(layer.base) is not nn.Linear:
        return False
    name, w = layer.active[0], layer.base.weight
    A = layer.lora_A[name]
    rows = x.numel() // layer.in_features
    return (layer.base.bias is None and not w.requires_grad and w.dtype in (torch.float32, torch.float64)
            and x.dtype == w.dtype == A.dtype and not torch.is_autocast_enabled(x.device.type)
            and not (layer.training and isinstance(layer.lora_dropout[name], nn.Dropout))
            and rows * (layer.in_features + layer.out_features) >= layer.in_features * layer.out_features)
