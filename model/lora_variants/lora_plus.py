"""LoRA+ (arXiv 2402.12354): B learns ``ratio`` times faster than A; nothing else changes.

    y = W x + s * B (A x)       (model/model_lora.py; W [out, in], A [r, in], B [out, r], s = alpha / r)
    lr(B) = ratio * lr(A)       the paper's ratio: 16

Why: B starts at 0 and A at random, and with one lr for both, the update of B A is dominated by one of
them as the width grows; the paper shows a larger lr on B makes feature learning efficient. Only the
optimizer differs, so a LoRA+ file is a plain LoRA file (its config says ``variant: lora_plus``) and merges
exactly. What this file implements: ``make_loraplus_optimizer`` (the loop's ``make_optimizer``: AdamW
groups with ``lr_scale``; every A and B gets the learning rate PEFT's ``create_loraplus_optimizer`` gives it,
except an embedding's A and B, which PEFT puts in a group of their own at ``loraplus_lr_embedding``) and the
registration.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from model.common import TinyMindError
from model.lora_variants.registry import Variant, register

BETAS = (0.9, 0.95)   # the loop's default AdamW betas: LoRA+ changes the learning rates only


def make_loraplus_optimizer(ratio: float = 16.0, betas=BETAS):
    """A ``make_optimizer(model, lr, weight_decay)`` for the loop: AdamW in (up to) three groups.

        A and other matrices:   lr,          weight_decay,  lr_scale 1
        B:                      ratio * lr,  weight_decay,  lr_scale ratio
        trainable vectors:      ratio * lr,  no decay,      lr_scale ratio   (DoRA's magnitude; as PEFT)

    The loop sets each group's lr to schedule_lr * lr_scale, so warmup and cosine move both together and the
    ratio holds at every step. Vectors never decay (TinyMind's rule for 1-D tensors; PEFT decays them).
    """
    if not ratio > 0:
        raise TinyMindError(f"--loraplus_lr_ratio must be positive (got {ratio})")

    def make(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
        a_group, b_group, vectors = [], [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2:
                vectors.append(p)
            elif ".lora_B." in name:
                b_group.append(p)
            else:
                a_group.append(p)
        if not (a_group or b_group or vectors):
            raise TinyMindError("the model has no trainable parameters")
        groups = [dict(params=a_group, lr=lr, lr_scale=1.0, weight_decay=weight_decay),
                  dict(params=b_group, lr=lr * ratio, lr_scale=float(ratio), weight_decay=weight_decay),
                  dict(params=vectors, lr=lr * ratio, lr_scale=float(ratio), weight_decay=0.0)]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)

    return make


def add_args(group):
    group.add_argument("--loraplus_lr_ratio", type=float, default=16.0,
                       help="LoRA+: learning rate of B / learning rate of A (the paper's 16)")


def configure(args, cfg):
    make_loraplus_optimizer(args.loraplus_lr_ratio)   # checks the ratio before anything is written
    return replace(cfg, options={"loraplus_lr_ratio": args.loraplus_lr_ratio})


register(Variant("lora_plus", paper="2402.12354", summary="B's learning rate = loraplus_lr_ratio x A's",
                 add_args=add_args, configure=configure, supports_embedding=True,
                 make_optimizer=lambda args: make_loraplus_optimizer(args.loraplus_lr_ratio)))
