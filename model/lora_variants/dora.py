"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv 2402.09353).

DoRA splits each output row of the adapted weight into a length and a direction and learns them apart:

    W' = m ⊙ (W + s·B A) / n          n = ‖W + s·B A‖ per output row (norm over `in`), shape [out]
    m  = ‖W‖ per row at init           (trains with A and B), so W' = W at init (B = 0)

n is detached (the paper's §4.3: it is treated as a constant in backward, which saves memory and
changes little). The forward never builds W':

    y = W x + (m/n − 1) ⊙ (W h) + (m/n) ⊙ s·B(A h)      h = dropout(x) (= x without LoRA dropout)

Merge: W ← (m/n)(W + s·BA), exact; unmerge subtracts the same delta (kept from the merge).
Trainable: r·(in + out) + out per layer. rsLoRA combines (it only changes s).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.common import TinyMindError
from model.lora_variants.registry import Variant, register


class DoRALayer(nn.Module):
    """DoRA's magnitude vector for one adapter of one ``LoRALinear``; A and B are the layer's own."""
    uses_ab = True   # LoRALinear keeps lora_A / lora_B for this adapter as for plain LoRA

    def __init__(self, layer, cfg):
        super().__init__()
        w = layer.base.weight                                       # [out, in]
        self.magnitude = nn.Parameter(w.detach().float().norm(dim=1).to(w.dtype))   # m: [out]
        self.merged_delta = None   # the fp32 delta merge() added: unmerge needs the n of *that* W

    def weight_norm(self, layer, name: str) -> torch.Tensor:
        """n = ‖W + s·BA‖ per output row, [out], detached (no gradient flows through it)."""
        with torch.no_grad():
            w = layer.base.weight
            ba = layer.lora_B[name] @ layer.lora_A[name]             # [out, in]
            return (w + layer.scaling[name] * ba.to(w.dtype)).norm(dim=1)

    def forward(self, layer, name: str, x: torch.Tensor, base_y: torch.Tensor) -> torch.Tensor:
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        drop = layer.lora_dropout[name]
        h = drop(x)                                                  # (..., in)
        if isinstance(drop, nn.Identity):
            wx = base_y if layer.base.bias is None else base_y - layer.base.bias   # W x, already computed
        else:
            wx = F.linear(h, layer.base.weight.to(h.dtype))          # W h: the base term sees dropout too
        scale = self.magnitude / self.weight_norm(layer, name)       # m / n: [out]
        lora = (F.linear(h.to(A.dtype), A) * s) @ B.t()              # s·B(A h): (..., out)
        return (scale - 1) * wx + scale * lora

    def delta_weight(self, layer, name: str) -> torch.Tensor:
        """(m/n)(W + s·BA) − W in fp32, [out, in]; while merged, the delta the merge added."""
        if layer.merged and self.merged_delta is not None:
            return self.merged_delta
        w = layer.base.weight.float()
        adapted = w + layer.scaling[name] * (layer.lora_B[name].float() @ layer.lora_A[name].float())
        n = adapted.norm(dim=1, keepdim=True)                        # [out, 1]
        self.merged_delta = (self.magnitude.detach().float()[:, None] / n) * adapted - w
        return self.merged_delta

    def lora_pair(self, layer, name: str):
        raise TinyMindError("a DoRA adapter's update (m/n − 1)·W + ... is not low-rank, so it cannot be combined "
                            "with others by concatenating ranks; merge it into the weights instead")


register(Variant("dora", paper="2402.09353", layer=DoRALayer,
                 summary="W' = m ⊙ (W + s·BA) / ‖W + s·BA‖: A, B and a magnitude per output row train"))
