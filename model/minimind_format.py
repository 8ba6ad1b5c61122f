"""MiniMind's weight files read into TinyMind: a bare model state dict, or a MiniMind LoRA file.

MiniMind saves ``model.state_dict()`` as it is (usually in fp16) with the same parameter names as TinyMind
(Llama's); minimind-3 adds ``self_attn.q_norm.weight`` / ``k_norm.weight`` (RMSNorm over each head's
features of q and k, before RoPE: TinyMind's ``qk_norm``). Its files carry no config: the architecture
comes from ``--preset`` or the flags, and is checked against every tensor's shape. MiniMind's LoRA file holds
``<module>.lora.A.weight`` [r, in] and ``<module>.lora.B.weight`` [out, r] and adds ``B(A x)`` with no
alpha (scaling 1, i.e. alpha = r in TinyMind's terms).

What this file implements:
- ``read_minimind``: load the file (``weights_only=True``), strip DDP / compile prefixes, and tell a full
  state dict from a LoRA file by its keys (``"model"`` or ``"lora"``); anything else is refused.
- ``describe``: what a state dict's shapes say about its architecture (for error messages).
- ``minimind_state``: the state dict checked against a config, MoE refused by name, fp32, lm_head tied.
- ``minimind_lora``: {module name: (A, B)} of a LoRA file, with one rank for all layers.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.common import TinyMindError, safe_load
from model.hf_format import tie_lm_head, to_float32
from model.model import TinyMindConfig, check_state_dict, clean_key, expected_shapes

LORA_A, LORA_B = ".lora.A.weight", ".lora.B.weight"


def read_minimind(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """("model" | "lora", state dict with clean keys)."""
    obj = safe_load(path, "MiniMind weight file")
    if "format" in obj:
        raise TinyMindError(f"{path} is already a TinyMind file (format {obj['format']!r}); no conversion needed")
    state = {clean_key(k): v for k, v in obj.items()}
    not_tensor = [k for k, v in state.items() if not torch.is_tensor(v)]
    if not_tensor:
        raise TinyMindError(f"{path}: {not_tensor[0]!r} is not a tensor; expected a bare MiniMind state dict")
    if state and all(k.endswith((LORA_A, LORA_B)) for k in state):
        return "lora", state
    if "model.embed_tokens.weight" in state:
        return "model", state
    if "tok_embeddings.weight" in state:
        raise TinyMindError(f"{path} uses the first MiniMind release's names (tok_embeddings, attention.wq, ...); "
                            "only MiniMind2 / minimind-3 files (model.layers.N.self_attn.q_proj ...) are read")
    first = ", ".join(list(state)[:3]) or "none"
    raise TinyMindError(f"{path} is neither a MiniMind model state dict (no model.embed_tokens.weight) nor a "
                        f"MiniMind LoRA file (keys ending {LORA_A}); first keys: {first}")


def describe(state: dict) -> str:
    """'hidden 512, 8 layers, vocab 6400, intermediate 1408, k/v width 128, q/k norms no' from the shapes."""
    parts = []
    emb = state.get("model.embed_tokens.weight")
    if emb is not None and emb.dim() == 2:
        parts.append(f"hidden {emb.shape[1]}, vocab {emb.shape[0]}")
    layers = {k.split(".")[2] for k in state if k.startswith("model.layers.")}
    parts.append(f"{len(layers)} layers")
    for key, label in (("model.layers.0.mlp.gate_proj.weight", "intermediate"),
                       ("model.layers.0.self_attn.k_proj.weight", "k/v width")):
        if key in state:
            parts.append(f"{label} {state[key].shape[0]}")
    qn = state.get("model.layers.0.self_attn.q_norm.weight")
    parts.append(f"q/k norms with head size {qn.shape[0]}" if qn is not None else "q/k norms no")
    return ", ".join(parts)


def minimind_state(state: dict, cfg: TinyMindConfig, where) -> dict:
    """The state dict as a TinyMind model of ``cfg`` holds it (fp32), or a one-line error naming the problem."""
    moe = [k for k in state if ".mlp.experts." in k or ".mlp.gate.weight" in k or ".shared_experts." in k]
    if moe:
        raise TinyMindError(f"{where} is a MiniMind MoE model ({moe[0]}); TinyMind has no mixture-of-experts layers")
    state = tie_lm_head(state, cfg, where)
    try:
        check_state_dict(state, expected_shapes(cfg), where)
    except TinyMindError as e:
        raise TinyMindError(f"{e} -- the file looks like: {describe(state)}; check --preset and the flags") from None
    return to_float32(state)


def minimind_lora(state: dict, where) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A [r, in], B [out, r])}; every module needs both halves and the same rank."""
    modules = list(dict.fromkeys(k[:-len(LORA_A)] if k.endswith(LORA_A) else k[:-len(LORA_B)] for k in state))
    out, ranks = {}, set()
    for m in modules:
        A, B = state.get(m + LORA_A), state.get(m + LORA_B)
        if A is None or B is None:
            raise TinyMindError(f"{where}: {m} has only one of {LORA_A} / {LORA_B}")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise TinyMindError(f"{where}: {m}: A {tuple(A.shape)} and B {tuple(B.shape)} are not [r, in] / [out, r]")
        ranks.add(A.shape[0])
        out[m] = (A.float(), B.float())
    if len(ranks) != 1:
        raise TinyMindError(f"{where}: layers have different ranks {sorted(ranks)}; TinyMind's LoRA has one rank")
    return out
