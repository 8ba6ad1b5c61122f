"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2023, arXiv 2310.11454).

One pair of random matrices is shared by every adapted layer and never trains; each layer only learns two
vectors that scale it:

    ΔW = diag(b) · B_sh[:out] · diag(d) · A_sh[:, :in]        (no alpha/r scaling)
    A_sh: [r, in_max], B_sh: [out_max, r]  frozen, Kaiming-uniform from a seeded CPU generator (A first),
          sized to the largest in / out among the adapted layers (each layer slices its part)
    b: [out] init 0 (so ΔW = 0 at init),  d: [r] init d_initial (0.1)

Trainable: out + r per layer (r is large: 256 by default, as in PEFT). The file holds b and d and the
seed; the shared matrices are regenerated from the seed when it is loaded. Merges exactly.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.common import TinyMindError
from model.lora_variants.registry import Variant, adapter_layers, register


def kaiming_uniform(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """U(−b, b) with b = √3 · √2 / √fan_in, fan_in = shape[1] (as PEFT's VeRA init)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def shared_matrices(r: int, in_max: int, out_max: int, seed: int):
    """(A_sh [r, in_max], B_sh [out_max, r]), the same for the same seed on every machine."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    A = kaiming_uniform((r, in_max), gen)      # generated first, as in PEFT
    B = kaiming_uniform((out_max, r), gen)
    return A, B


class VeRALayer(nn.Module):
    uses_ab = False   # no per-layer A and B: the shared ones are buffers set by ``setup``

    def __init__(self, layer, cfg):
        super().__init__()
        w = layer.base.weight
        self.vera_b = nn.Parameter(torch.zeros(layer.out_features, device=w.device, dtype=w.dtype))   # [out]
        d0 = cfg.options.get("d_initial", 0.1)
        self.vera_d = nn.Parameter(torch.full((cfg.rank,), d0, device=w.device, dtype=w.dtype))       # [r]
        self.register_buffer("vera_A", None, persistent=False)   # [r, in]   slice of A_sh
        self.register_buffer("vera_B", None, persistent=False)   # [out, r]  slice of B_sh

    def forward(self, layer, name: str, x: torch.Tensor, base_y: torch.Tensor) -> torch.Tensor:
        h = layer.lora_dropout[name](x).to(self.vera_d.dtype)                  # (..., in)
        z = F.linear(h, self.vera_A.to(h.dtype)) * self.vera_d                  # (..., r)
        return F.linear(z, self.vera_B.to(h.dtype)) * self.vera_b               # (..., out)

    def lora_pair(self, layer, name: str):
        """B' = diag(b) B_sh diag(d) [out, r], A' = A_sh [r, in]: ΔW = B'A' exactly."""
        b, d = self.vera_b.detach().float(), self.vera_d.detach().float()
        return b[:, None] * self.vera_B.float() * d[None, :], self.vera_A.float()

    def delta_weight(self, layer, name: str) -> torch.Tensor:
        B, A = self.lora_pair(layer, name)
        return B @ A


def setup(model, name):
    """Give every layer its slice of the shared matrices (sized to the largest layer)."""
    layers = adapter_layers(model, name)
    cfg = layers[0][1].configs[name]
    in_max = max(m.in_features for _, m in layers)
    out_max = max(m.out_features for _, m in layers)
    A, B = shared_matrices(cfg.rank, in_max, out_max, cfg.options.get("seed", 0))
    for _, m in layers:
        dev = m.variants[name].vera_b.device
        m.variants[name].vera_A = A[:, :m.in_features].to(dev)   # views of one tensor on the CPU
        m.variants[name].vera_B = B[:m.out_features, :].to(dev)


def add_args(g):
    g.add_argument("--vera_rank", type=int, default=256, help="r of the shared random matrices (PEFT: 256)")
    g.add_argument("--vera_d_initial", type=float, default=0.1, help="initial value of every d (PEFT: 0.1)")
    g.add_argument("--vera_seed", type=int, default=0, help="seed of the shared matrices (PEFT's projection_prng_key)")


def configure(args, cfg):
    if args.use_rslora:
        raise TinyMindError("--use_rslora 1 does not apply to VeRA: it has no alpha / r scaling")
    if args.vera_rank < 1:
        raise TinyMindError("--vera_rank must be >= 1")
    return replace(cfg, rank=args.vera_rank,
                   options={"d_initial": args.vera_d_initial, "seed": args.vera_seed})


register(Variant("vera", paper="2310.11454", layer=VeRALayer, add_args=add_args, configure=configure, setup=setup,
                 summary="ΔW = diag(b)·B_sh·diag(d)·A_sh: shared frozen random A_sh, B_sh; only b, d train"))
