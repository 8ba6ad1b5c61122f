"""The fused fast path of the training loss: the same cross-entropy as the plain line, with fewer passes.

``model/model.py::TinyMindForCausalLM.forward`` defines the training loss plainly:

    loss = F.cross_entropy(logits.float(), targets)        logits (N, V), targets (N,), the mean over N

That line is what a learner reads. On a CPU it is a large share of a small model's step: with V = 6400 the
logits of a 16 x 256 batch are 26M numbers, and autograd streams them through memory many times: under bf16
autocast an fp32 copy, log_softmax and its saved output, nll's gradient (a zero-filled (N, V) tensor),
log_softmax's backward, and the cast of that gradient back to bf16 for the LM head's backward. The gradient
of the mean cross-entropy has a closed form,

    d loss / d logits = (softmax(logits) - onehot(targets)) / N

so this file computes it already in the forward pass, a chunk of rows at a time (each chunk's fp32 working
copy stays in the CPU's cache), and writes it once, in the logits' dtype; the backward only scales it. The
arithmetic is fp32 in both paths: the loss agrees to fp32 rounding, the gradient to the rounding of its dtype.

What this file implements:
- ``ce_chunk``: one chunk of rows: its summed negative log-likelihood and its gradient.
- ``FusedCrossEntropy``: the autograd Function (forward computes loss and gradient; backward scales it).
- ``fused_cross_entropy``: the loss through it.
- ``fused_ce_applies``: where it runs instead of the plain line (a CPU step that needs the gradient).
"""
from __future__ import annotations

import torch

# Rows per chunk: 2 MiB of fp32 working copy, which stays in a CPU core's cache between the passes.
CHUNK_ELEMENTS = 1 << 19


def ce_chunk(logits, t, n: int):
    """One chunk of the closed form: (-sum of log p(target), (softmax - onehot) / n), both fp32, for
    logits (r, V) of any dtype and targets t (r, 1). model/loss_chunked.py runs the same chunk on a head's
    logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)                    # (r, V) fp32
    nll = -logp.gather(1, t).sum()                                       # -log p(target), summed
    p = logp.exp_()                                                      # softmax, in place
    p.scatter_add_(1, t, torch.full_like(t, -1, dtype=p.dtype))         # softmax - onehot
    return nll, p.mul_(1.0 / n)


class FusedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``logits`` (N, V), fp32 or bf16, against ``targets`` (N,) (every row counts)."""

    @staticmethod
    def forward(ctx, logits, targets):
        n, vocab = logits.shape
        rows = max(1, CHUNK_ELEMENTS // vocab)
        grad = torch.empty_like(logits)                                      # (N, V) in the logits' dtype
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for i in range(0, n, rows):
            nll, g = ce_chunk(logits[i:i + rows], targets[i:i + rows, None], n)   # g: (r, V) fp32
            total += nll
            grad[i:i + rows] = g                                             # cast once, on the write
        ctx.save_for_backward(grad)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        # grad_loss: the loss's own gradient (1, or 1 / accumulation steps, or a loss scale)
        return grad * grad_loss.to(grad.dtype), None


def fused_cross_entropy(logits, targets):
    """``F.cross_entropy(logits.float(), targets)`` for (N, V) logits and (N,) targets without -100."""
    return FusedCrossEntropy.apply(logits, targets)


def fused_ce_applies(logits) -> bool:
    """Whether the training loss takes the fused path: a CPU (on a GPU one fused kernel already computes
    the loss), a gradient wanted, bf16 logits (in fp32 the plain line is as fast within noise and stays
    the one that ran, so fp32 results do not move; an fp16 gradient written before the loss scale would
    lose its small values), some rows, and no torch.compile (which fuses the plain line itself)."""
    return (logits.device.type == "cpu" and logits.requires_grad and torch.is_grad_enabled()
            and logits.dtype == torch.bfloat16 and logits.dim() == 2 and logits.shape[0] > 0
            and not getattr(torch.compiler, "is_compiling", lambda: False)())   # torch >= 2.3 has it
