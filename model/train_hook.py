"""The extension point of the training loop: ``TrainHook``.

It lives in the model layer because the LoRA variants (model/lora_variants/) implement it:
a variant that must act during training (AdaLoRA's rank budget, Delta-LoRA's base update, LoRA-FA's
frozen A, LoRA-Pro's gradient correction) is a hook, and ``trainer/train_loop.py`` calls every hook
at the moments named below. The model layer never imports the trainer.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class TrainHook:
    """Called by ``train_loop`` at fixed moments; override the ones you need (each default does nothing).

    ``model`` is always the unwrapped model (not the compiled or DDP wrapper); ``step`` counts
    optimizer steps from 1. Hooks run on every rank, so under DDP they must do the same on each.
    """

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        """Before the first step (also after a resume)."""

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Every micro-batch of step ``step`` is backpropagated; the gradients are unscaled and not yet
        clipped; ``optimizer.step()`` comes next."""

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """The weights have been updated by step ``step``; the gradients are still there (zeroed next)."""

    def at_validation(self, model: nn.Module, step: int, val_loss: float | None) -> None:
        """Right after a validation pass (model in eval mode is restored to train mode by the loop)."""

    def state_dict(self) -> dict:
        """What the hook must remember across ``--from_resume 1`` (tensors, numbers, strings)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
