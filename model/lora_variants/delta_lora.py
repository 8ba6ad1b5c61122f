"""Delta-LoRA (arXiv 2309.02411): the frozen W also moves, by the change of the adapter's product.

    y = W x + s * B (A x)       (model/model_lora.py; W [out, in], A [r, in], B [out, r], s = alpha / r)

After every optimizer step t past the start step K (steps 1..K are plain LoRA):

    W <- W + lambda * s * (B_{t+1} A_{t+1} - B_t A_t)

W gets no gradient and no optimizer state, so memory stays LoRA's while W changes in full rank. LoRA dropout
must be 0 (the paper removes it: only then is B A's gradient the one W would get). Summed over the steps
the updates telescope: W_T - W_K = lambda * s * (B_T A_T - B_K A_K). lambda = 0 is plain LoRA, bit for bit.
Flags: ``--delta_lora_update_ratio`` (lambda) and ``--delta_lora_start_step`` (K); the defaults, lambda = 2
and K = 500, are the paper's; TinyMind's short CPU runs need a much smaller K to see W move.

Because W itself changes, every save writes the new base as a full checkpoint,
``{save_dir}/{lora_name}_delta_base_{hidden}.pth``, beside the adapter; the adapter's fingerprint is the one
of that new base, and its options name it (``base_weight``), so it loads (and merges exactly) on that base:
    python eval_llm.py --weight lora_identity_delta_base --lora_weight lora_identity
What this file implements: ``DeltaLoRAHook`` (the loop's ``after_optimizer_step``), ``save_delta_base``, the
resume rule (``prepare``: a resumed run starts from the saved new base) and the registration.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from model.common import TinyMindError, safe_load
from model.lora_variants.registry import Variant, register
from model.model import save_model, unwrap_model
from model.model_lora import base_state_dict, lora_modules
from model.train_hook import TrainHook


def _trained(model: nn.Module):
    """(module name, layer, adapter name) of every adapter that trains, in module order."""
    return [(n, m, a) for n, m in lora_modules(model) for a in m.lora_B if m.lora_B[a].requires_grad]


class DeltaLoRAHook(TrainHook):
    """W <- W + lambda * s * (B_{t+1} A_{t+1} - B_t A_t) after each optimizer step t + 1 > ``start_step``.

    Keeps each trained (B, A) of the previous step in fp32: r * (in + out) numbers per layer, like LoRA.
    """

    def __init__(self, update_ratio: float = 2.0, start_step: int = 500, log=print):
        self.ratio, self.start, self.log = float(update_ratio), int(start_step), log
        self.prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # module name -> (B_t, A_t)

    def on_train_start(self, model: nn.Module, optimizer, total_steps: int):
        for _, m, a in _trained(model):
            if m.configs[a].dropout > 0:
                raise TinyMindError("Delta-LoRA needs --lora_dropout 0 (with dropout, B A's gradient is not W's)")
        # a resumed run has restored B and A already: the snapshot is then B_t A_t at the resume step
        self.prev = {n: (m.lora_B[a].detach().float().clone(), m.lora_A[a].detach().float().clone())
                     for n, m, a in _trained(model)}
        if self.start >= total_steps:
            self.log(f"Delta-LoRA: start step {self.start} >= {total_steps} steps, so W stays as it is "
                     "in this run (lower --delta_lora_start_step)")

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module, optimizer, step: int):
        for n, m, a in _trained(model):
            B, A = m.lora_B[a].detach().float(), m.lora_A[a].detach().float()
            if step > self.start and self.ratio != 0.0:
                B0, A0 = self.prev[n]
                w = m.base.weight
                delta = (self.ratio * m.scaling[a]) * (B @ A - B0 @ A0)    # [out, in], fp32
                w.copy_((w.float() + delta).to(w.dtype))                   # summed in fp32, cast once
            self.prev[n] = (B.clone(), A.clone())


def _base_path(weights_path, model, name):
    """{save_dir}/{lora_name}_delta_base_{hidden}.pth, beside the adapter."""
    core = unwrap_model(model)
    cfg = next(m.configs[name] for _, m in lora_modules(core) if name in m.configs)
    return weights_path.with_name(f"{cfg.options['base_weight']}_{core.config.hidden_size}.pth")


def save_delta_base(model: nn.Module, name: str, args, weights_path):
    """``save_extra``: the changed base W, a full model checkpoint (the adapter file only fits this base)."""
    core = unwrap_model(model)
    path = _base_path(weights_path, core, name)
    return save_model(core, path, state_dict=base_state_dict(core), stage="delta_lora",
                      weight=path.stem.rsplit("_", 1)[0], lora_name=name)


def prepare(model: nn.Module, name: str, setup):
    """Say where the new base goes; on --from_resume 1 go on from the one saved with the resume file.
    ``setup.files`` are the run's files (the adapter's ``weights``, the ``resume`` file)."""
    args, files = setup.args, setup.files
    core = unwrap_model(model)
    base = _base_path(files.weights, core, name)
    setup.ctx.log(f"Delta-LoRA changes W too: every save writes the new base {base.name} (a full checkpoint) "
                  f"beside {files.weights.name}, which only fits that base (--weight {base.stem.rsplit('_', 1)[0]})")
    if not (getattr(args, "from_resume", 0) and files.resume.exists() and base.exists()):
        return
    saved = safe_load(base, "Delta-LoRA base checkpoint").get("model", {})
    target = base_state_dict(core)            # these tensors share storage with the model's weights
    if set(saved) != set(target):
        raise TinyMindError(f"{base} does not fit this model; delete it or rerun with --from_resume 0")
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(saved[k])
    setup.ctx.log(f"Delta-LoRA: resuming on the changed base {base.name}")


def add_args(group):
    group.add_argument("--delta_lora_update_ratio", type=float, default=2.0,
                       help="Delta-LoRA: lambda, W moves by lambda * s * (change of B A) each step (paper: 2)")
    group.add_argument("--delta_lora_start_step", type=int, default=500,
                       help="Delta-LoRA: K, plain LoRA for the first K steps, then W follows (paper: 500)")


def configure(args, cfg):
    if cfg.dropout > 0:
        raise TinyMindError("--lora_variant delta_lora needs --lora_dropout 0 (the paper removes dropout)")
    if args.delta_lora_start_step < 0:
        raise TinyMindError(f"--delta_lora_start_step cannot be negative (got {args.delta_lora_start_step})")
    return replace(cfg, options={"update_ratio": args.delta_lora_update_ratio,
                                 "start_step": args.delta_lora_start_step,
                                 "base_weight": f"{args.lora_name}_delta_base"})


register(Variant("delta_lora", paper="2309.02411",
                 summary="after each step W += lambda * s * (B_new A_new - B_old A_old); saves the new W too",
                 add_args=add_args, configure=configure, prepare=prepare, save_extra=save_delta_base,
                 hooks=lambda model, name, args: [DeltaLoRAHook(args.delta_lora_update_ratio,
                                                                args.delta_lora_start_step)]))
