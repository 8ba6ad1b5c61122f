"""QLoRA: LoRA on a 4-bit NF4 base (Dettmers et al., 2023, arXiv 2305.14314), on a CPU.

The frozen base is stored in 4-bit NormalFloat and dequantised for each matmul; only A and B (full
precision) train:  y = dequant(W_nf4) x + s·B(A x).

NF4, as bitsandbytes stores it: W (row-major) is cut into blocks of 64 values; each block keeps its absmax
(one float) and each value the index of the nearest of 16 codes (``NF4_CODE``, quantiles of N(0, 1) scaled
to [−1, 1], exact 0 and ±1), two indices per byte, the first in the high nibble:

    q = argmin_k |w / absmax − code_k|        dequant(q) = code_q · absmax      (≈ 4.5 bits per weight)

Double quantisation also compresses the absmaxes: minus their mean, 8 bits each in blocks of 256 with one
fp32 scale per block (≈ 4.127 bits per weight). We use a symmetric linear 8-bit code there; bitsandbytes
uses its dynamic 8-bit map (same storage, slightly different values). Paged optimizers are CUDA-only.
The tied embedding / lm_head matrix is not quantised but stored in bf16 (as transformers + bitsandbytes
load a model for QLoRA: 4-bit linear layers, 16-bit embedding and lm_head).

The adapter file is a plain LoRA file (variant "qlora"): it loads on the full-precision base too, where it
merges exactly; merging into the NF4 base itself is refused (it could only be dequantise-add-requantise).
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.common import TinyMindError
from model.lora_variants.registry import Variant, adapter_layers, register
from model.model_lora import LoRALinear, base_fingerprint

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
DQ_BLOCK = 256   # absmaxes per block of the second quantisation


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> dict[str, torch.Tensor]:
    """w (any shape; the flat values are padded with zeros to whole blocks) -> {"packed": uint8 [numel/2],
    "absmax": fp32 [blocks]} or, with double quantisation, {"packed", "absmax_q": int8 [blocks],
    "absmax_scale": fp32 [blocks/256], "absmax_mean": fp32 []}."""
    flat = w.detach().float().reshape(-1)
    pad = (-flat.numel()) % block_size
    blocks = F.pad(flat, (0, pad)).view(-1, block_size)               # [n_blocks, block]
    absmax = blocks.abs().amax(dim=1)                                  # [n_blocks]
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]   # in [-1, 1]
    mids = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2                           # 15 decision boundaries
    idx = torch.bucketize(normed, mids).to(torch.uint8).reshape(-1)    # code index per value
    idx = F.pad(idx, (0, idx.numel() % 2))
    out = {"packed": (idx[0::2] << 4) | idx[1::2]}                     # two codes per byte, first high
    if not double_quant:
        out["absmax"] = absmax
        return out
    mean = absmax.mean()
    centred = F.pad(absmax - mean, (0, (-absmax.numel()) % DQ_BLOCK)).view(-1, DQ_BLOCK)
    scale = centred.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127   # [n_blocks / 256]
    out["absmax_q"] = torch.round(centred / scale[:, None]).to(torch.int8).reshape(-1)[:absmax.numel()]
    out["absmax_scale"] = scale
    out["absmax_mean"] = mean
    return out


def dequantize_nf4(q: dict[str, torch.Tensor], shape, block_size: int = 64) -> torch.Tensor:
    """The fp32 tensor of ``shape`` that ``quantize_nf4`` stored."""
    packed = q["packed"]
    idx = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).long()   # [numel (+ padding)]
    if "absmax" in q:
        absmax = q["absmax"]
    else:
        n = q["absmax_q"].numel()
        scale = q["absmax_scale"].repeat_interleave(DQ_BLOCK)[:n]
        absmax = q["absmax_q"].float() * scale + q["absmax_mean"]
    numel = torch.Size(shape).numel()
    values = NF4_CODE.to(packed.device)[idx][:absmax.numel() * block_size].view(-1, block_size)
    return (values * absmax[:, None]).reshape(-1)[:numel].view(shape)


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4; ``weight`` is dequantised on every use (fp32)."""
    quantized = True   # LoRALinear.merge refuses to merge into it

    def __init__(self, linear: nn.Linear, block_size: int = 64, double_quant: bool = False):
        super().__init__()
        if linear.bias is not None:
            raise TinyMindError("QLoRA here quantises bias-free linear layers only")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size = block_size
        self.bias = None
        for k, t in quantize_nf4(linear.weight, block_size, double_quant).items():
            self.register_buffer(k, t)

    @property
    def weight(self) -> torch.Tensor:   # [out, in]
        q = {k: t for k, t in self.named_buffers()}
        return dequantize_nf4(q, (self.out_features, self.in_features), self.block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4 blocks of {self.block_size}"


class Bf16Embedding(nn.Module):
    """The tied embedding / lm_head matrix kept in bf16 (half the memory, computed in fp32)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)   # [V, C]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


class Bf16Head(nn.Module):
    def __init__(self, emb: Bf16Embedding):
        super().__init__()
        self.emb = [emb]   # a list: not a submodule, so the shared matrix is counted once

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.emb[0].weight.to(h.dtype))


def quantize_base(model: nn.Module, block_size: int = 64, double_quant: bool = True) -> None:
    """Every frozen linear layer of the blocks -> NF4Linear (also the ones inside LoRALinear); the tied
    embedding -> bf16. Records the full-precision base's fingerprint first, for the adapter file."""
    if getattr(model, "lora_base_fingerprint", None) is None:
        model.lora_base_fingerprint = base_fingerprint(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear) and isinstance(mod.base, nn.Linear):
            mod.base = NF4Linear(mod.base, block_size, double_quant)
        elif isinstance(mod, nn.Linear) and name.startswith("model.") and ".base" not in name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NF4Linear(mod, block_size, double_quant))
    core = model.model
    if model.config.tie_word_embeddings:
        core.embed_tokens = Bf16Embedding(core.embed_tokens.weight)
        model.lm_head = Bf16Head(core.embed_tokens)


def prepare(model, name, setup):
    opts = adapter_layers(model, name)[0][1].configs[name].options
    quantize_base(model, opts["block_size"], bool(opts["double_quant"]))


def add_args(g):
    g.add_argument("--qlora_block_size", type=int, default=64, help="NF4 values per absmax block (paper: 64)")
    g.add_argument("--qlora_double_quant", type=int, default=1, choices=[0, 1],
                   help="1: also quantise the block absmaxes to 8 bits (about 0.37 bit per weight saved)")


def configure(args, cfg):
    if args.qlora_block_size < 2 or args.qlora_block_size % 2:
        raise TinyMindError("--qlora_block_size must be an even number >= 2")
    return replace(cfg, options={"block_size": args.qlora_block_size, "double_quant": args.qlora_double_quant})


register(Variant("qlora", paper="2305.14314", add_args=add_args, configure=configure, prepare=prepare,
                 summary="the frozen base stored in 4-bit NF4 (dequantised per matmul), A and B in full precision"))
