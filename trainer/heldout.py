"""The held-out loss: one validation pass, the line at each epoch's end, and whether a stage ended
on its plateau.

Implements:
- ``evaluate``: token-weighted mean loss over the held-out slice (all-reduced under DDP).
- ``PLATEAU_DROP``: how much the held-out loss may still fall over the last epoch for a stage to count
  as flat.
- ``relative_change``: (after - before) / before, the one definition both lines below use.
- ``nearer_middle``: which validation pass of the first epoch lies closest to its middle.
- ``epoch_line``: ``epoch 3/9 | held-out loss 1.6412 (-3.8% over the epoch)``, printed at every epoch end.
- ``plateau_verdict``: the end of the closing ``done:`` line, e.g. ``on its plateau (held-out loss
  -0.6% over the last epoch)`` or ``NOT on its plateau: held-out loss fell 3.8% over the last epoch ...``.

Why the verdict: a stage that stops while its held-out loss still falls fast stops on the steep part of
its curve, where a few more steps change the result a lot. Two runs that differ only in float rounding
(another machine, another thread count) then end measurably apart, and comparing them measures the
rounding, not the recipe. The loop (trainer/train_loop.py) collects the losses; everything here but
``evaluate`` is a pure function of them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model.common import DeviceContext


@torch.no_grad()
def evaluate(model: nn.Module, val_set, collate_fn, batch_size: int, ctx: DeviceContext,
             max_batches: int = 0) -> float | None:
    """Token-weighted mean loss over the held-out slice (the first ``max_batches`` batches of it).
    Under DDP the batches are split across ranks and the sums all-reduced, so every rank gets the
    same number, equal to what one process would compute."""
    if val_set is None or len(val_set) == 0:
        return None
    batches = [list(range(i, min(i + batch_size, len(val_set)))) for i in range(0, len(val_set), batch_size)]
    if max_batches > 0:
        batches = batches[:max_batches]
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # (sum of loss * tokens, tokens)
    for b in batches[ctx.rank::ctx.world_size]:
        input_ids, labels = collate_fn([val_set[i] for i in b])[:2]
        input_ids, labels = input_ids.to(ctx.device), labels.to(ctx.device)
        with ctx.autocast():
            loss = model(input_ids, labels=labels).loss
        n = (labels[:, 1:] != -100).sum()  # the tokens the (shifted) loss averages over
        total += torch.stack([loss.double() * n, n.double()])
    if ctx.ddp:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item() if total[1] > 0 else None


# ----------------------------------------------------------------------------------------------
# did the stage end on its plateau?

# A rule of thumb, relative to the loss: a held-out loss that still fell by more than 2% over the last
# epoch is on the steep part of its curve (more epochs or a larger learning rate would still pay); one
# that moved less has flattened out, and another epoch would change the result little.
PLATEAU_DROP = 0.02


def relative_change(before: float, after: float) -> float:
    """(after - before) / before: -0.038 is a loss that fell 3.8%. A loss of 0 counts as no change."""
    return (after - before) / before if before > 0 else 0.0


def nearer_middle(step: int, best_step: int, steps_per_epoch: int) -> bool:
    """Is the pass at ``step`` closer to the middle of the first epoch than the best so far
    (``best_step``, -1 for none)? A tie keeps the earlier pass."""
    middle = steps_per_epoch / 2
    return best_step < 0 or abs(step - middle) < abs(best_step - middle)


def epoch_line(epoch_losses: list[float], epochs: int, mid_loss: float | None = None) -> str:
    """The log line at the end of epoch ``len(epoch_losses)`` of ``epochs``: its held-out loss and the
    change over the epoch (over its second half for the first epoch, from ``mid_loss``, when there is
    a pass near its middle to compare with)."""
    k = len(epoch_losses)
    line = f"epoch {k}/{epochs} | held-out loss {epoch_losses[-1]:.4f}"
    if k >= 2:
        return line + f" ({relative_change(epoch_losses[-2], epoch_losses[-1]):+.1%} over the epoch)"
    if mid_loss is not None:
        return line + f" ({relative_change(mid_loss, epoch_losses[-1]):+.1%} over its second half)"
    return line


def plateau_verdict(epoch_losses: list[float] | None, epochs: int, mid_loss: float | None = None) -> str:
    """Whether a stage ended on its plateau, as the end of its closing log line.

    epoch_losses: the held-out loss at the end of each completed epoch, in order; None when the stage
        has no held-out set. Fewer than ``epochs`` entries: --max_steps stopped the stage early, and
        it is judged over its last completed epoch.
    epochs: the epochs the stage was asked for.
    mid_loss: the held-out loss of the pass closest to the middle of the first epoch (None: none ran);
        a stage with one completed epoch is judged over that epoch's second half.
    """
    if epoch_losses is None:
        return "no held-out set (--val_ratio 0): whether it ended on its plateau cannot be judged"
    done = len(epoch_losses)
    if done == 0:
        return ("stopped early (--max_steps) before its first epoch ended: whether it is on its plateau "
                "cannot be judged")
    early = f"; --max_steps stopped it with {done} of {epochs} epochs complete" if done < epochs else ""
    if done >= 2:
        before = epoch_losses[-2]
        span = "the last epoch" if not early else f"epoch {done}, its last complete one"
    elif mid_loss is not None:
        before = mid_loss
        span = "the second half of its only epoch" if not early else "the second half of epoch 1"
    else:
        return (f"one epoch and no held-out loss before its end to compare with: whether it ended on "
                f"its plateau cannot be judged{early}")
    change = relative_change(before, epoch_losses[-1])
    if -change > PLATEAU_DROP:
        return (f"NOT on its plateau: held-out loss fell {-change:.1%} over {span} (> {PLATEAU_DROP:.0%}): "
                f"more epochs or a larger learning rate would still pay{early}")
    return f"on its plateau (held-out loss {change:+.1%} over {span}){early}"
