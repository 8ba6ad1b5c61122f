"""TinyMind: the Llama-style decoder-only language model itself (plain PyTorch); LoRA, the weight
format converters and the generation engine for users live in files beside this one in model/.

What this file implements, top to bottom:
- ``TinyMindConfig``: the architecture as a dataclass (every field has a documented default);
  ``count_parameters``: a config's parameter count without building the model;
  ``PRESETS`` / ``get_config``: ``smoke`` (tests), ``tiny`` (CPU demo), ``small`` (= MiniMind2-Small,
  25.83M parameters), ``base`` (= MiniMind2, 104.03M), ``minimind3`` (minimind-3's shape, with q/k norms).
- ``RMSNorm`` (computed in fp32), rotary position embeddings (RoPE, Llama's rotate-half convention,
  cos/sin tables precomputed once, Llama 3.x's frequency scaling as an option), ``Attention`` with
  grouped-query attention (GQA) through ``F.scaled_dot_product_attention`` or an equivalent hand-written
  path (options for released models: q/k norms, q/k/v biases, a head size apart from C / nh), the SwiGLU
  ``MLP``, the pre-norm ``Block``, ``TinyMindModel`` (the stack, with a gradient-checkpointing switch) and
  ``TinyMindForCausalLM`` (+ tied LM head, loss; model/loss_fused.py computes the same training loss in
  fewer passes on a CPU, model/loss_chunked.py a large vocabulary's head a chunk of rows at a time).
- ``KVCache``: keys/values preallocated once per ``generate`` call and written in place.
- ``TinyMindForCausalLM.generate``: greedy / temperature / top-k / top-p sampling, repetition
  penalty, per-row EOS stop, batched left-padded prompts, a streamer callback; the plain definition
  (model/engine.py plugs a faster one-token step into it for chat, evaluation and serving).
- ``save_model`` / ``load_model``: one self-describing checkpoint file (config + weights), written
  atomically and read with ``weights_only=True``; ``state_fingerprint``; ``unwrap_model``;
  ``check_state_dict`` (the one check of a state dict's names and shapes) and ``clean_key``.

Parameter names are Llama's (``model.layers.0.self_attn.q_proj.weight`` ...), so a TinyMind state
dict loads into ``transformers.LlamaForCausalLM`` with ``strict=True`` and gives the same logits.
Shapes in comments: B batch, T new tokens, S keys attended (cache + new), C hidden size,
nh query heads, nkv key/value heads, hd head size, V vocabulary.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.common import TinyMindError, atomic_save, repo_path, safe_load
from model.loss_chunked import chunked_head_applies, chunked_head_loss
from model.loss_fused import fused_ce_applies, fused_cross_entropy


@dataclass
class TinyMindConfig:
    vocab_size: int = 6400                  # byte-level BPE vocabulary (pad 0, <|im_start|> 1, <|im_end|> 2)
    hidden_size: int = 512                  # C: width of the residual stream
    num_hidden_layers: int = 8              # number of transformer blocks
    num_attention_heads: int = 8            # nh: query heads (head size hd = C // nh unless head_dim says)
    num_key_value_heads: int = 2            # nkv: key/value heads shared by nh // nkv query heads (GQA)
    intermediate_size: int | None = None    # SwiGLU width; None -> 64 * ceil(int(8C/3) / 64) as MiniMind2
    max_position_embeddings: int = 32768    # longest sequence (prompt + generated) the RoPE tables cover
    rope_theta: float = 1e6                 # RoPE base frequency
    rms_norm_eps: float = 1e-5              # RMSNorm epsilon
    dropout: float = 0.0                    # dropout on attention probs and residual branches (training only)
    tie_word_embeddings: bool = True        # lm_head shares the embedding matrix (saves V*C parameters)
    flash_attn: bool = True                 # True: F.scaled_dot_product_attention; False: the manual path
    qk_norm: bool = False                   # RMSNorm over each head's q and k before RoPE (minimind-3, Qwen3)
    head_dim: int | None = None             # hd; None -> C // nh. Qwen3 decouples it: 16 heads x 128 != 1024
    qkv_bias: bool = False                  # biases on the q/k/v projections (Qwen2/2.5); o_proj has none
    rope_scaling: dict | None = None        # None: plain RoPE; Llama 3.x: {"rope_type": "llama3", "factor",
    #                                         "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(int(8 * self.hidden_size / 3) / 64)
        if self.num_attention_heads % self.num_key_value_heads:
            raise TinyMindError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise TinyMindError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                                    f"{self.num_attention_heads} (or give head_dim)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise TinyMindError(f"head size {self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)

    def to_dict(self) -> dict:
        d = asdict(self)
        # the later options are written only when they differ from their default: files of models without
        # them stay byte for byte what they were before the options existed
        for key, default in (("qk_norm", False), ("head_dim", self.hidden_size // self.num_attention_heads),
                             ("qkv_bias", False), ("rope_scaling", None)):
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TinyMindConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TinyMindError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512),        # ~0.5M, for tests and the CI pipeline
    "tiny": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                 max_position_embeddings=1024),        # ~3.6M, the CPU demo
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2),   # 25.83M
    "base": dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2),  # 104.03M
    # minimind-3: 8 query / 4 key-value heads of 96, MLP width ceil(768 * pi / 64) * 64 = 2432, q/k norms
    "minimind3": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=64 * math.ceil(768 * math.pi / 64), rms_norm_eps=1e-6, qk_norm=True),
}


def count_parameters(cfg: TinyMindConfig) -> int:
    """The number of parameters of a model of ``cfg``, from the config alone (nothing allocated): what
    ``TinyMindForCausalLM(cfg).num_parameters()`` returns, also for configs too big for this machine."""
    C, hd, L, V = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd   # widths of q and of k (= v)
    attn = C * q + 2 * C * kv + q * C                     # q, k, v, o projections
    attn += (q + 2 * kv) * cfg.qkv_bias + 2 * hd * cfg.qk_norm
    mlp = 3 * C * cfg.intermediate_size                   # gate, up, down
    block = attn + mlp + 2 * C                            # + the two RMSNorm weights
    head = 0 if cfg.tie_word_embeddings else V * C
    return V * C + L * block + C + head                   # embedding, blocks, final norm, LM head


def get_config(preset: str = "tiny", **overrides) -> TinyMindConfig:
    """A preset's config with some fields replaced (``None`` overrides are ignored, e.g. unset CLI flags)."""
    if preset not in PRESETS:
        raise TinyMindError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return TinyMindConfig.from_dict({**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling: dict):
    """Only Llama 3's scaling ("llama3", with its four numbers) is computed here; anything else is refused."""
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind != "llama3":
        raise TinyMindError(f"rope_scaling {scaling!r}: only rope_type 'llama3' is supported")
    missing = [k for k in ROPE_SCALING_KEYS if not isinstance(scaling.get(k), (int, float))]
    if missing or scaling["low_freq_factor"] >= scaling["high_freq_factor"]:
        raise TinyMindError(f"rope_scaling {scaling!r}: needs numbers {', '.join(ROPE_SCALING_KEYS)} "
                            "with low_freq_factor < high_freq_factor")


class RMSNorm(nn.Module):
    """x / rms(x) * weight; bf16/fp16 inputs are normalised in fp32 (a half-precision mean of squares
    loses precision) and cast back."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # F.rms_norm(x, ..., w, eps) = x * rsqrt(mean(x^2, -1) + eps) * w in one call (runs 2x per layer per token)
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def llama3_frequencies(inv_freq, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_max_position_embeddings: int, **_):
    """Llama 3.x's longer context: frequencies whose wavelength exceeds the original context / low_freq_factor
    turn ``factor`` times slower, those shorter than original / high_freq_factor stay, the band between
    is interpolated smoothly. inv_freq: (hd/2,)."""
    old = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    slow = torch.where(wavelen > old / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)   # 0 .. 1 in the band
    between = (1 - smooth) * slow / factor + smooth * slow
    in_band = (wavelen >= old / high_freq_factor) & (wavelen <= old / low_freq_factor)
    return torch.where(in_band, between, slow)


def rope_tables(head_dim: int, max_pos: int, theta: float, scaling: dict | None = None):
    """cos/sin of shape (max_pos, hd); frequency i of the first half is repeated in the second (rotate-half).
    ``scaling``: the config's rope_scaling (Llama 3.x), or None for plain RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (hd/2,)
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, **scaling)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)                   # (P, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                                       # (P, hd)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate each (x[i], x[i + hd/2]) pair by its position's angle. x: (B, h, T, hd); cos/sin broadcast to it."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of every layer, preallocated as (B, nkv, max_len, hd) and written in place.

    Growing a cache with torch.cat copies everything seen so far at every step; here each step writes
    only its own T columns and attention reads the filled prefix [:start_pos + T] as a view.
    The buffers are allocated at the first write so they take the dtype/device of the keys (autocast).
    """

    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer: int, start: int, k, v):
        if self.k[layer] is None:
            B, nkv, _, hd = k.shape
            self.k[layer] = k.new_zeros(B, nkv, self.max_len, hd)
            self.v[layer] = v.new_zeros(B, nkv, self.max_len, hd)
        end = start + k.size(2)
        self.k[layer].narrow(2, start, k.size(2)).copy_(k)            # cache[:, :, start:end] = k
        self.v[layer].narrow(2, start, v.size(2)).copy_(v)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)   # (B, nkv, S, hd) views


class Attention(nn.Module):
    def __init__(self, cfg: TinyMindConfig):
        super().__init__()
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim   # hd: C // nh unless the config decouples it (nh * hd != C in Qwen3)
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.dropout = cfg.dropout
        self.flash = cfg.flash_attn
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:   # one (hd,) weight each, shared by all heads: keeps q.k from growing with training
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, layer: int = 0, start_pos: int = 0):
        """mask: None (plain causal) or bool, broadcastable to (B, 1, T, S), True = may attend."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)    # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)    # (B, nkv, T, hd)
        if self.qk_norm:   # normalise each head's vector over its hd features, before RoPE rotates it
            q, k = self.q_norm(q), self.k_norm(k)
        # the tables in q's dtype, as transformers' Llama does: under bf16 autocast fp32 tables would
        # turn q and k into fp32 copies that attention casts straight back
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start_pos, k, v)                            # (B, nkv, S, hd)
        # a single new token may see every cached key; "True if .. else False": a plain bool even where
        # torch.compile makes T symbolic (SDPA takes no symbolic is_causal)
        causal = True if mask is None and T > 1 else False
        p = self.dropout if self.training else 0.0
        if self.flash and T == 1:
            # decoding one token: the nh // nkv query heads of a group become the rows of one query block
            # for their shared k/v head, (B, nkv, nh // nkv, hd): no copies of k/v, no causal mask needed
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, -1, self.head_dim), k, v,
                                               attn_mask=mask, dropout_p=p).view(B, self.n_head, 1, -1)
        elif self.flash:
            # enable_gqa lets each group of nh // nkv query heads read its shared k/v head without copies
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                               enable_gqa=self.n_kv != self.n_head)
        else:
            rep = self.n_head // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)             # (B, nh, T, S)
            if causal:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            att = F.dropout(F.softmax(att.float(), dim=-1).to(q.dtype), p)
            y = att @ v                                                            # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)          # (B, T, nh * hd)
        return F.dropout(self.o_proj(y), self.dropout, self.training)   # residual dropout


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TinyMindConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x):                                               # (B, T, C)
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)                  # (B, T, intermediate_size)
        return F.dropout(self.down_proj(h), self.dropout, self.training)  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TinyMindConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0, start_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyMindModel(nn.Module):
    """Embedding -> blocks -> final norm; returns hidden states (B, T, C).

    ``gradient_checkpointing`` (a switch of the running model, not of its config; train_lora.py's
    --grad_checkpoint): in training, keep only each block's input and recompute the block's inside during
    the backward, so activation memory holds one block's activations instead of every block's, for about
    one more forward pass of compute. The gradients are the same (tests/test_grad_memory.py)."""

    gradient_checkpointing: bool = False

    def __init__(self, cfg: TinyMindConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = cfg.dropout
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        # non-persistent: recomputed from the config, so they never enter the state dict
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids, attention_mask=None, kv_cache: KVCache | None = None, start_pos: int = 0):
        B, T = input_ids.shape
        S = start_pos + T                                 # keys attended: cached ones + the new ones
        if S > self.config.max_position_embeddings:
            raise TinyMindError(f"sequence of {S} tokens exceeds max_position_embeddings "
                                f"{self.config.max_position_embeddings}")
        if kv_cache is not None and S > kv_cache.max_len:
            raise TinyMindError(f"KV cache holds {kv_cache.max_len} positions, {S} requested")
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise TinyMindError(f"attention_mask must be (batch, start_pos + T) = {(B, S)}, "
                                f"got {tuple(attention_mask.shape)}")
        # Masks, built once per forward and shared by every layer. mask=None means plain causal attention
        # (or none at all for a single new token, which may see every cached key).
        mask, dev = None, input_ids.device
        if attention_mask is None:
            cos, sin = self.rope_cos[start_pos:S], self.rope_sin[start_pos:S]       # (T, hd)
            if start_pos > 0 and T > 1:   # a chunk after cached tokens: causal, shifted by start_pos
                mask = torch.arange(S, device=dev) <= torch.arange(start_pos, S, device=dev)[:, None]  # (T, S)
        else:
            # left padding: a row's positions count only its real tokens, so "<pad><pad>Hi" == "Hi"
            pos = (attention_mask.long().cumsum(-1)[:, start_pos:] - 1).clamp(min=0)   # (B, T)
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)  # (B, 1, T, hd)
            k_idx = torch.arange(S, device=dev)                                    # (S,) key positions
            q_idx = torch.arange(start_pos, S, device=dev)[:, None]                # (T, 1) query positions
            # causal and not a pad key; a pad query may see itself so no softmax row is all -inf (NaN)
            mask = ((k_idx <= q_idx) & attention_mask.bool()[:, None, :]) | (k_idx == q_idx)  # (B, T, S)
            mask = mask.unsqueeze(1)                                               # (B, 1, T, S)
        x = F.dropout(self.embed_tokens(input_ids), self.dropout, self.training)  # (B, T, C)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for i, layer in enumerate(self.layers):
            if recompute:   # the block's inside is recomputed in the backward (and its dropout masks with it)
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
                continue
            x = layer(x, cos, sin, mask, kv_cache, i, start_pos)
        return self.norm(x)


class CausalLMOutput(NamedTuple):
    loss: torch.Tensor | None   # mean cross-entropy over labels != -100 (None without labels)
    logits: torch.Tensor        # (B, T, V), or (B, logits_to_keep, V)


class TinyMindForCausalLM(nn.Module):
    # > 0: the training loss runs the LM head this many rows at a time (model/loss_chunked.py), never
    # holding the (N, V) logits; a switch of the running model (train_lora.py's --head_chunk), not its config
    head_chunk_rows: int = 0

    def __init__(self, config: TinyMindConfig | None = None):
        super().__init__()
        self.config = config = config or TinyMindConfig()
        self.model = TinyMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight   # one (V, C) matrix, read and written twice
        self.apply(self._init_weights)
        for name, p in self.named_parameters():   # GPT-2: scale the residual-branch outputs by 1/sqrt(2L)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_hidden_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:   # q/k/v biases (qkv_bias) start at 0
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())   # parameters() yields a tied matrix once

    def forward(self, input_ids, labels=None, attention_mask=None, kv_cache: KVCache | None = None,
                start_pos: int = 0, logits_to_keep: int = 0) -> CausalLMOutput:
        """input_ids (B, T); labels (B, T), shifted here (position t predicts t+1), -100 = ignored;
        attention_mask (B, start_pos + T): 1 real, 0 pad; kv_cache/start_pos: write this chunk's keys at
        cache positions [start_pos, start_pos + T); logits_to_keep > 0: the LM head runs on the last
        positions only (generation needs just one). With labels the output is (loss, None): the head
        runs only where there is a label (see below)."""
        h = self.model(input_ids, attention_mask, kv_cache, start_pos)             # (B, T, C)
        if labels is not None and not logits_to_keep:
            # Training: position t predicts token t + 1. Only positions whose next token has a label
            # need the LM head -- in SFT and LoRA data the prompts and the padding have none (about
            # half to two thirds of the tokens), and the (C x V) head is a third of a tiny model's
            # compute. So the head runs on the labelled rows only; the loss is the same number, and
            # logits (not needed for training) is None.
            targets = labels[:, 1:]
            keep = targets != -100                                                  # (B, T-1)
            if chunked_head_applies(self.lm_head, self.head_chunk_rows):   # no (N, V) logits: loss_chunked.py
                loss = chunked_head_loss(h[:, :-1][keep], self.lm_head.weight, targets[keep],
                                         self.head_chunk_rows)
                return CausalLMOutput(loss, None)
            logits = self.lm_head(h[:, :-1][keep])                                  # (N, V)
            if fused_ce_applies(logits):   # the same loss in fewer passes over (N, V): model/loss_fused.py
                return CausalLMOutput(fused_cross_entropy(logits, targets[keep]), None)
            return CausalLMOutput(F.cross_entropy(logits.float(), targets[keep]), None)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)   # (B, T, V)
        return CausalLMOutput(None, logits)

    @torch.inference_mode()
    def generate(self, input_ids, max_new_tokens: int = 256, temperature: float = 0.85, top_k: int | None = None,
                 top_p: float | None = 0.85, repetition_penalty: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = 2,
                 attention_mask=None, streamer: Callable | None = None, use_cache: bool = True,
                 pad_token_id: int = 0, one_token_step: Callable | None = None):
        """Continue (B, T) prompts; returns (B, T + generated) with the prompts first.

        temperature <= 0 is greedy; top_k / top_p (None or 0 / 1.0 = off) filter before sampling.
        Left-padded batches pass attention_mask (1 real, 0 pad). A row stops at eos_token_id (one id, or
        several: a model with more than one end-of-turn token, as Llama 3's <|eot_id|> and <|eom_id|>) and then
        emits pad_token_id; the loop ends when every row has stopped, after max_new_tokens, or when the
        sequence reaches max_position_embeddings. streamer(tokens (B,)) is called after each step.
        use_cache=False recomputes the whole sequence at each step (slow; the reference for tests).
        one_token_step(ids (B, 1), cache, pos) -> logits (B, V): what runs instead of this model's forward
        for each token after the prompt, where there is a cache and no padding mask (model/engine.py
        plugs in its fast path, which computes the same function); None: the forward below.
        """
        B, T = input_ids.shape
        ctx = self.config.max_position_embeddings
        if T == 0:
            raise TinyMindError("generate needs a non-empty prompt")
        if T >= ctx:
            raise TinyMindError(f"prompt has {T} tokens but the context is {ctx} (max_position_embeddings); "
                                f"shorten it to at most {ctx - 1} tokens")
        if attention_mask is not None and (attention_mask.shape != (B, T) or not bool(attention_mask[:, -1].all())):
            raise TinyMindError(f"attention_mask must be ({B}, {T}) with padding on the left (last column all 1)")
        max_new = max(0, min(max_new_tokens, ctx - T))        # stop at the context limit
        if max_new == 0:
            return input_ids.clone()
        seq = input_ids.new_full((B, T + max_new), pad_token_id)   # prompt + every token we will write
        seq[:, :T] = input_ids
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):   # all ones: no mask at all
            mask = torch.ones_like(seq)
            mask[:, :T] = attention_mask
        cache = KVCache(self.config.num_hidden_layers, T + max_new) if use_cache else None
        step_fn = one_token_step if use_cache and mask is None else None   # it knows no padding mask
        finished = torch.zeros(B, dtype=torch.bool, device=seq.device)
        stop = None if eos_token_id is None else torch.tensor(eos_token_id, device=seq.device).reshape(-1)
        n = T                                                 # filled length of seq
        logits = self(seq[:, :T], attention_mask=None if mask is None else mask[:, :T],
                      kv_cache=cache, logits_to_keep=1).logits[:, -1]              # (B, V)
        for step in range(max_new):
            nxt = self._next_token(logits, seq[:, :n], temperature, top_k, top_p, repetition_penalty)  # (B,)
            if stop is not None:
                nxt = nxt.masked_fill(finished, pad_token_id)
                finished |= torch.isin(nxt, stop)
            seq[:, n] = nxt
            n += 1
            if streamer is not None:
                streamer(nxt)
            if step == max_new - 1 or (stop is not None and bool(finished.all())):
                break
            m = None if mask is None else mask[:, :n]
            if step_fn is not None:
                logits = step_fn(seq[:, n - 1:n], cache, n - 1)                          # (B, V)
            elif use_cache:   # feed only the new token; its keys go to cache position n - 1
                logits = self(seq[:, n - 1:n], attention_mask=m, kv_cache=cache, start_pos=n - 1,
                              logits_to_keep=1).logits[:, -1]
            else:
                logits = self(seq[:, :n], attention_mask=m, logits_to_keep=1).logits[:, -1]
        return seq[:, :n]

    @staticmethod
    def _next_token(logits, seen, temperature, top_k, top_p, repetition_penalty):
        """Pick one token per row from logits (B, V); seen (B, L) are the ids so far (for the penalty)."""
        if repetition_penalty != 1.0:   # CTRL-style: shrink the scores of every id already in the row
            score = logits.gather(1, seen)
            score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
            logits = logits.scatter(1, seen, score)
        if temperature <= 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k and top_k < logits.size(-1):
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and 0 < top_p < 1.0:   # nucleus: smallest set whose probability reaches top_p
            sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > top_p   # the first token is always kept
            logits = logits.scatter(1, idx, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


# ---------------------------------------------------------------------------------------------
# Checkpoints: {"format": "tinymind-model", "config": {...}, "model": state_dict, **extra}
# ---------------------------------------------------------------------------------------------
FORMAT = "tinymind-model"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DistributedDataParallel/DataParallel (.module) and torch.compile (._orig_mod)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_key(key: str) -> str:
    """Drop wrapper prefixes: "module." (DDP) and "_orig_mod." (torch.compile, also on submodules)."""
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def expected_shapes(cfg: TinyMindConfig) -> dict[str, tuple]:
    """Name -> shape of every tensor a model of ``cfg`` holds."""
    with torch.device("meta"):   # names and shapes only: no memory, no init cost
        return {k: tuple(v.shape) for k, v in TinyMindForCausalLM(cfg).state_dict().items()}


def check_state_dict(state: dict, expected: dict[str, tuple], where, what: str = "tensor(s)", hint: str = ""):
    """``state`` holds exactly the keys of ``expected`` (name -> shape), each a tensor of that shape; else one
    line naming the first problem: missing keys, unknown keys, or a wrong shape (followed by ``hint``).
    The one check for model checkpoints, imported weights (model/hf_format.py) and LoRA files."""
    for label, keys in (("missing", sorted(set(expected) - set(state))),
                        ("unknown", sorted(set(state) - set(expected)))):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            raise TinyMindError(f"{where}: {len(keys)} {label} {what}: {', '.join(keys[:3])}{more}")
    for key, shape in expected.items():
        if not torch.is_tensor(state[key]) or tuple(state[key].shape) != shape:
            got = tuple(state[key].shape) if torch.is_tensor(state[key]) else type(state[key]).__name__
            raise TinyMindError(f"{where}: {key} has shape {got}, expected {shape}{hint}")


def save_model(model: nn.Module, path, state_dict: dict | None = None, **extra) -> Path:
    """Write config + weights to one file atomically; ``extra`` (stage=..., weight=...) is stored beside them.
    ``state_dict`` replaces the model's own (e.g. a LoRA-merged base state dict with plain names)."""
    model = unwrap_model(model)
    state = {clean_key(k): v for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    check_state_dict(state, expected_shapes(model.config), f"save_model({path}): weights do not match the config")
    clash = {"format", "config", "model"} & set(extra)
    if clash:
        raise TinyMindError(f"save_model: extra keys {sorted(clash)} are reserved")
    return atomic_save({"format": FORMAT, "config": model.config.to_dict(), "model": state, **extra},
                       repo_path(path))


def load_model(path, device="cpu", dtype=None) -> tuple[TinyMindForCausalLM, dict]:
    """Rebuild the model from the file alone (its own config), load the weights strictly, move/cast,
    return (model in eval mode, the checkpoint dict)."""
    path = repo_path(path)
    ckpt = safe_load(path, "model checkpoint")
    if ckpt.get("format") != FORMAT:
        raise TinyMindError(f"{path} is not a TinyMind model checkpoint (format {ckpt.get('format')!r}, "
                            f"expected {FORMAT!r})")
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), dict):
        raise TinyMindError(f"{path}: checkpoint lacks its 'config' or 'model' dict")
    try:
        cfg = TinyMindConfig.from_dict(ckpt["config"])
    except (TinyMindError, TypeError) as e:
        raise TinyMindError(f"{path}: bad config: {e}") from None
    state = {clean_key(k): v for k, v in ckpt["model"].items()}
    check_state_dict(state, expected_shapes(cfg), f"{path}: weights do not match the config")
    model = TinyMindForCausalLM(cfg)
    model.load_state_dict(state, strict=True)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return model.to(device=device, dtype=dtype).eval(), ckpt


def state_fingerprint(state_dict: dict) -> str:
    """16 hex digits identifying a set of weights: names, shapes and values rounded to bfloat16
    (so an fp32 model and its bf16 copy agree; an fp16 copy does not)."""
    h = hashlib.sha256()
    for k in sorted(state_dict, key=clean_key):
        t = state_dict[k]
        if not torch.is_tensor(t):
            continue
        h.update(f"{clean_key(k)}:{tuple(t.shape)};".encode())
        h.update(t.detach().to("cpu", torch.bfloat16).reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
