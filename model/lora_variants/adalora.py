"""AdaLoRA: Adaptive Budget Allocation (Zhang et al., 2023, arXiv 2303.10512).

The update is shaped like an SVD, and the rank budget moves to the layers that need it during training:

    ΔW = s · P · diag(λ) · Q       P = lora_B [out, r], Q = lora_A [r, in] ~ N(0, 0.02), λ: [r] init 0
    loss += γ · mean over matrices of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F      (orthogonality penalty, γ = 0.5)

Importance of each triplet (Pᵢ, λᵢ, Qᵢ): per entry I = |θ·∇θ|, smoothed Ī ← β₁Ī + (1−β₁)I and its
uncertainty Ū ← β₂Ū + (1−β₂)|I − Ī|; score = Ī·Ū, averaged over Qᵢ's row and Pᵢ's column, plus λᵢ's.
Budget b(t) (triplets in all layers): r_init·L until t_init, then the cubic
    b(t) = r_target·L + (r_init − r_target)·L·(1 − (t − t_init)/(T − t_final − t_init))³
and every ΔT steps the lowest-scored triplets get λ = 0; after T − t_final the pattern is fixed.
``AdaLoRABudget`` does this as a training hook (the scores from the gradients in after_backward, the
masking after the optimizer step). Trainable: r_init·(in + out + 1) per layer. Merges exactly.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.common import TinyMindError
from model.lora_variants.registry import Variant, adapter_layers, register
from model.train_hook import TrainHook


class AdaLoRALayer(nn.Module):
    uses_ab = True   # P = lora_B, Q = lora_A

    def __init__(self, layer, cfg):
        super().__init__()
        w = layer.base.weight
        self.lora_E = nn.Parameter(torch.zeros(cfg.rank, device=w.device, dtype=w.dtype))   # λ: [r]
        self.register_buffer("rank_mask", torch.ones(cfg.rank, device=w.device, dtype=w.dtype))   # 1 = kept

    def forward(self, layer, name: str, x: torch.Tensor, base_y: torch.Tensor) -> torch.Tensor:
        A, B = layer.lora_A[name], layer.lora_B[name]
        h = layer.lora_dropout[name](x).to(A.dtype)                  # (..., in)
        z = F.linear(h, A) * (self.lora_E * layer.scaling[name])     # (..., r): λ ⊙ Q h, scaled
        return z @ B.t()                                             # (..., out)

    def lora_pair(self, layer, name: str):
        lam = self.lora_E.detach().float() * layer.scaling[name]
        return layer.lora_B[name].detach().float() * lam[None, :], layer.lora_A[name].detach().float()

    def delta_weight(self, layer, name: str) -> torch.Tensor:
        B, A = self.lora_pair(layer, name)
        return B @ A


def setup(model, name):
    """P, Q ~ N(0, 0.02) (λ = 0 keeps the output unchanged); a loaded file overwrites them."""
    with torch.no_grad():
        for _, m in adapter_layers(model, name):
            nn.init.normal_(m.lora_A[name], std=0.02)
            nn.init.normal_(m.lora_B[name], std=0.02)


def orthogonal_penalty(model, name: str) -> torch.Tensor:
    """Mean over all P and Q of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F (PEFT's regulariser)."""
    terms = []
    for _, m in adapter_layers(model, name):
        for mat in (m.lora_A[name], m.lora_B[name].t()):             # Q [r, in], Pᵀ [r, out]
            eye = torch.eye(mat.shape[0], device=mat.device, dtype=mat.dtype)
            terms.append(torch.linalg.matrix_norm(mat @ mat.t() - eye))
    return torch.stack(terms).mean()


class AdaLoRABudget(TrainHook):
    """The training hook: orthogonality penalty, importance scores, budget schedule and masks."""

    def __init__(self, model, name: str, opts: dict):
        self.name, self.o = name, opts
        self.layers = adapter_layers(model, name)
        self.total_steps = 0
        self.init_budget = opts["init_r"] * len(self.layers)
        self.target_budget = opts["target_r"] * len(self.layers)
        self.ema, self.unc = {}, {}     # per parameter: smoothed importance Ī and uncertainty Ū

    def params(self):
        for n, m in self.layers:
            yield f"{n}.A", m.lora_A[self.name]
            yield f"{n}.B", m.lora_B[self.name]
            yield f"{n}.E", m.variants[self.name].lora_E

    def on_train_start(self, model, optimizer, total_steps):
        self.total_steps = total_steps

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets kept in all layers, whether to mask at this step)."""
        t_init, t_final, T = self.o["tinit"], self.o["tfinal"], self.total_steps
        if step <= t_init:
            return self.init_budget, False
        if step > T - t_final:
            return self.target_budget, True
        left = 1 - (step - t_init) / max(1, T - t_final - t_init)
        b = int((self.init_budget - self.target_budget) * left ** 3 + self.target_budget)
        return b, step % self.o["delta_t"] == 0

    def after_backward(self, model, step):
        if self.o["orth_reg"] > 0:      # its gradient joins the loss's: loss + γ·R
            (self.o["orth_reg"] * orthogonal_penalty(model, self.name)).backward()
        if step > self.total_steps - self.o["tfinal"]:
            return
        b1, b2 = self.o["beta1"], self.o["beta2"]
        with torch.no_grad():
            for key, p in self.params():
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs()
                ema = self.ema.get(key, torch.zeros_like(p))
                unc = self.unc.get(key, torch.zeros_like(p))
                self.ema[key] = b1 * ema + (1 - b1) * ipt
                self.unc[key] = b2 * unc + (1 - b2) * (ipt - self.ema[key]).abs()

    def scores(self) -> list[torch.Tensor]:
        """One score per triplet, [r] per layer: λᵢ's + mean over Qᵢ's row + mean over Pᵢ's column."""
        out = []
        for n, _ in self.layers:
            s = {k: self.ema.get(f"{n}.{k}", 0) * self.unc.get(f"{n}.{k}", 0) for k in "ABE"}
            if not torch.is_tensor(s["E"]):
                return []
            out.append(s["E"] + s["A"].mean(dim=1) + s["B"].mean(dim=0))
        return out

    def mask_to(self, budget: int, scores: list[torch.Tensor]) -> None:
        k = self.init_budget - budget
        if k <= 0 or not scores:
            return
        threshold = torch.kthvalue(torch.cat(scores).float(), k).values
        for (_, m), s in zip(self.layers, scores):
            m.variants[self.name].rank_mask.copy_((s > threshold).to(m.variants[self.name].rank_mask.dtype))

    def after_optimizer_step(self, model, optimizer, step):
        T, t_final = self.total_steps, self.o["tfinal"]
        budget, do_mask = self.budget(step)
        if step < T - t_final and do_mask:
            self.mask_to(budget, self.scores())
        elif step == T - t_final:     # the final allocation, kept fixed from now on
            self.mask_to(budget, self.scores())
        elif step < T - t_final:
            return
        with torch.no_grad():
            for _, m in self.layers:
                v = m.variants[self.name]
                v.lora_E.mul_(v.rank_mask)

    def state_dict(self) -> dict:
        """The smoothed scores and each layer's mask (a buffer, so not among the trained tensors a resume keeps)."""
        masks = {n: m.variants[self.name].rank_mask.detach().clone() for n, m in self.layers}
        return {"ema": dict(self.ema), "unc": dict(self.unc), "masks": masks}

    def load_state_dict(self, d: dict) -> None:
        self.ema, self.unc = dict(d["ema"]), dict(d["unc"])
        with torch.no_grad():
            for n, m in self.layers:
                m.variants[self.name].rank_mask.copy_(d["masks"][n])


def hooks(model, name, args):
    opts = adapter_layers(model, name)[0][1].configs[name].options
    return [AdaLoRABudget(model, name, opts)]


def add_args(g):
    g.add_argument("--adalora_init_r", type=int, default=12, help="rank per layer at the start (PEFT: 12)")
    g.add_argument("--adalora_target_r", type=int, default=8, help="average rank per layer at the end (PEFT: 8)")
    g.add_argument("--adalora_tinit", type=int, default=0, help="steps before pruning starts (PEFT: 0)")
    g.add_argument("--adalora_tfinal", type=int, default=0, help="last steps with the final pattern fixed (PEFT: 0)")
    g.add_argument("--adalora_delta_t", type=int, default=1, help="steps between two maskings (PEFT: 1)")
    g.add_argument("--adalora_beta1", type=float, default=0.85, help="smoothing of the importance (paper: 0.85)")
    g.add_argument("--adalora_beta2", type=float, default=0.85, help="smoothing of its uncertainty (paper: 0.85)")
    g.add_argument("--adalora_orth_reg", type=float, default=0.5, help="weight of the orthogonality penalty (PEFT: 0.5)")


def configure(args, cfg):
    if not 1 <= args.adalora_target_r <= args.adalora_init_r:
        raise TinyMindError("AdaLoRA needs 1 <= --adalora_target_r <= --adalora_init_r")
    if args.adalora_delta_t < 1 or min(args.adalora_tinit, args.adalora_tfinal) < 0 or args.adalora_orth_reg < 0:
        raise TinyMindError("AdaLoRA: --adalora_delta_t >= 1, --adalora_tinit/--adalora_tfinal/--adalora_orth_reg >= 0")
    opts = {"init_r": args.adalora_init_r, "target_r": args.adalora_target_r, "tinit": args.adalora_tinit,
            "tfinal": args.adalora_tfinal, "delta_t": args.adalora_delta_t, "beta1": args.adalora_beta1,
            "beta2": args.adalora_beta2, "orth_reg": args.adalora_orth_reg}
    return replace(cfg, rank=args.adalora_init_r, options=opts)


register(Variant("adalora", paper="2303.10512", layer=AdaLoRALayer, add_args=add_args, configure=configure,
                 setup=setup, hooks=hooks,
                 summary="ΔW = s·P·diag(λ)·Q, a rank budget moved between layers by importance while training"))
