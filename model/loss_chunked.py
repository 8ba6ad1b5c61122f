"""The LM head and its loss computed a chunk of rows at a time: the same loss, without the (N, V) logits.

``model/model.py::TinyMindForCausalLM.forward`` defines the training loss plainly:

    logits = lm_head(h)                                    h (N, C) -> logits (N, V)
    loss   = F.cross_entropy(logits.float(), targets)      the mean over N

For TinyMind's own vocabulary (V = 6400) that is fine. A released model's vocabulary is 49k (SmolLM2) to
151k (Qwen) tokens: a batch of 8 x 128 tokens then has 50-155M logits, 200-620 MB in fp32, and autograd
keeps the logits, their log-softmax and the gradient of each alive at once: the head, a few percent of
the parameters, dominates the step's memory. The gradient of the mean cross-entropy has a closed form,

    d loss / d logits = (softmax(logits) - onehot(targets)) / N
    d loss / d h      = (d loss / d logits) W                  (N, C): as small as h itself
    d loss / d W      = (d loss / d logits)^T h                (V, C): only where the head trains

so this file runs the head on ``rows`` rows at a time, turns each chunk's logits into its share of the
loss and of these gradients at once, and keeps only the (N, C) gradient of h (and W's, where it trains)
for the backward. The (rows, V) working tensors are freed chunk by chunk; no (N, V) tensor ever exists.
The products are the same as the plain path's (forward h W^T, backward dlogits W, and dlogits^T h for a
head that trains), in the same dtype: the loss agrees to fp32 rounding, the gradients to their dtype's.

What this file implements:
- ``ChunkedHeadLoss``: the autograd Function (forward computes the loss and the gradients; backward scales).
- ``chunked_head_loss``: the loss through it, or, where no gradient is wanted (validation), the same
  chunked loop without the gradients.
- ``chunked_head_applies``: where the model's forward takes it (a plain bias-free head, chunking switched on).
- ``HEAD_CHUNK_ROWS`` / ``head_chunk_rows``: rows per chunk, and the rule ``--head_chunk auto`` follows.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.common import TinyMindError
from model.loss_fused import ce_chunk

# Rows per chunk: 1024 x 49152 fp32 logits are 200 MB; 256 rows keep the working copy near 50 MB for a
# 49k vocabulary (150 MB for Qwen's 151k) while each chunk's products stay large enough for BLAS.
HEAD_CHUNK_ROWS = 256
# --head_chunk auto: chunk the head of vocabularies this large (released models); TinyMind's own 6400-token
# vocabulary keeps the plain line, so the demo's numbers stay bit for bit what they were.
AUTO_MIN_VOCAB = 32000


def head_chunk_rows(flag: str, vocab_size: int) -> int:
    """Rows per chunk for ``--head_chunk`` (auto, 0, or a number of rows): 0 means the plain head."""
    if flag == "auto":
        return HEAD_CHUNK_ROWS if vocab_size >= AUTO_MIN_VOCAB else 0
    if not flag.isdigit():
        raise TinyMindError(f"--head_chunk {flag}: expected auto, 0 or a number of rows")
    return int(flag)


def chunked_head_applies(head: nn.Module, rows: int) -> bool:
    """Whether the training loss takes this path: chunking on (``rows`` > 0), a plain bias-free nn.Linear
    head (an adapted head keeps the plain line), and no torch.compile (which traces the plain line)."""
    return (rows > 0 and type(head) is nn.Linear and head.bias is None
            and not getattr(torch.compiler, "is_compiling", lambda: False)())


def compute_dtype(h, W):
    """The dtype the head's products run in: the autocast dtype where autocast is on (cast W once, not
    at every chunk), else W's own."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return W.dtype


class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of ``h W^T`` against ``targets``, the head run ``rows`` rows at a time.

        forward   for each chunk c of rows:  logits_c = h_c W^T                     (rows, V)
                                             g_c = (softmax(logits_c) - onehot) / N  (rows, V)
                                             dh_c = g_c W                            (rows, C)
                                             dW += g_c^T h_c                         (V, C), if W trains
        backward  dh * grad_loss, dW * grad_loss

    Under autocast the products run in the autocast dtype, as the plain head's do.
    tests/test_grad_memory.py checks loss and gradients against the plain head, with and without autocast.
    """

    @staticmethod
    def forward(ctx, h, W, targets, rows: int):
        n = h.shape[0]
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None              # (N, C)
        dW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dtype = compute_dtype(h, W)
        Wc = W.detach().to(dtype)                                                   # (V, C), cast once
        for i in range(0, n, rows):
            hc = h[i:i + rows].detach().to(dtype)                                   # (r, C)
            nll, g = ce_chunk(F.linear(hc, Wc), targets[i:i + rows, None], n)       # g: (r, V) fp32
            g = g.to(dtype)
            total += nll
            if dh is not None:
                dh[i:i + rows] = g @ Wc                                             # (r, C)
            if dW is not None:
                dW.addmm_(g.t().float(), hc.float())                               # (V, C) in fp32
            del g
        ctx.save_for_backward(dh, None if dW is None else dW.to(W.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dW = ctx.saved_tensors
        # grad_loss: the loss's own gradient (1, or 1 / accumulation steps, or a loss scale)
        return (None if dh is None else dh * grad_loss.to(dh.dtype),
                None if dW is None else dW * grad_loss.to(dW.dtype), None, None)


def chunked_head_loss(h, W, targets, rows: int = HEAD_CHUNK_ROWS):
    """``F.cross_entropy(F.linear(h, W).float(), targets)`` for h (N, C), W (V, C), targets (N,) without
    -100, never holding more than ``rows`` rows of logits."""
    if torch.is_grad_enabled() and (h.requires_grad or W.requires_grad):
        return ChunkedHeadLoss.apply(h, W, targets, rows)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    dtype = compute_dtype(h, W)
    Wc = W.to(dtype)
    for i in range(0, h.shape[0], rows):   # validation: the loss alone, chunk by chunk
        logits = F.linear(h[i:i + rows].to(dtype), Wc).float()
        total += F.cross_entropy(logits, targets[i:i + rows], reduction="sum")
    return total / h.shape[0]
