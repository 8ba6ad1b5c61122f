"""Several LoRA adapters in one model: choose which run, switch them all off for a while, combine them.

The adapters themselves live in the layers of ``model/model_lora.py`` (``LoRALinear.lora_A[name]``, ...),
and every layer keeps the names that run in ``LoRALinear.active``; the functions here only change that
tuple, or add one more adapter built from the others. Nothing is allowed while adapters are merged into
the weights (W would then hold updates the active list no longer names).

What this file implements:
- ``set_active_adapters``: a name, ``"a,b"``, a list, or ``None`` / ``"off"``.
- ``disable_adapters``: ``with disable_adapters(model):`` runs the plain base model.
- ``combine_adapters``: one new adapter whose update is exactly a weighted sum of others (ranks concatenated).
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.nn as nn

from model.common import TinyMindError
from model.model_lora import NAME_RE, LoRAConfig, adapter_names, lora_modules, require_adapters


def activate(model: nn.Module, names: tuple[str, ...]):
    """Exactly ``names`` run, in every layer that holds them (unchecked: the functions below check first)."""
    for _, m in lora_modules(model):
        m.active = tuple(n for n in names if n in m.configs)


def set_active_adapters(model: nn.Module, names):
    """Choose which adapters run: a name, ``"a,b"``, a list of names, or ``None`` / ``"off"`` for none."""
    if names is None or names == "off":
        names = ()
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    require_adapters(model, "switch adapters", names)
    activate(model, tuple(dict.fromkeys(names)))


@contextmanager
def disable_adapters(model: nn.Module):
    """``with disable_adapters(model):`` runs the plain base model; the active adapters come back after."""
    require_adapters(model, "disable adapters")
    saved = [(m, m.active) for _, m in lora_modules(model)]
    try:
        activate(model, ())
        yield model
    finally:
        for m, active in saved:
            m.active = active


def lora_pair(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') in fp32 with B' @ A' = ``layer.delta_weight(name)``: the factors ``combine_adapters`` concatenates.
    A variant whose update is not s * B @ A gives its own (or refuses, as DoRA does: its update is not low-rank)."""
    if name in layer.variants:
        return layer.variants[name].lora_pair(layer, name)
    return layer.scaling[name] * layer.lora_B[name].detach().float(), layer.lora_A[name].detach().float()


def combine_adapters(model: nn.Module, names, weights, new_name: str) -> str:
    """Add adapter ``new_name`` whose update is exactly sum_i w_i * s_i * B_i @ A_i, and make it the active one.

    Exact because the ranks are concatenated, not averaged (scaling of the new adapter: 1):
        A_new = cat_i(A_i)              [sum r_i, in]
        B_new = cat_i(w_i * s_i * B_i)  [out, sum r_i]    so B_new @ A_new = sum_i w_i * s_i * B_i @ A_i
    A layer lacking one of the adapters gets zero rows / columns for it, so every layer has the same rank.
    """
    names, weights = list(names), [float(w) for w in weights]
    if not names or len(names) != len(weights):
        raise TinyMindError(f"combine_adapters: {len(names)} names but {len(weights)} weights")
    if not re.fullmatch(NAME_RE, new_name) or new_name in adapter_names(model):
        raise TinyMindError(f"combine_adapters: {new_name!r} is already loaded or not a valid name")
    require_adapters(model, "combine adapters", names)
    mods = [(n, m) for n, m in lora_modules(model) if any(a in m.configs for a in names)]
    pairs = [{a: lora_pair(m, a) for a in names if a in m.configs} for _, m in mods]   # (s * B, A) per layer
    ranks = [next(p[a][1].shape[0] for p in pairs if a in p) for a in names]
    # alpha = rank -> scaling 1; targets = the exact module names, so load_lora rebuilds the same layers
    cfg = LoRAConfig(rank=sum(ranks), alpha=float(sum(ranks)), targets=",".join(n for n, _ in mods))
    for (_, m), pair in zip(mods, pairs):
        dev = m.base.weight.device
        As = [pair[a][1] if a in pair else torch.zeros(r, m.in_features, device=dev)
              for a, r in zip(names, ranks)]
        Bs = [w * pair[a][0] if a in pair
              else torch.zeros(m.out_features, r, device=dev) for a, w, r in zip(names, weights, ranks)]
        m.add_adapter(new_name, cfg, scaling=1.0)
        with torch.no_grad():
            m.lora_A[new_name].copy_(torch.cat(As, dim=0))   # [sum r, in]
            m.lora_B[new_name].copy_(torch.cat(Bs, dim=1))   # [out, sum r]
        m.lora_A[new_name].requires_grad_(False)             # a combination is for inference: frozen
        m.lora_B[new_name].requires_grad_(False)
    activate(model, (new_name,))
    return new_name
