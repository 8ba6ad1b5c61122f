"""Generation for users: the fast one-token step, the chat prompt, replies, and loading a model to answer.

``model/model.py`` holds the plain definition a learner reads, with its plain cached
``TinyMindForCausalLM.generate``; it knows nothing of this file. This file is what the chat CLI
(``eval_llm.py``), the evaluation (``tools/scoring.py``), the HTTP server, the LoRA merger and the
training watch (``trainer/watch.py``) share, so that they all prompt, decode and load the same way:

- the fast one-token step (``DecodeWeights``, ``decode_weights``, ``decode_step``,
  ``fast_decode_supported``) and ``generate``: the model's own ``generate`` with that step plugged in;
- ``encode_chat`` (the one place a ChatML prompt becomes token ids) and ``prompt_ids`` (the prompt of a
  conversation, cut to the context window; plain continuation for a "pretrain" checkpoint);
- ``generate_reply`` (one reply, streamed as text) and ``greedy_replies`` (batched greedy replies, cut at
  the end-of-reply token);
- ``load_base`` / ``load_adapters`` / ``adapters_for_base`` (a checkpoint and its LoRA files) and
  ``load_chat_model`` (all of it plus the tokenizer, merging and the inference dtype: a ``ChatModel``).

Why a separate one-token path: at batch 1 every weight is read once per token for a matrix-vector
product, so a token costs (bytes of weights) / (memory bandwidth), plus the fixed cost of ~30 small
operations per layer. On a 2-core CPU (1 thread, `small`, batch 1, the two paths timed interleaved) a
token takes 17.3 ms instead of 25.8 ms in fp32 and 16.3 ms instead of 19.3 ms in bf16. What it changes:

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
  ``dev/bench.py --only decode`` prints today's rate and what the matrix products alone reach.

``generate`` keeps the plain forward where this path does not apply (``fast_decode_supported``, and the
model's generate itself for left-padded batches): a live LoRA branch (a merged one is fine), q/k/v
biases (``qkv_bias``, Qwen2: ``plain_weight`` takes bias-free layers only), ``flash_attn=False``,
training mode. tests/test_engine.py checks that both paths give the same logits
and tokens.
"""
from __future__ import annotations

import re
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.common import TinyMindError, checkpoint_names, find_checkpoint, repo_path, safe_load, setup_device
from model.model import TinyMindForCausalLM, apply_rope, load_model, state_fingerprint
from model.lora_adapters import set_active_adapters
from model.lora_file import LORA_FORMAT
import model.lora_variants  # noqa: F401  (registers every LoRA variant, so an adapter file of any of them loads)
from model.model_lora import NAME_RE, base_state_dict, load_lora, merge_lora
from model.tokenizer import DEFAULT_TOKENIZER_PATH, TinyMindTokenizer, load_model_tokenizer, load_tokenizer


# ---------------------------------------------------------------------------------------------
# the fast one-token step
# ---------------------------------------------------------------------------------------------

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
    """True where ``decode_step`` computes what the model's forward computes (see the module docstring).
    Only TinyMind's own model: ``decode_step`` reads its layers by name."""
    if not isinstance(model, TinyMindForCausalLM):
        return False
    return not model.training and model.config.flash_attn and all(w is not None for w in source_weights(model))


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
    hd = cfg.head_dim
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


@torch.inference_mode()
def generate(model: nn.Module, input_ids, **kwargs):
    """``model.generate(input_ids, **kwargs)`` with ``decode_step`` as its one-token step where the fast
    path applies (else exactly the plain generate). Same arguments, same tokens, faster at batch 1."""
    if kwargs.get("use_cache", True) and fast_decode_supported(model):
        weights = decode_weights(model)   # built once per call, before the prompt runs
        kwargs["one_token_step"] = lambda ids, cache, pos: decode_step(model, weights, ids, cache, pos)
    return model.generate(input_ids, **kwargs)


# ---------------------------------------------------------------------------------------------
# prompts and replies
# ---------------------------------------------------------------------------------------------

def encode_chat(tok, messages: list[dict]) -> list[int]:
    """Token ids of the ChatML prompt for ``messages`` (role/content dicts), ending with the
    ``<|im_start|>assistant\\n`` the model answers after: the one way every program prompts a chat model.
    An imported model's tokenizer renders its own template (model/tokenizer.py::render_template)."""
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))


def prompt_ids(tok, messages: list, chat: bool, ctx: int, max_new_tokens: int) -> list:
    """Token ids of the prompt for ``messages`` (dicts with role/content; an optional system turn first).

    A chat checkpoint gets the ChatML conversation; while prompt + reply would not fit the context of
    ``ctx`` tokens, the oldest turn (a message and the replies up to the next user message) is dropped;
    the system turn and the last message always stay. A "pretrain" checkpoint (``chat=False``) continues
    the last message's text. A prompt that still fills the context is a TinyMindError.
    """
    if not chat:  # pretraining documents start with bos (<|im_start|>), so the prompt does too
        ids = ([] if tok.bos_id is None else [tok.bos_id]) + tok.encode(messages[-1]["content"])
    else:
        head = messages[:1] if len(messages) > 1 and messages[0]["role"] == "system" else []
        history = messages[len(head):-1]
        last = messages[-1:]
        while True:
            ids = encode_chat(tok, head + history + last)
            if not history or len(ids) + max_new_tokens <= ctx:
                break
            # drop the oldest turn: its first message and everything up to the next user message
            cut = next((i for i, m in enumerate(history) if i > 0 and m["role"] == "user"), len(history))
            history = history[cut:]
    if len(ids) >= ctx:
        raise TinyMindError(f"the prompt is {len(ids)} tokens but the model's context is {ctx} "
                            "(max_position_embeddings): shorten it")
    return ids


def generate_reply(model, tok, ids: list, max_new_tokens: int, temperature: float = 0.7, top_p: float = 0.9,
                   top_k: int = 0, repetition_penalty: float = 1.0, seed=None, on_text=None):
    """Generate the reply to prompt ``ids``. Returns (reply text, new token ids, seconds).

    ``on_text(piece)`` receives the reply as it grows, one piece per token that completes text; the
    pieces join to exactly the returned reply. ``seed`` re-seeds torch first (a reproducible reply).
    """
    ctx = model.config.max_position_embeddings
    if seed is not None:
        torch.manual_seed(seed)
    new, shown = [], ""

    def on_token(token_ids):  # (B,) = (1,): called once per generated token
        nonlocal shown
        new.append(int(token_ids[0]))
        if on_text is None:
            return
        # Decode the whole reply so far and hand on the new suffix: a character whose UTF-8 bytes are
        # split over several tokens decodes to U+FFFD until its last byte arrives, so wait for it.
        so_far = tok.decode(new)
        if so_far.endswith("\ufffd") or not so_far.startswith(shown) or so_far == shown:
            return
        on_text(so_far[len(shown):])
        shown = so_far

    device = next(model.parameters()).device
    t0 = time.perf_counter()
    out = generate(model, torch.tensor([ids], dtype=torch.long, device=device),
                   max_new_tokens=min(max_new_tokens, ctx - len(ids)),
                   temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty, eos_token_id=list(tok.stop_ids), streamer=on_token)
    seconds = time.perf_counter() - t0
    new_ids = out[0, len(ids):].tolist()
    reply = tok.decode(new_ids).rstrip("\ufffd")  # a character cut by max_new_tokens is dropped
    if on_text is not None and reply.startswith(shown) and reply != shown:
        on_text(reply[len(shown):])  # whatever the last tokens completed
    return reply, new_ids, seconds


@torch.inference_mode()
def greedy_replies(model: nn.Module, tok, prompts: list[list[int]], max_new_tokens: int,
                   batch_size: int = 1) -> list[str]:
    """The greedy reply text to each prompt (token ids), in the prompts' order.

    Prompts are sorted by length and decoded ``batch_size`` at a time, left-padded so every prompt ends at
    the last column (one KV cache per batch); each reply is cut at its end-of-turn token (``<|im_end|>``;
    an imported model's own, ``tok.stop_ids``), decoded without special
    tokens and stripped. batch_size=1 pads nothing, so the fast one-token step runs. The model is put in
    eval mode (dropout off, as in chat) and given back in the mode it came in.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            longest = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), longest), tok.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), longest), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: every prompt ends at the last column
                ids[row, longest - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, longest - len(prompts[i]):] = 1
            out = generate(model, ids.to(device), max_new_tokens=max_new_tokens, temperature=0.0,
                           eos_token_id=list(tok.stop_ids), attention_mask=mask.to(device))
            for row, i in enumerate(idx):
                new = out[row, longest:].tolist()
                ends = [j for j, t in enumerate(new) if t in tok.stop_ids]
                if ends:
                    new = new[:ends[0]]
                replies[i] = tok.decode(new, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return replies


# ---------------------------------------------------------------------------------------------
# loading a checkpoint with its adapters
# ---------------------------------------------------------------------------------------------

def load_base(save_dir, weight: str, hidden_size: int | None = None, device="cpu",
              what: str = "checkpoint") -> tuple[TinyMindForCausalLM, dict, Path]:
    """The checkpoint ``{save_dir}/{weight}_{hidden}.pth`` in fp32 and eval mode: (model, checkpoint, path).

    fp32 on purpose: LoRA files are checked against the fp32 base weights and merged in fp32; a caller
    casts to its inference dtype only after that (docs/05 section 4)."""
    path = find_checkpoint(save_dir, weight, hidden_size, what=what)
    model, ckpt = load_model(path, device=device)
    return model, ckpt, path


def load_adapters(model: nn.Module, save_dir, names, force: bool = False) -> list[Path]:
    """Load each LoRA ``{save_dir}/{name}_{hidden}.pth`` (hidden: the model's) as the adapter ``name``;
    ``load_lora`` checks that it was trained for this base (``force`` skips the weights check)."""
    paths = []
    for name in names:
        path = find_checkpoint(save_dir, name, model.config.hidden_size, what="LoRA file")
        load_lora(model, path, adapter_name=name, force=force)
        paths.append(path)
    return paths


def adapters_for_base(model: nn.Module, save_dir, skip: str = "") -> list[str]:
    """The names of every LoRA file in ``save_dir`` made for this model's weights (its base fingerprint);
    call it while the model is still plain fp32. Other files (full checkpoints, junk) are passed over."""
    cfg = model.config
    fingerprint = state_fingerprint(base_state_dict(model))
    names = []
    for name in checkpoint_names(save_dir, cfg.hidden_size):
        if name == skip or not re.fullmatch(NAME_RE, name):
            continue
        try:
            obj = safe_load(find_checkpoint(save_dir, name, cfg.hidden_size), "LoRA file")
        except TinyMindError:
            continue
        if obj.get("format") == LORA_FORMAT and obj.get("base_fingerprint") == fingerprint:
            names.append(name)
    return names


@dataclass
class ChatModel:
    """A model ready to answer: adapters loaded (all active; merged if asked), cast to the inference dtype,
    with its tokenizer and its prompt style."""
    model: TinyMindForCausalLM
    tok: TinyMindTokenizer
    path: Path               # the checkpoint file
    stage: str               # from the checkpoint: "pretrain" continues text, everything else chats
    adapters: list[str]      # the loaded LoRA adapters, in loading order
    merged: bool             # the adapters are merged into the weights (no switching)
    device: torch.device
    dtype: torch.dtype

    @property
    def chat(self) -> bool:
        return self.stage != "pretrain"   # "pretrain" checkpoints never saw the chat template

    @property
    def ctx(self) -> int:
        return self.model.config.max_position_embeddings

    def describe(self, save_dir: str) -> str:
        """The one line a program prints after loading."""
        cfg = self.model.config
        shown = save_dir.rstrip("/") or "."
        lora = f", LoRA {','.join(self.adapters)}{' (merged)' if self.merged else ''}" if self.adapters else ""
        return (f"loaded {shown}/{self.path.name}: stage {self.stage}, {self.model.num_parameters() / 1e6:.2f}M "
                f"params, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {self.device} "
                f"{str(self.dtype)[6:]}{lora}")


def load_chat_model(save_dir, weight: str, adapters: Sequence[str] | None = (), hidden_size: int | None = None,
                    num_hidden_layers: int | None = None, tokenizer_path=DEFAULT_TOKENIZER_PATH,
                    device: str = "auto", dtype: str = "auto", merge: bool = False) -> ChatModel:
    """Load ``{save_dir}/{weight}_{hidden}.pth`` and the LoRA files ``adapters`` (None: every one in
    ``save_dir`` made for this base) for chat: checked, merged in fp32 if ``merge``, then cast.

    hidden_size / num_hidden_layers: flags the user gave, checked against the checkpoint's own config.
    device / dtype: as ``setup_device`` takes them (a bad flag fails before anything is read).
    """
    dev = setup_device(device, dtype, log=False, inference=True)
    model, ckpt, path = load_base(save_dir, weight, hidden_size, device=dev.device)
    cfg = model.config
    for flag, value in (("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers)):
        if value and value != getattr(cfg, flag):
            raise TinyMindError(f"--{flag} {value} does not match {path.name} ({flag}={getattr(cfg, flag)}); "
                                "the checkpoint carries its own config, the flag can be left out")
    tok = load_model_tokenizer(repo_path(tokenizer_path), cfg.vocab_size, path.name)
    stage = ckpt.get("stage") or ("pretrain" if weight.startswith("pretrain") else "sft")
    names = adapters_for_base(model, save_dir, skip=weight) if adapters is None else list(adapters)
    load_adapters(model, save_dir, names)
    if names:
        set_active_adapters(model, names)
    if merge:
        merge_lora(model)
    model.to(dev.dtype).eval()
    return ChatModel(model, tok, path, stage, names, merge, dev.device, dev.dtype)
