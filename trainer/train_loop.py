"""The one training loop behind pretraining, SFT and LoRA.

Implements:
- ``lr_at``: linear warmup, then cosine decay down to ``min_lr_ratio * learning_rate``.
- ``build_optimizer``: the ``--optimizer`` over the parameters that train (AdamW with weight decay
  on matrices only, or Muon + AdamW; trainer/optim.py). A script may pass its own
  ``make_optimizer``; a param group's ``lr_scale`` multiplies the schedule.
- ``forward_backward`` / ``update_weights``: the body of one optimizer step, in two named halves.
- ``RunPlan`` / ``RunState``: what a run trains and how (fixed before the first step), and where it
  stands (its position, kept in the resume file, and this session's clock and counters).
- ``plan_run`` / ``start_run`` / ``wrap_model``: the set-up (optimizer and step counts; restore the
  resume file or seed a fresh run; torch.compile and DDP).
- ``log_step`` / ``validate`` / ``save_checkpoint`` / ``validate_and_save`` / ``save_interrupted``: the
  loop's named steps: log line and CSV row, validation pass (also at every epoch's end, with its
  ``epoch`` line), weights and resume files (atomic, rank 0 only), the resume file after Ctrl-C.
- ``train_loop``: lr -> step -> log -> validate/save, with gradient accumulation, clipping and a NaN
  guard. Returns its metrics (``close_run`` also draws the loss plot); ``finish_run`` prints the
  closing line, which says whether the stage ended on its plateau.

The loop's one extension point, ``TrainHook``, lives in model/train_hook.py (the LoRA variants
implement it without importing the trainer); exact resume (sampler, RNG states, resume files) lives in
trainer/resume.py; the held-out loss and the plateau verdict in trainer/heldout.py.
"""
from __future__ import annotations

import math
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from model.common import DeviceContext, TinyMindError, atomic_save
from model.train_hook import TrainHook
from trainer.heldout import epoch_line, evaluate, nearer_middle, plateau_verdict
from trainer.optim import ADAMW_BETAS, OPTIMIZERS
from trainer.resume import (epoch_batches, get_rng_states, load_resume, resume_payload, sample_lengths,
                            seed_everything, set_rng_states)
from trainer.trainer_utils import RunFiles, TrainConfig, plot_loss, read_csv_rows, write_csv_rows


# ----------------------------------------------------------------------------------------------
# optimisation


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup to ``lr``, then cosine down to
    ``lr * min_lr_ratio`` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps - 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=ADAMW_BETAS,
                    kind: str = "adamw") -> torch.optim.Optimizer:
    """The optimizer over the parameters that train, by ``--optimizer`` (trainer/optim.py): ``adamw``
    (weight decay on matrices only: embeddings, linear weights, LoRA A/B; never on RMSNorm gains) or
    ``muon`` (Muon on the blocks' hidden matrices, AdamW on the embedding and the norms)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise TinyMindError("the model has no trainable parameters")
    return OPTIMIZERS[kind](model, lr, weight_decay, betas)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; a tied weight is counted once."""
    params = list(model.parameters())  # .parameters() already yields a shared tensor only once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------------
# one optimizer step, in two halves


def forward_backward(model: nn.Module, batches, n_micro: int, ctx: DeviceContext) -> tuple[float, int]:
    """Forward and backward over the next ``n_micro`` micro-batches of ``batches`` (an iterator of
    collated (input_ids, labels, attention_mask)); the gradients accumulate, each micro-batch's loss
    divided by ``n_micro``. Returns (mean loss, real tokens), summed over ranks under DDP."""
    stats = torch.zeros(2, device=ctx.device)  # (sum of micro-batch losses, real tokens)
    for mi in range(n_micro):
        input_ids, labels, attention_mask = next(batches)
        input_ids = input_ids.to(ctx.device, non_blocking=True)  # (B, T)
        labels = labels.to(ctx.device, non_blocking=True)  # (B, T), -100 where no loss
        # Only the last micro-batch of a group all-reduces gradients across ranks.
        sync = nullcontext() if (not ctx.ddp or mi == n_micro - 1) else model.no_sync()
        with sync:
            with ctx.autocast():
                # No attention_mask: padding is on the right and attention is causal, so
                # real tokens never attend to pads, and pad labels are -100 (no loss).
                loss = model(input_ids, labels=labels).loss
            scaled = loss / n_micro
            (ctx.scaler.scale(scaled) if ctx.scaler is not None else scaled).backward()
        stats += torch.stack([loss.detach().float(), attention_mask.sum().to(stats)])
    if ctx.ddp:  # global loss and tokens (also makes a NaN on one rank stop every rank)
        dist.all_reduce(stats)
        stats[0] /= ctx.world_size
    return (stats[0] / n_micro).item(), int(stats[1].item())


def update_weights(model: nn.Module, optimizer, ctx: DeviceContext, grad_clip: float, hooks, step: int) -> None:
    """Turn the accumulated gradients into step ``step``: unscale (fp16), hooks, clip, step, hooks,
    zero the gradients. ``model`` is the unwrapped model."""
    if ctx.scaler is not None:
        ctx.scaler.unscale_(optimizer)
    for h in hooks:
        h.after_backward(model, step)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if ctx.scaler is not None:
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    else:
        optimizer.step()
    for h in hooks:
        h.after_optimizer_step(model, optimizer, step)
    optimizer.zero_grad(set_to_none=True)


def set_lr(optimizer, lr: float) -> None:
    """The schedule's lr for every group, times the group's ``lr_scale`` (LoRA+ gives B a larger one)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


# ----------------------------------------------------------------------------------------------
# the run: what it trains and how (fixed before the first step), and where it stands


# The part of ``RunState`` a resume file keeps (trainer/resume.py::resume_payload).
RESUME_FIELDS = ("step", "epoch", "step_in_epoch", "tokens", "elapsed_s", "epoch_val_losses", "mid_val_step",
                 "mid_val_loss", "finished")


@dataclass
class RunPlan:
    """What one run trains and how; fixed before its first step (``plan_run``)."""

    model: nn.Module  # the plain model: what is validated, saved and handed to the hooks
    optimizer: torch.optim.Optimizer
    train_set: object  # indexable (input_ids, labels) items
    val_set: object  # the held-out items, or None
    collate_fn: Callable
    tc: TrainConfig
    ctx: DeviceContext
    files: RunFiles
    save_weights: Callable[[nn.Module], object]
    hooks: list[TrainHook]
    key: dict  # the resume key; a resume file written under another key is refused
    lengths: list[int] | None  # sample lengths for --group_by_length (None: all windows equally long)
    steps_per_epoch: int
    total_steps: int
    warmup: int


@dataclass
class RunState:
    """Where a run stands. The fields up to ``finished`` are its position (``RESUME_FIELDS``, kept in
    the resume file); the others belong to this session only."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch of the last step (0-based)
    step_in_epoch: int = 0  # optimizer steps done inside that epoch
    tokens: int = 0  # real (non-pad) tokens trained on, all ranks together
    elapsed_s: float = 0.0  # wall time of every session so far
    epoch_val_losses: list = field(default_factory=list)  # the held-out loss at each completed epoch's end
    mid_val_step: int = -1  # the validation pass closest to the middle of the first epoch ...
    mid_val_loss: float | None = None  # ... and its held-out loss (a one-epoch stage is judged on its halves)
    finished: bool = False  # the last step is done and the final files are written
    # --- this session only ---
    recent: deque = field(default_factory=deque)  # the last log_interval step losses
    val_loss: float | None = None  # of the last validation pass
    last_val_step: int = -1
    last_saved: int | None = None  # the step of the last checkpoint on disk (for the NaN message)
    t_start: float = 0.0  # when this session's first step began ...
    step0: int = 0  # ... and the step, tokens and elapsed_s at that moment
    tokens0: int = 0
    elapsed0: float = 0.0
    t_log: float = 0.0  # time and tokens at the last log line (for its tok/s)
    tokens_log: int = 0
    boundary_rng: dict | None = None  # the RNG states after the last full step: what Ctrl-C saves
    stepping: bool = False  # inside the weight update: an interrupt now leaves half-updated weights
    interrupted: bool = False

    def position(self) -> dict:
        """The fields a resume file keeps."""
        return {k: getattr(self, k) for k in RESUME_FIELDS}

    def start_clock(self, device: torch.device) -> None:
        """Start this session's clock and counters, right before the first step."""
        self.t_start = time.time()
        self.elapsed0 = self.elapsed_s
        self.tokens0 = self.tokens
        self.step0 = self.step
        self.t_log = self.t_start
        self.tokens_log = self.tokens
        self.boundary_rng = get_rng_states(device)

    def end_step(self, loss: float, tokens: int, epoch: int, step_in_epoch: int,
                 device: torch.device) -> None:
        """Count the optimizer step just taken (its mean loss and real tokens)."""
        self.step += 1
        self.tokens += tokens
        self.epoch = epoch
        self.step_in_epoch = step_in_epoch
        self.elapsed_s = self.elapsed0 + time.time() - self.t_start
        self.stepping = False  # the update is complete: an interrupt from here on is safe
        self.boundary_rng = get_rng_states(device)  # what a resume file after Ctrl-C restores
        self.recent.append(loss)


# ----------------------------------------------------------------------------------------------
# set-up: plan, restore or seed, wrap


def plan_run(model: nn.Module, train_set, val_set, collate_fn: Callable, tc: TrainConfig, ctx: DeviceContext,
             files: RunFiles, save_weights: Callable, run: dict, hooks: list,
             make_optimizer: Callable | None) -> RunPlan:
    """Put the model on the device in training mode, build its optimizer and count the steps of the
    run (``train_loop``'s arguments are described there). Writes nothing."""
    model.to(ctx.device)
    model.train()
    if make_optimizer is None:
        optimizer = build_optimizer(model, tc.learning_rate, tc.weight_decay, kind=tc.optimizer)
    else:  # a LoRA variant's own optimizer (train_lora.py refuses --optimizer muon)
        optimizer = make_optimizer(model, tc.learning_rate, tc.weight_decay)
    n = len(train_set)
    if n < ctx.world_size:
        raise TinyMindError(f"the training split has {n} samples, fewer than the {ctx.world_size} processes")
    lengths = sample_lengths(train_set) if tc.group_by_length else None
    n_batches = len(epoch_batches(n, tc.batch_size, tc.seed, 0, ctx.rank, ctx.world_size, lengths))
    steps_per_epoch = math.ceil(n_batches / tc.accumulation_steps)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps > 0:
        total_steps = min(total_steps, tc.max_steps)
    warmup = tc.warmup_steps if tc.warmup_steps > 0 else int(tc.warmup_ratio * total_steps)
    return RunPlan(model=model, optimizer=optimizer, train_set=train_set, val_set=val_set,
                   collate_fn=collate_fn, tc=tc, ctx=ctx, files=files, save_weights=save_weights,
                   hooks=hooks, key={**run, "num_train_samples": n}, lengths=lengths,
                   steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup=warmup)


def start_run(plan: RunPlan, resume: bool) -> RunState:
    """Restore the resume file (weights, optimizer, hooks, RNG states, position) or seed a fresh run,
    then start the CSV log. The first file this run writes is that log."""
    tc, ctx, files = plan.tc, plan.ctx, plan.files
    state = RunState(recent=deque(maxlen=tc.log_interval))
    if resume and files.resume.exists():
        ck = load_resume(files.resume, plan.model, plan.optimizer, ctx.scaler, plan.key, plan.hooks)
        for k in RESUME_FIELDS:  # a file from before a field existed leaves that field's default
            setattr(state, k, ck.get(k, getattr(state, k)))
        if ctx.is_main:
            set_rng_states(ck["rng"], ctx.device)
        else:  # only rank 0's RNG states are kept; the other ranks get a deterministic fresh stream
            seed_everything(tc.seed + ctx.rank + 7919 * state.step)
        ctx.log(f"resumed from {files.resume} at step {state.step}/{plan.total_steps} "
                f"(epoch {state.epoch + 1}, step {state.step_in_epoch} in it)")
    else:
        if resume:
            ctx.log(f"no resume file at {files.resume}; starting from scratch")
        seed_everything(tc.seed + ctx.rank)  # dropout masks differ across ranks
    if ctx.is_main:
        files.csv.parent.mkdir(parents=True, exist_ok=True)
        # After a resume, drop the rows the interrupted run logged past the resume point.
        keep = []
        if state.step:
            keep = [r for r in read_csv_rows(files.csv) if int(r["step"]) <= state.step]
        write_csv_rows(files.csv, keep, append=False)
    state.last_saved = state.step if state.step > 0 else None
    return state


def wrap_model(model: nn.Module, tc: TrainConfig, ctx: DeviceContext) -> nn.Module:
    """What the batches run through: ``model`` compiled (--use_compile 1) and DDP-wrapped (several
    processes); the wrappers share its parameters."""
    if tc.use_compile:
        model = torch.compile(model)
    if ctx.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return model


def describe_plan(plan: RunPlan) -> str:
    """The log line that opens training: samples, steps and the global batch."""
    tc, ctx = plan.tc, plan.ctx
    n_val = len(plan.val_set) if plan.val_set is not None else 0
    return (f"training: {plan.key['num_train_samples']} samples ({n_val} held out), "
            f"{plan.steps_per_epoch} steps/epoch x {tc.epochs} epoch(s) -> "
            f"{plan.total_steps} optimizer steps, "
            f"global batch {tc.batch_size * tc.accumulation_steps * ctx.world_size} "
            f"(batch {tc.batch_size} x accum {tc.accumulation_steps} x {ctx.world_size} process(es)), "
            f"warmup {plan.warmup}")


def epoch_steps(plan: RunPlan, epoch: int) -> list[list[list[int]]]:
    """This rank's micro-batches of ``epoch`` (lists of sample indices), one group per optimizer step."""
    tc, ctx = plan.tc, plan.ctx
    n = len(plan.train_set)
    batches = epoch_batches(n, tc.batch_size, tc.seed, epoch, ctx.rank, ctx.world_size, plan.lengths)
    return [batches[i:i + tc.accumulation_steps] for i in range(0, len(batches), tc.accumulation_steps)]


def batch_iterator(plan: RunPlan, groups: list[list[list[int]]]):
    """The collated micro-batches of ``groups``, in order."""
    # A dedicated generator: creating the loader must not consume the global torch RNG.
    loader = DataLoader(plan.train_set, batch_sampler=[b for g in groups for b in g],
                        collate_fn=plan.collate_fn, num_workers=plan.tc.num_workers,
                        pin_memory=plan.ctx.device.type == "cuda", generator=torch.Generator())
    return iter(loader)


# ----------------------------------------------------------------------------------------------
# the loop's named steps: guard, log, validate, save


def check_finite(loss: float, state: RunState, files: RunFiles) -> None:
    """Stop before the update when the step's loss is NaN or inf, naming the checkpoint kept."""
    if math.isfinite(loss):
        return
    saved = (f"the last good checkpoint (step {state.last_saved}) is kept in {files.weights}"
             if state.last_saved is not None else "no checkpoint was written")
    raise TinyMindError(f"loss is {loss} at step {state.step + 1}: training stopped before "
                        f"updating the weights; {saved}. Try a lower --learning_rate (or --dtype float32)")


def log_row(plan: RunPlan, **row) -> None:
    """One row of the run's CSV log (rank 0 only)."""
    if plan.ctx.is_main:
        write_csv_rows(plan.files.csv, [row])


def log_step(plan: RunPlan, state: RunState, lr: float) -> None:
    """The log line and CSV row of a log interval: the mean loss of the recent steps, lr, tok/s, ETA."""
    now = time.time()
    tok_s = (state.tokens - state.tokens_log) / max(now - state.t_log, 1e-9)
    state.t_log = now
    state.tokens_log = state.tokens
    rate = (now - state.t_start) / (state.step - state.step0)
    avg = sum(state.recent) / len(state.recent)
    plan.ctx.log(f"step {state.step}/{plan.total_steps} | epoch {state.epoch + 1}/{plan.tc.epochs} | "
                 f"loss {avg:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | elapsed {_hms(state.elapsed_s)} | "
                 f"eta {_hms(rate * (plan.total_steps - state.step))}")
    log_row(plan, step=state.step, epoch=state.epoch + 1, tokens=state.tokens, lr=f"{lr:.6g}",
            train_loss=f"{avg:.6f}", tok_per_s=f"{tok_s:.1f}", elapsed_s=f"{state.elapsed_s:.1f}")


def validate(plan: RunPlan, state: RunState) -> None:
    """A validation pass: the held-out loss (logged, kept in ``state``), then the hooks' turn."""
    tc = plan.tc
    state.val_loss = evaluate(plan.model, plan.val_set, plan.collate_fn, tc.batch_size, plan.ctx,
                              tc.val_batches)
    state.last_val_step = state.step
    if state.val_loss is not None:
        plan.ctx.log(f"step {state.step}/{plan.total_steps} | val_loss {state.val_loss:.4f}")
        log_row(plan, step=state.step, epoch=state.epoch + 1, tokens=state.tokens,
                val_loss=f"{state.val_loss:.6f}", elapsed_s=f"{state.elapsed_s:.1f}")
        keep_epoch_progress(plan, state)
    for h in plan.hooks:
        h.at_validation(plan.model, state.step, state.val_loss)


def keep_epoch_progress(plan: RunPlan, state: RunState) -> None:
    """What the plateau verdict needs from the pass just made: at an epoch's end its held-out loss (and
    the epoch line); inside the first epoch, the pass closest to its middle."""
    if state.step_in_epoch == plan.steps_per_epoch:
        # slice assignment: a pass repeated at the same epoch end (a finished run resumed) replaces it
        state.epoch_val_losses[state.epoch:] = [state.val_loss]
        plan.ctx.log(epoch_line(state.epoch_val_losses, plan.tc.epochs, state.mid_val_loss))
        return
    if state.epoch == 0 and nearer_middle(state.step, state.mid_val_step, plan.steps_per_epoch):
        state.mid_val_step = state.step
        state.mid_val_loss = state.val_loss


def validate_lost_epoch_end(plan: RunPlan, state: RunState) -> None:
    """A run stopped by Ctrl-C during the pass at an epoch's end resumes without that epoch's held-out
    loss: make the pass again, so the run still knows every epoch."""
    lost = state.step_in_epoch == plan.steps_per_epoch and len(state.epoch_val_losses) <= state.epoch
    if lost and plan.val_set is not None:
        validate(plan, state)


def save_checkpoint(plan: RunPlan, state: RunState, rng: dict, weights: bool = True) -> None:
    """The weights file (unless told not to) and the resume file, rank 0 only, both atomic."""
    if not plan.ctx.is_main:
        return
    try:
        if weights:
            plan.save_weights(plan.model)
        payload = resume_payload(plan.model, plan.optimizer, plan.ctx.scaler, state.position(), rng, plan.key,
                                 plan.hooks)
        atomic_save(payload, plan.files.resume)
    except OSError as e:  # disk full, permissions: atomic_write left the previous files as they were
        raise TinyMindError(f"could not write to {plan.files.weights.parent} ({type(e).__name__}: {e}); "
                            "the files already there are unchanged") from None


def validate_and_save(plan: RunPlan, state: RunState) -> None:
    """A validation pass every --eval_interval steps and at every epoch's end (a one-epoch stage also
    at its middle), then every --save_interval steps the files; the last step does both after the loop.
    Validation comes first, so a resume file holds the held-out loss of the epoch that just ended.
    Their time is left out of the next log line's tok/s."""
    tc, step = plan.tc, state.step
    t_pause = time.time()
    every = tc.eval_interval > 0 and step % tc.eval_interval == 0
    epoch_end = state.step_in_epoch == plan.steps_per_epoch
    middle = tc.epochs == 1 and step == plan.steps_per_epoch // 2  # the plateau verdict compares halves
    if (every or epoch_end or middle) and step < plan.total_steps:
        validate(plan, state)
    if tc.save_interval > 0 and step % tc.save_interval == 0 and step < plan.total_steps:
        save_checkpoint(plan, state, get_rng_states(plan.ctx.device))
        state.last_saved = step
        plan.ctx.log(f"step {step}: saved {plan.files.weights.name} and {plan.files.resume.name}")
    state.t_log += time.time() - t_pause


def save_interrupted(plan: RunPlan, state: RunState) -> None:
    """After Ctrl-C: a resume file at the last step boundary (the weights file is left as it was)."""
    state.interrupted = True
    if state.stepping:
        plan.ctx.log("interrupted during an optimizer step: the weights are half-updated, "
                     "no resume file written")
        return
    plan.optimizer.zero_grad(set_to_none=True)  # the partial accumulation is redone after resuming
    state.finished = False
    save_checkpoint(plan, state, state.boundary_rng, weights=False)
    plan.ctx.log(f"interrupted: saved {plan.files.resume} at step {state.step}/{plan.total_steps}; "
                 "continue with --from_resume 1")


def close_run(plan: RunPlan, state: RunState) -> dict:
    """Draw the loss curve; the run's metrics (see ``train_loop``)."""
    wall = time.time() - state.t_start
    files = plan.files
    if plan.ctx.is_main and (plot := plot_loss(files.csv, files.png, f"{files.weights.stem} loss")):
        plan.ctx.log(f"loss curve: {plot}")
    session_tokens = state.tokens - state.tokens0
    # no held-out loss at the end (--val_ratio 0): the plateau cannot be judged
    epoch_losses = None if state.val_loss is None else list(state.epoch_val_losses)
    return {
        "final_loss": (sum(state.recent) / len(state.recent)) if state.recent else None,
        "val_loss": state.val_loss,
        "epoch_val_losses": epoch_losses,
        "plateau": plateau_verdict(epoch_losses, plan.tc.epochs, state.mid_val_loss),
        "steps": state.step,
        "total_steps": plan.total_steps,
        "tokens": state.tokens,
        "tokens_per_s": session_tokens / wall if wall > 0 else 0.0,
        "wall_time_s": wall,
        "interrupted": state.interrupted,
        "weights": files.weights,
        "resume": files.resume,
    }


# ----------------------------------------------------------------------------------------------
# the loop


def train_loop(model: nn.Module, train_set, val_set, collate_fn: Callable, tc: TrainConfig, ctx: DeviceContext,
               files: RunFiles, save_weights: Callable[[nn.Module], object], run: dict,
               resume: bool = False, hooks=(), make_optimizer: Callable | None = None) -> dict:
    """Train ``model`` on ``train_set``; the one loop behind pretrain, SFT and LoRA.

    model: a plain model (not yet compiled or DDP-wrapped; this function wraps it). Only parameters
        with ``requires_grad`` train (LoRA freezes the base before calling this).
    train_set / val_set: indexable datasets of (input_ids, labels) items; val_set may be None.
    collate_fn: list of items -> (input_ids, labels, attention_mask), padded on the right.
    save_weights: called with the unwrapped model to write the weights file (save_model or save_lora).
    run: the resume key (``resume.run_key``); a resume file made with another key is refused.
    resume: continue from ``files.resume`` if it exists.
    hooks: ``TrainHook``s, called in order at each of their moments.
    make_optimizer: ``(model, lr, weight_decay) -> optimizer``; default ``build_optimizer``.

    Returns dict(final_loss, val_loss, epoch_val_losses (the held-out loss at each completed epoch's
    end, None without a held-out set), plateau (``trainer/heldout.py::plateau_verdict``), steps,
    total_steps, tokens, tokens_per_s, wall_time_s, interrupted, weights, resume).
    """
    plan = plan_run(model, train_set, val_set, collate_fn, tc, ctx, files, save_weights, run, list(hooks),
                    make_optimizer)
    state = start_run(plan, resume)  # the first file written: the CSV log, after every check passed
    raw = plan.model  # what is saved, validated and handed to the hooks
    model = wrap_model(raw, tc, ctx)  # what the batches run through
    ctx.log(describe_plan(plan))
    for h in plan.hooks:
        h.on_train_start(raw, plan.optimizer, plan.total_steps)
    state.start_clock(ctx.device)
    try:
        validate_lost_epoch_end(plan, state)
        for epoch in range(state.epoch, tc.epochs):
            if state.step >= plan.total_steps:
                break
            groups = epoch_steps(plan, epoch)
            first = state.step_in_epoch if epoch == state.epoch else 0  # a resumed run skips the steps done
            batches = batch_iterator(plan, groups[first:])
            for gi in range(first, len(groups)):
                if state.step >= plan.total_steps:
                    break
                # 1. learning rate
                lr = lr_at(state.step, plan.total_steps, tc.learning_rate, plan.warmup, tc.min_lr_ratio)
                set_lr(plan.optimizer, lr)
                # 2. forward/backward, then the update
                step_loss, step_tokens = forward_backward(model, batches, len(groups[gi]), ctx)
                check_finite(step_loss, state, files)
                state.stepping = True  # an interrupt inside optimizer.step() would leave half-updated weights
                update_weights(raw, plan.optimizer, ctx, tc.grad_clip, plan.hooks, state.step + 1)
                state.end_step(step_loss, step_tokens, epoch, gi + 1, ctx.device)
                # 3. log
                if state.step % tc.log_interval == 0 or state.step == plan.total_steps:
                    log_step(plan, state, lr)
                # 4. validate and save (not counted in tok/s)
                validate_and_save(plan, state)
        # the end: a last validation unless this step had one, the final files, then the ranks meet
        if state.last_val_step != state.step:
            validate(plan, state)
        state.finished = True
        save_checkpoint(plan, state, get_rng_states(ctx.device))
        ctx.log(f"saved {files.weights} and {files.resume}")
        if ctx.ddp:
            dist.barrier()  # other ranks wait until rank 0's files are in place
    except KeyboardInterrupt:
        save_interrupted(plan, state)
    return close_run(plan, state)


def finish_run(metrics: dict, ctx: DeviceContext) -> dict:
    """The closing summary line, ending with whether the stage ended on its plateau; after Ctrl-C,
    exit with status 130 (no traceback)."""
    if metrics["interrupted"]:
        raise SystemExit(130)
    loss = "n/a" if metrics["final_loss"] is None else f"{metrics['final_loss']:.4f}"
    val = "n/a" if metrics["val_loss"] is None else f"{metrics['val_loss']:.4f}"
    ctx.log(f"done: {metrics['steps']} steps, {metrics['tokens']:,} tokens in {metrics['wall_time_s']:.1f}s "
            f"({metrics['tokens_per_s']:,.0f} tok/s), final loss {loss}, val loss {val} | {metrics['plateau']}")
    return metrics
