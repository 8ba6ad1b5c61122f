"""LoRA-drop (arXiv 2402.07721): keep LoRA only where its output matters; the other layers share one pair.

    y = W x + s * B (A x)       (model/model_lora.py; Delta W_i = s * B_i A_i for wrapped layer i)

Stage 1 (``lora_drop_stage1``, run by ``prepare`` before the loop): train the LoRA briefly on a random sample
of the training data, then score each layer by the size of its output on that sample,

    g_i = sum over the sample's real tokens x_i of ||Delta W_i x_i||^2           (``lora_output_scores``)

sort the layers by g_i and keep the fewest whose scores reach ``threshold`` (0.9) of the total
(``select_layers``); every other layer uses one shared (A, B) per weight shape (``share_lora``: the same
Parameter objects, since q_proj, k_proj and gate_proj differ in shape and cannot share one). The adapter is
then reset to LoRA's init and stage 2 is the loop's ordinary training on all the data. Stage 1 runs before
the optimizer and the DDP wrapper exist, because sharing replaces Parameters that those would hold.

The file stays a plain LoRA file (each layer's own copy of its A, B, so merge works layer by layer), and its
options list the kept and shared layers; ``setup`` shares them again when the file is loaded.
What this file implements: the four steps above, ``reset_adapter`` and the registration.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.common import TinyMindError
from model.lora_variants.registry import Variant, register
from model.model import unwrap_model
from model.model_lora import lora_modules


@torch.no_grad()
def lora_output_scores(model: nn.Module, batches, adapter_name: str) -> dict[str, float]:
    """g_i for each layer holding ``adapter_name``; batches: (input_ids [b, T], mask [b, T], 1 = real token).

    Delta W_i x_i = s * B (A x) is recomputed from the layer's input in eval mode (no dropout).
    """
    core = unwrap_model(model)
    layers = [(n, m) for n, m in lora_modules(core) if adapter_name in m.lora_A]
    scores = {n: 0.0 for n, _ in layers}
    mask_now = [None]

    def make_hook(name):
        def hook(mod, inputs, output):
            A, B = mod.lora_A[adapter_name], mod.lora_B[adapter_name]
            dx = F.linear(F.linear(inputs[0].to(A.dtype), A), B) * mod.scaling[adapter_name]   # (b, T, out)
            sq = dx.float().pow(2).sum(-1)                                                      # (b, T)
            scores[name] += float((sq * mask_now[0].to(sq)).sum())
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in layers]
    was_training = core.training
    core.eval()
    try:
        for input_ids, mask in batches:
            mask_now[0] = mask
            core(input_ids)
    finally:
        for h in handles:
            h.remove()
        core.train(was_training)
    return scores


def select_layers(scores: dict[str, float], threshold: float = 0.9) -> list[str]:
    """The fewest layers, highest score first, whose scores sum to >= threshold * total.

    Ties keep module order (a stable sort). All scores 0 (nothing learned): every layer is kept.
    """
    if not 0.0 < threshold <= 1.0:
        raise TinyMindError(f"--lora_drop_threshold must be in (0, 1] (got {threshold})")
    total = sum(scores.values())
    if total <= 0:
        return list(scores)
    kept, acc = [], 0.0
    for name in sorted(scores, key=lambda n: -scores[n]):
        kept.append(name)
        acc += scores[name]
        if acc >= threshold * total:
            break
    return kept


def share_lora(model: nn.Module, adapter_name: str, keep) -> dict[str, list[str]]:
    """Every layer not in ``keep`` uses one shared (A, B) per weight shape; returns {owner: [users]}.

    The shared pair is the first dropped layer's own Parameters, so no tensor is made and an optimizer
    built afterwards sees each one once (``parameters()`` lists a shared tensor once).
    """
    keep = set(keep)
    owners: dict[tuple[int, int], tuple[str, nn.Module]] = {}
    groups: dict[str, list[str]] = {}
    for name, m in lora_modules(model):
        if adapter_name not in m.lora_A or name in keep:
            continue
        shape = (m.out_features, m.in_features)
        if shape not in owners:
            owners[shape] = (name, m)
            groups[name] = []
            continue
        owner_name, owner = owners[shape]
        m.lora_A[adapter_name] = owner.lora_A[adapter_name]     # the same nn.Parameter object
        m.lora_B[adapter_name] = owner.lora_B[adapter_name]
        groups[owner_name].append(name)
    return groups


@torch.no_grad()
def reset_adapter(model: nn.Module, adapter_name: str):
    """Back to LoRA's init (A kaiming-uniform, B = 0): stage 2 starts from the base model's output."""
    seen = set()
    for _, m in lora_modules(model):
        if adapter_name in m.lora_A and id(m.lora_A[adapter_name]) not in seen:
            seen.add(id(m.lora_A[adapter_name]))
            nn.init.kaiming_uniform_(m.lora_A[adapter_name], a=math.sqrt(5))
            m.lora_B[adapter_name].zero_()


def lora_drop_stage1(model: nn.Module, adapter_name: str, train_set, collate_fn, ctx, *, sample_ratio: float,
                     steps: int, batch_size: int, lr: float, threshold: float, seed: int) -> dict:
    """Short training on a sample (``steps`` AdamW steps, 0 = one pass), scores, selection, sharing, reset.

    Returns dict(scores, kept, shared, trainable); the selection is also written into the adapter's options.
    """
    if not 0.0 < sample_ratio <= 1.0:
        raise TinyMindError(f"--lora_drop_sample_ratio must be in (0, 1] (got {sample_ratio})")
    core = unwrap_model(model).to(ctx.device)
    n_sample = min(len(train_set), max(batch_size, round(sample_ratio * len(train_set))))
    sample = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:n_sample].tolist()
    chunks = [sample[i:i + batch_size] for i in range(0, n_sample, batch_size)]
    steps = steps if steps > 0 else len(chunks)
    params = [p for p in core.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    # fp16 on CUDA needs loss scaling; a scaler of its own leaves the loop's untouched
    scaler = torch.amp.GradScaler(ctx.device.type) if getattr(ctx, "scaler", None) is not None else None
    core.train()
    for step in range(steps):
        input_ids, labels = collate_fn([train_set[i] for i in chunks[step % len(chunks)]])[:2]
        with ctx.autocast():
            loss = core(input_ids.to(ctx.device), labels=labels.to(ctx.device)).loss
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    batches = []
    for c in chunks:
        input_ids, _, mask = collate_fn([train_set[i] for i in c])
        batches.append((input_ids.to(ctx.device), mask.to(ctx.device)))
    with ctx.autocast():
        scores = lora_output_scores(core, batches, adapter_name)
    kept = select_layers(scores, threshold)
    if getattr(ctx, "ddp", False):   # every rank must share the same layers: rank 0's choice wins
        import torch.distributed as dist

        box = [kept]
        dist.broadcast_object_list(box, src=0)
        kept = box[0]
    shared = share_lora(core, adapter_name, kept)
    reset_adapter(core, adapter_name)
    cfg = next(m.configs[adapter_name] for _, m in lora_modules(core) if adapter_name in m.configs)
    cfg.options.update(kept_layers=kept, shared_layers=shared)   # the file says which layers were kept
    trainable = sum(p.numel() for p in core.parameters() if p.requires_grad)
    ctx.log(f"LoRA-drop: {steps} steps on {n_sample} samples, then kept {len(kept)} of {len(scores)} layers "
            f"({100 * threshold:g}% of the LoRA output); the other {len(scores) - len(kept)} share "
            f"{len(shared)} pair(s); trainable parameters now {trainable:,}")
    return dict(scores=scores, kept=kept, shared=shared, trainable=trainable)


def setup(model: nn.Module, name: str):
    """When a LoRA-drop file is loaded, its shared layers share their Parameters again."""
    core = unwrap_model(model)
    cfg = next(m.configs[name] for _, m in lora_modules(core) if name in m.configs)
    shared = cfg.options.get("shared_layers") or {}
    if shared:
        share_lora(core, name, set(cfg.options.get("kept_layers") or ()))


def prepare(model: nn.Module, name: str, ts):
    """Stage 1 before the loop (``ts``: the registry's TrainSetup with the data, device and flags)."""
    a = ts.args
    lora_drop_stage1(model, name, ts.train_set, ts.collate_fn, ts.ctx, sample_ratio=a.lora_drop_sample_ratio,
                     steps=a.lora_drop_steps, batch_size=a.batch_size, lr=a.learning_rate,
                     threshold=a.lora_drop_threshold, seed=a.seed)


def add_args(group):
    group.add_argument("--lora_drop_threshold", type=float, default=0.9,
                       help="LoRA-drop: keep the fewest layers holding this share of the LoRA output (paper: 0.9)")
    group.add_argument("--lora_drop_sample_ratio", type=float, default=0.1,
                       help="LoRA-drop: fraction of the training data that stage 1 trains and scores on")
    group.add_argument("--lora_drop_steps", type=int, default=0,
                       help="LoRA-drop: optimizer steps of stage 1 (0 = one pass over the sample)")


def configure(args, cfg):
    select_layers({}, args.lora_drop_threshold)   # checks the flags before anything runs
    if not 0.0 < args.lora_drop_sample_ratio <= 1.0 or args.lora_drop_steps < 0:
        raise TinyMindError("--lora_drop_sample_ratio must be in (0, 1] and --lora_drop_steps >= 0")
    return replace(cfg, options={"threshold": args.lora_drop_threshold,
                                 "sample_ratio": args.lora_drop_sample_ratio, "steps": args.lora_drop_steps})


register(Variant("lora_drop", paper="2402.07721",
                 summary="score layers by ||Delta W x||^2 on a sample; keep the top ones, the rest share one pair",
                 add_args=add_args, configure=configure, setup=setup, prepare=prepare))
