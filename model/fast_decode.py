"""Decoding one token at a time, fast: what ``TinyMindForCausalLM.generate`` runs after the prompt.

Read ``model/model.py`` first: this file computes exactly the same function (same RMSNorm, RoPE,
attention and SwiGLU, reusing the model's own modules where it can) for the one case that decoding
repeats hundreds of times: one new token per row (T == 1), plain causal attention, eval mode.

Why a separate path: at batch 1 every weight is read once per token for a matrix-vector product, so a
token costs (bytes of weights) / (memory bandwidth), plus the fixed cost of ~30 small operations per layer.
On a 2-core CPU (1 thread, `small`, batch 1, the two paths timed interleaved) a token takes 17.3 ms instead
of 25.8 ms in fp32 and 16.3 ms instead of 19.3 ms in bf16. What it changes:

- ``DecodeWeights``: inference copies of the matrices, built once from the parameters and rebuilt
  whenever one of them changes (new values, dtype or device): q/k/v fused into one (C, (nh + 2 nkv) hd)
  matrix and gate/up into one (C, 2 I) matrix (one product instead of three / two), and in fp32 every
  matrix, the LM head included, stored transposed as a contiguous (in, out) tensor: CPU BLAS streams
  ``x @ W`` from that layout faster than ``x @ W^T`` from nn.Linear's (out, in) one (4.5x for the LM head
  while it sits in cache). bf16/fp16 keep the (out, in) layout: their transposed product takes a slow path.
  Parameter names, shapes and the checkpoint format are untouched; the copies are not in the state dict.
- ``decode_step``: the model's forward for one token with those matrices and fewer small operations
  (RoPE once over the q and k heads together, the position's cos/sin picked directly, no masks, the
  residual stream as (B, C) rows, RMSNorm of one row through ``rms_norm_one`` with fp32 norm weights kept
  beside the matrices). The 17.3 / 16.3 ms above were measured before ``rms_norm_one``;
  ``scripts/bench.py --only decode`` prints today's rate and what the matrix products alone reach.

``generate`` falls back to the plain forward where this path does not apply (``fast_decode_supported``):
left-padded batches (attention_mask), a live LoRA branch (a merged one is fine), ``flash_attn=False``,
training mode. tests/test_model.py checks that both paths give the same logits and tokens.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.model import apply_rope


def plain_weight(layer: nn.Module) -> torch.Tensor | None:
    """The (out, in) matrix W of a layer that computes exactly x W^T, else None.

    A LoRA wrapper (model/model_lora.py) qualifies once merged or with no adapter active: it then
    computes base(x) alone. A live adapter, a 4-bit base or any other module does not.
    """
    if type(layer) is nn.Linear and layer.bias is None:
        return layer.weight
    base = getattr(layer, "base", None)
    if type(base) is nn.Linear and base.bias is None and (getattr(layer, "merged", False)
                                                          or not getattr(layer, "active", True)):
        return base.weight
    return None


def inference_layout(w: torch.Tensor) -> torch.Tensor:
    """W (out, in) as an (in, out) matrix for ``x @ result``. fp32: a contiguous transposed copy (the
    layout CPU BLAS reads fastest for one row of x); other dtypes: the transposed view, no copy."""
    return w.t().contiguous() if w.dtype == torch.float32 else w.t()


@dataclass
class LayerWeights:
    qkv: torch.Tensor       # (C, (nh + 2 nkv) hd): q, k and v projections side by side
    o: torch.Tensor         # (C, C)
    gate_up: torch.Tensor   # (C, 2 I): gate and up side by side
    down: torch.Tensor      # (I, C)
    norm_in: torch.Tensor   # (C,) input_layernorm's weight in fp32 (the parameter itself when it is fp32)
    norm_post: torch.Tensor  # (C,) post_attention_layernorm's weight in fp32


class DecodeWeights:
    """The matrices of every layer and the LM head in their inference layout (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.layers = []
        for block in model.model.layers:
            a, m = block.self_attn, block.mlp
            qkv = torch.cat([plain_weight(a.q_proj), plain_weight(a.k_proj), plain_weight(a.v_proj)])
            gate_up = torch.cat([plain_weight(m.gate_proj), plain_weight(m.up_proj)])
            self.layers.append(LayerWeights(qkv=inference_layout(qkv), o=inference_layout(plain_weight(a.o_proj)),
                                            gate_up=inference_layout(gate_up),
                                            down=inference_layout(plain_weight(m.down_proj)),
                                            norm_in=block.input_layernorm.weight.float(),
                                            norm_post=block.post_attention_layernorm.weight.float()))
        self.head = inference_layout(plain_weight(model.lm_head))   # (C, V)
        self.norm = model.model.norm.weight.float()                 # (C,) the final norm's weight in fp32
        self.key = weights_key(model)


def source_weights(model: nn.Module) -> list[torch.Tensor | None]:
    """Every matrix ``DecodeWeights`` copies (None where a layer is not a plain x W^T)."""
    out = []
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        out += [plain_weight(layer) for layer in (a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                                                   m.gate_proj, m.up_proj, m.down_proj)]
    return out + [plain_weight(model.lm_head)]


def weights_key(model: nn.Module) -> tuple:
    """Changes whenever a source matrix or norm weight does: another tensor (data_ptr: .to(), load into new
    tensors), in-place writes (the version counter: optimizer steps, load_state_dict, LoRA merge) or dtype."""
    norms = [n.weight for block in model.model.layers for n in (block.input_layernorm, block.post_attention_layernorm)]
    return tuple((w.data_ptr(), w._version, w.dtype) for w in source_weights(model) + norms + [model.model.norm.weight])


# model -> its DecodeWeights. A weak dictionary, not an attribute: the copies never enter state_dict,
# deepcopy or pickling, and go away with the model.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, DecodeWeights]" = weakref.WeakKeyDictionary()


def fast_decode_supported(model: nn.Module) -> bool:
    """True where ``decode_step`` computes what the model's forward computes (see the module docstring)."""
    cfg = model.config
    return not model.training and cfg.flash_attn and all(w is not None for w in source_weights(model))


def decode_weights(model: nn.Module) -> DecodeWeights:
    """The model's ``DecodeWeights``, rebuilt if any source matrix changed since they were made."""
    cached = _CACHE.get(model)
    if cached is None or cached.key != weights_key(model):
        _CACHE.pop(model, None)   # free the old copies before making new ones
        with torch.no_grad():
            cached = _CACHE[model] = DecodeWeights(model)
    return cached


def rms_norm_one(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm`` (model/model.py) for a few rows: x / sqrt(sum(x^2) / C + eps) * weight, in fp32.

    The same formula with a sum instead of ``F.rms_norm``'s mean: on one row of 512 numbers a 2-core CPU
    spends several times longer in ``F.rms_norm`` (its mean reduction) than in these few plain ops, and a
    decoded token runs 2 norms per layer + 1 (17 in `small`)."""
    x32 = x.float()
    ms = x32.square().sum(-1, keepdim=True).div_(x.size(-1))                # mean of squares: (..., 1)
    return (x32 * torch.rsqrt(ms.add_(eps)) * weight).to(x.dtype)


def decode_step(model: nn.Module, w: DecodeWeights, ids, cache, pos: int):
    """Logits (B, V) for the tokens ids (B, 1) at position ``pos``; writes their keys/values to ``cache``.
    The residual stream is (B, C), one row per sequence: no sequence axis to carry through every product."""
    core, cfg = model.model, model.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // nh
    eps = cfg.rms_norm_eps
    B = ids.size(0)
    cos, sin = core.rope_cos[pos], core.rope_sin[pos]                     # (hd,)
    x = core.embed_tokens(ids.view(B))                                   # (B, C)
    for i, (block, lw) in enumerate(zip(core.layers, w.layers)):
        attn = block.self_attn
        qkv = (rms_norm_one(x, lw.norm_in, eps) @ lw.qkv).view(B, nh + 2 * nkv, hd)  # (B, nh + 2 nkv, hd)
        qk, v = qkv[:, :nh + nkv], qkv[:, nh + nkv:]                         # q and k heads, v heads
        if attn.qk_norm:
            qk = torch.cat((attn.q_norm(qk[:, :nh]), attn.k_norm(qk[:, nh:])), dim=1)
        qk = apply_rope(qk, cos, sin)                    # one position: cos/sin (hd,) broadcast to (B, h, hd)
        k, v = cache.update(i, pos, qk[:, nh:, None], v[:, :, None])         # (B, nkv, S, hd)
        # the nh // nkv query heads sharing a k/v head are the rows of one query block (as in Attention)
        q = qk[:, :nh].view(B, nkv, nh // nkv, hd)
        y = F.scaled_dot_product_attention(q, k, v)                          # (B, nkv, nh // nkv, hd)
        x = x + y.view(B, nh * hd) @ lw.o                                    # (B, C)
        gate, up = (rms_norm_one(x, lw.norm_post, eps) @ lw.gate_up).chunk(2, dim=-1)   # (B, I) each
        x = x + (F.silu(gate) * up) @ lw.down
    return rms_norm_one(x, w.norm, eps) @ w.head                         # (B, V)
