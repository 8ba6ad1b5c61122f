"""The frozen base of a LoRA run held in bf16 (or fp16 on a GPU) while the adapters stay fp32.

LoRA never updates W, so W needs no fp32 master copy: under bf16 autocast every product casts W to bf16
at every use anyway. Holding the base in bf16 halves its memory (a 135M model: 540 -> 270 MB) and saves
those casts; the adapters A and B keep fp32, the dtype their optimizer updates them in. What runs then:

    base path   y = x W^T                   bf16 x bf16, as under autocast
    LoRA path   z = s (x A^T), z B^T        x cast to A's dtype (fp32; under autocast bf16 again)
    norms       in fp32 (model/model.py::RMSNorm), weights kept fp32 (a few thousand numbers)

The rounding. The adapter learns against bf16(W), not W: its outputs differ from an fp32 base's by
W's rounding error (relative 2^-9 per weight at most), the error any bf16 inference of that base makes.
The LoRA file still belongs to the original base: its fingerprint is of the weights as loaded (recorded
before the cast), it loads onto the fp32 base and merges there in fp32 (model/model_lora.py::LoRALinear.merge).
tests/test_grad_memory.py checks that the adapter's gradients on the bf16 base match the fp32 base's
within bf16 tolerance, and that the trained file loads onto the fp32 base.

What this file implements:
- ``base_dtype``: the rule behind train_lora.py's ``--base_dtype`` (auto: fp32 for small bases such as the
  demo's, else the dtype the run computes in).
- ``hold_frozen_base``: cast the frozen matrices (linear layers, embedding, tied head) of a LoRA model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from model.common import DTYPES, TinyMindError
from model.model import unwrap_model
from model.model_lora import base_fingerprint

# --base_dtype auto holds bases of this many parameters or more in the run's compute dtype; smaller ones
# (TinyMind's demo and the `small` preset) stay fp32, so their numbers are those of an fp32 base.
AUTO_MIN_PARAMS = 100_000_000


def base_dtype(flag: str, compute_dtype: torch.dtype, n_params: int, device: torch.device) -> torch.dtype:
    """The dtype to hold the frozen base in, for ``--base_dtype`` ``flag`` (auto, float32, bfloat16,
    float16). auto: ``compute_dtype`` (the autocast dtype, float32 where the run does not autocast) for a
    base of at least ``AUTO_MIN_PARAMS`` parameters, fp32 below."""
    if flag == "auto":
        return compute_dtype if n_params >= AUTO_MIN_PARAMS else torch.float32
    if flag not in DTYPES:
        raise TinyMindError(f"--base_dtype {flag}: expected auto, {', '.join(DTYPES)}")
    if flag == "float16" and device.type != "cuda":
        raise TinyMindError("--base_dtype float16 needs a GPU; on a CPU use bfloat16 or float32")
    return DTYPES[flag]


def hold_frozen_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen linear and embedding matrix of ``model`` to ``dtype`` in place (a tied head
    shares the embedding's tensor and is cast with it); trainable tensors and norms keep their dtype.
    Records the fingerprint of the base as loaded first, so the LoRA file names the original base.
    Returns the bytes the cast saved."""
    core = unwrap_model(model)
    if dtype == torch.float32:
        return 0
    if getattr(core, "lora_base_fingerprint", None) is None:
        core.lora_base_fingerprint = base_fingerprint(core)
    saved, seen = 0, set()
    for module in core.modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        w = module.weight
        if w.requires_grad or id(w) in seen or w.dtype == dtype:
            continue
        seen.add(id(w))
        saved += w.numel() * (w.element_size() - torch.empty((), dtype=dtype).element_size())
        w.data = w.data.to(dtype)   # the same Parameter object: a tied head follows the embedding
    return saved
