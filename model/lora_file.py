"""What a TinyMind LoRA file holds, and the checks a file passes before it touches a model.

A LoRA file is one dict, written by ``model/model_lora.py::save_lora`` (atomically) and read back with
``torch.load(weights_only=True)``:

    {"format": "tinymind-lora", "lora_name": str, **extra (step=, from_weight=, ...),
     "lora_config": LoRAConfig.to_dict(),
     "base_config": the base model's TinyMindConfig.to_dict(),
     "base_fingerprint": 16 hex digits of the unmerged base weights (model/model.py::state_fingerprint),
     "trained_over": [{"name", "fingerprint"} of every other adapter that was active: it needs them],
     "adapter": {"model.layers.0.self_attn.q_proj.lora_A": [r, in], "...q_proj.lora_B": [out, r], ...}}

What this file implements (the layers themselves stay in model/model_lora.py, which calls these):
- ``layer_tensors``: one layer's tensors of one adapter, under the keys the file gives them.
- ``lora_file``: the dict above, from its parts.
- ``read_lora_file``: load a file and check its format and fields.
- ``check_base_config`` / ``check_base_weights``: refuse a file made for another base model, by config
  (runtime-only keys aside) or, with the same config, by the fingerprint of the weights.
- ``check_companions``: an adapter trained on top of others loads only while they are active.

It imports nothing of model_lora: the layer, fingerprints and configs it looks at are passed in.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.common import TinyMindError, safe_load

LORA_FORMAT = "tinymind-lora"
RUNTIME_ONLY_KEYS = ("dropout", "flash_attn")   # base-config keys that do not change the weights: not compared


def layer_tensors(layer, name: str) -> dict[str, torch.Tensor]:
    """One LoRA layer's tensors of adapter ``name``, by the key they have in a file after the module's name:
    "lora_A" [r, in], "lora_B" [out, r], and a variant's own (DoRA: "magnitude" [out]; VeRA: "vera_b" [out],
    "vera_d" [r]; ...)."""
    out = {}
    if name in layer.lora_A:
        out["lora_A"] = layer.lora_A[name].detach()
        out["lora_B"] = layer.lora_B[name].detach()
    if name in layer.variants:
        out.update({k: t.detach() for k, t in layer.variants[name].state_dict().items()})
    return out


def lora_file(lora_name: str, extra: dict, lora_config: dict, base_config: dict, base_fingerprint: str,
              trained_over: list[dict], adapter: dict[str, torch.Tensor]) -> dict:
    """The dict a LoRA file holds (see the top of this file). The fixed keys come after ``extra``, so
    extra metadata (step=, from_weight=) can never replace them; tensors are copied to the CPU."""
    return {"format": LORA_FORMAT, "lora_name": lora_name, **extra,
            "lora_config": lora_config,
            "base_config": base_config,
            "base_fingerprint": base_fingerprint,
            "trained_over": trained_over,
            "adapter": {k: t.cpu().clone() for k, t in adapter.items()}}


def read_lora_file(path: Path) -> dict:
    """The dict stored in ``path``, refused with one line if it is no LoRA file or lacks a field."""
    obj = safe_load(path, "LoRA file")
    if obj.get("format") != LORA_FORMAT:
        hint = " (it is a full model checkpoint: pass it as --weight)" if obj.get("format") == "tinymind-model" else ""
        raise TinyMindError(f"{path} is not a TinyMind LoRA file (format {obj.get('format')!r}){hint}")
    bad = [k for k, t in (("lora_config", dict), ("base_config", dict), ("base_fingerprint", str), ("adapter", dict))
           if not isinstance(obj.get(k), t)]
    if bad:
        raise TinyMindError(f"{path}: LoRA file lacks (or has a malformed) {', '.join(bad)}")
    return obj


def check_base_config(obj: dict, mine: dict, path: Path):
    """Refuse a file whose base model had another config than ``mine`` (runtime-only keys aside)."""
    theirs = obj["base_config"]
    diff = [k for k in sorted(set(mine) | set(theirs)) if k not in RUNTIME_ONLY_KEYS and mine.get(k) != theirs.get(k)]
    if diff:
        what = ", ".join(f"{k} {theirs.get(k)!r} vs {mine.get(k)!r}" for k in diff[:4])
        raise TinyMindError(f"{path} was made for another base model (file vs model: {what}); force=True loads it anyway")


def check_base_weights(obj: dict, fingerprint: str, path: Path):
    """Refuse a file trained on other base weights: same config, another checkpoint (``fingerprint``)."""
    if fingerprint != obj["base_fingerprint"]:
        needs = (obj["lora_config"].get("options") or {}).get("base_weight")   # Delta-LoRA changed W as well
        hint = f"; it belongs on the base it wrote beside it: --weight {needs}" if isinstance(needs, str) else ""
        raise TinyMindError(f"{path} was trained on other base weights (fingerprint {obj['base_fingerprint']} vs "
                            f"{fingerprint}: same config, another checkpoint){hint}; force=True loads it anyway")


def check_companions(obj: dict, active: dict[str, str], path: Path):
    """An adapter trained on top of others only works with them: each must be loaded and active.
    ``active``: fingerprint -> name of every active adapter."""
    for other in obj.get("trained_over") or ():
        if other.get("fingerprint") not in active:
            raise TinyMindError(f"{path} was trained on top of adapter {other.get('name')!r} (fingerprint "
                                f"{other.get('fingerprint')}), which is not active; load that file first")
