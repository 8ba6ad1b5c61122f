"""The optimizers behind ``--optimizer``: AdamW for every weight, or Muon for the hidden matrices.

Implements:
- ``adamw``: AdamW with weight decay on matrices only (the default optimizer of every run).
- ``Muon``: ``torch.optim.Muon`` with its Newton–Schulz iteration in float32 on the CPU.
- ``hidden_matrices``: which parameters Muon trains.
- ``MuonWithAdamW``: Muon on those, AdamW on the rest, driven by the loop as one optimizer.
- ``OPTIMIZERS``: the ``--optimizer`` choices and the function that builds each.

What Muon does (Keller Jordan, 2024; the modded-nanogpt speedrun and nanochat train with it), for one
weight matrix W (out, in) and its gradient G, at learning rate lr:

1. momentum: M <- 0.95 M + 0.05 G, an average of the recent gradients; with Nesterov the update looks
   ahead along it, U = 0.05 G + 0.95 M.
2. orthogonalise: replace U = P S Q^T (its SVD) by O = P Q^T, every singular value set to 1. No SVD is
   computed: five Newton–Schulz iterations X <- a X + (b A + c A^2) X with A = X X^T, started from
   X = U / ||U||, push every singular value towards 1 with nothing but matrix products (the quintic's
   coefficients are tuned for speed: the values land roughly in [0.7, 1.2], which trains as well).
3. step: W <- W (1 - lr * weight_decay) - lr * 0.2 * sqrt(max(out, in)) * O. The entries of O have an
   RMS of about 1 / sqrt(max(out, in)), so the factor makes the step's RMS about 0.2 lr, the size of
   an AdamW step (Moonshot's "match_rms_adamw", arXiv 2502.16982): the same --learning_rate and
   --weight_decay serve both optimizers.

Why it suits the hidden matrices (attention q/k/v/o, MLP gate/up/down): the gradient of such a matrix
is dominated by a few directions (it is nearly low-rank), and an AdamW step, scaled entry by entry,
stays dominated by them. The orthogonalised step moves every direction by the same amount, so the
rare directions learn too; and as a map from one hidden vector to another it changes any input's
output by at most the step size (spectral norm 1), a natural bound for a layer between two hidden
states.

Why the rest stays on AdamW: the token embedding (tied to the LM head here) is a table of independent
rows, one per token; a batch touches only the rows of its tokens, and orthogonalising would spread
the step over rows of tokens the batch never saw. RMSNorm gains are vectors, for which the method is
not defined. LoRA's A and B are two factors of one update; orthogonalising each is not Muon on their
product, so LoRA training keeps AdamW (trainer/train_lora.py refuses --optimizer muon).

Why float32 on the CPU: torch.optim.Muon iterates in bfloat16, fast on a GPU; a CPU without bfloat16
instructions (AVX2) multiplies bfloat16 matrices about 27x slower than float32 (58 ms instead of
2.1 ms for one iteration on a 192 x 512 matrix), which made one optimizer step of the ``tiny`` preset
take 6 s. On CUDA ``Muon`` computes exactly what torch.optim.Muon does (tests/test_optim.py checks it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from model.common import TinyMindError

ADAMW_BETAS = (0.9, 0.95)  # the usual pair for GPT-style pretraining
MUON_MOMENTUM = 0.95  # torch's, nanochat's and the speedrun's


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float, betas=ADAMW_BETAS) -> torch.optim.AdamW:
    """AdamW over ``params``. Matrices (embeddings, linear weights, LoRA A/B) decay; vectors (RMSNorm
    gains) do not: shrinking a norm gain towards 0 only hurts."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel updates every tensor (same AdamW math); on a 2-core CPU the step of `small` takes
    # 41 ms instead of 138 ms (the default for-loop; foreach: 150 ms), ~2.5% of a training step
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=fused or None)


def orthogonalize(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Newton–Schulz: ``update`` (out, in) with its singular values pushed towards 1, computed in
    ``dtype`` (torch.optim.Muon's iteration, with the dtype left open)."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # Frobenius norm >= spectral norm: every singular value now <= 1
    for _ in range(steps):
        gram = x @ x.T  # (rows, rows)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    return x.T if tall else x


def rms_factor(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """What multiplies the learning rate of a matrix of ``shape`` (torch.optim.Muon's two rules)."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))  # "original" (Keller Jordan's)


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same arguments, groups and state), iterating Newton–Schulz in ``ns_dtype``:
    by default bfloat16 on CUDA, as torch does, and float32 elsewhere (see the module docstring)."""

    def __init__(self, params, ns_dtype: torch.dtype | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)  # 1. M <- momentum M + (1 - momentum) G
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                dtype = self.ns_dtype or (torch.bfloat16 if p.device.type == "cuda" else torch.float32)
                ortho = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                      dtype)  # 2.
                p.mul_(1 - lr * group["weight_decay"])  # 3. decoupled weight decay, then the step
                p.add_(ortho, alpha=-lr * rms_factor(p.shape, group["adjust_lr_fn"]))
        return loss


def hidden_matrices(model: nn.Module) -> set[str]:
    """Names of the trainable parameters Muon trains: the 2-D weights inside the transformer blocks
    (``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``model.layers.{i}.mlp.{gate,up,down}_proj.weight``).
    Everything else (the embedding, tied to the LM head; the norms) goes to AdamW."""
    return {n for n, p in model.named_parameters()
            if p.requires_grad and p.ndim == 2 and n.startswith("model.layers.")}


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest, used by the loop as one optimizer.

    ``param_groups`` lists AdamW's groups and then Muon's (the same dicts, so the loop's lr schedule,
    ``lr_scale`` included, and the fp16 GradScaler reach every parameter); ``state_dict`` holds both
    optimizers' states, so a resumed run continues exactly."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon = muon
        self.adamw = adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups + self.muon.param_groups

    def step(self, closure=None):
        loss = self.adamw.step(closure)
        self.muon.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"adamw", "muon"}:
            raise TinyMindError("the saved optimizer state is not Muon + AdamW (--optimizer muon)")
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


def muon_with_adamw(model: nn.Module, lr: float, weight_decay: float, betas=ADAMW_BETAS) -> MuonWithAdamW:
    """``MuonWithAdamW`` over the trainable parameters: Muon on ``hidden_matrices``, AdamW (``adamw``)
    on the others, both at ``lr`` and ``weight_decay`` (Muon's step scaled to AdamW's size)."""
    names = hidden_matrices(model)
    if not names:
        raise TinyMindError("--optimizer muon: the model has no trainable hidden matrices "
                            "(Muon trains the attention and MLP weights of full training)")
    hidden = [p for n, p in model.named_parameters() if n in names]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and n not in names]
    muon = Muon(hidden, lr=lr, weight_decay=weight_decay, momentum=MUON_MOMENTUM, nesterov=True,
                adjust_lr_fn="match_rms_adamw")
    return MuonWithAdamW(muon, adamw(rest, lr, weight_decay, betas))


def _adamw_all(model: nn.Module, lr: float, weight_decay: float, betas=ADAMW_BETAS) -> torch.optim.AdamW:
    return adamw([p for p in model.parameters() if p.requires_grad], lr, weight_decay, betas)


# --optimizer NAME -> (model, lr, weight_decay, betas) -> optimizer over the model's trainable parameters
OPTIMIZERS = {"adamw": _adamw_all, "muon": muon_with_adamw}
