"""The one training loop behind pretraining, SFT and LoRA.

Implements:
- ``TrainHook``: the loop's one extension point. A training-time method (a LoRA variant that prunes
  ranks, updates W, or changes the data mid-run; a callback that prints sample replies) subclasses it
  and is called at named moments; the loop itself never asks which method it is running.
- ``lr_at``: linear warmup, then cosine decay down to ``min_lr_ratio * learning_rate``.
- ``build_optimizer``: AdamW with weight decay on matrices only, over the parameters that train. A
  script may pass its own ``make_optimizer``; a param group's ``lr_scale`` multiplies the schedule.
- ``evaluate``: token-weighted validation loss (all-reduced under DDP).
- ``forward_backward`` / ``update_weights``: the body of one optimizer step, in two named halves.
- ``train_loop``: lr -> step -> log -> validate/save, with gradient accumulation, clipping, a NaN
  guard, CSV log + loss plot, checkpoints and resume files (atomic, rank 0 only), Ctrl-C handling.
  Returns its metrics. ``finish_run`` prints the closing line.

Exact resume (sampler, RNG states, resume files) lives in trainer/resume.py.
"""
from __future__ import annotations

import math
import time
from collections import deque
from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from model.common import DeviceContext, TinyMindError, atomic_save
from model.train_hook import TrainHook
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


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over the parameters that train. Matrices (embeddings, linear weights, LoRA A/B) decay;
    vectors (RMSNorm gains) do not: shrinking a norm gain towards 0 only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TinyMindError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel updates every tensor (same AdamW math); on a 2-core CPU the step of `small` takes
    # 41 ms instead of 138 ms (the default for-loop; foreach: 150 ms), ~2.5% of a training step
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=fused or None)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; a tied weight is counted once."""
    params = list(model.parameters())  # .parameters() already yields a shared tensor only once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@torch.no_grad()
def evaluate(model: nn.Module, val_set, collate_fn, batch_size: int, ctx: DeviceContext, max_batches: int = 0) -> float | None:
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

    Returns dict(final_loss, val_loss, steps, total_steps, tokens, tokens_per_s, wall_time_s,
    interrupted, weights, resume).
    """
    hooks = list(hooks)
    model.to(ctx.device)
    model.train()
    optimizer = (make_optimizer or build_optimizer)(model, tc.learning_rate, tc.weight_decay)

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
    run = {**run, "num_train_samples": n}

    # --- restore or start fresh (nothing is written before this point) ---
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "tokens": 0, "elapsed_s": 0.0, "finished": False}
    if resume and files.resume.exists():
        ck = load_resume(files.resume, model, optimizer, ctx.scaler, run, hooks)
        state.update({k: ck[k] for k in state})
        if ctx.is_main:
            set_rng_states(ck["rng"], ctx.device)
        else:  # only rank 0's RNG states are kept; the other ranks get a deterministic fresh stream
            seed_everything(tc.seed + ctx.rank + 7919 * state["step"])
        ctx.log(f"resumed from {files.resume} at step {state['step']}/{total_steps} "
                f"(epoch {state['epoch'] + 1}, step {state['step_in_epoch']} in it)")
    else:
        if resume:
            ctx.log(f"no resume file at {files.resume}; starting from scratch")
        seed_everything(tc.seed + ctx.rank)  # dropout masks differ across ranks
    if ctx.is_main:
        files.csv.parent.mkdir(parents=True, exist_ok=True)
        # After a resume, drop the rows the interrupted run logged past the resume point.
        keep = [r for r in read_csv_rows(files.csv) if int(r["step"]) <= state["step"]] if state["step"] else []
        write_csv_rows(files.csv, keep, append=False)

    raw = model
    if tc.use_compile:
        model = torch.compile(model)
    if ctx.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    def save_all(rng: dict, weights: bool = True) -> None:
        """Weights file (unless told not to) and resume file, rank 0 only, both atomic."""
        if not ctx.is_main:
            return
        try:
            if weights:
                save_weights(raw)
            atomic_save(resume_payload(raw, optimizer, ctx.scaler, state, rng, run, hooks), files.resume)
        except OSError as e:  # disk full, permissions: atomic_write left the previous files as they were
            raise TinyMindError(f"could not write to {files.weights.parent} ({type(e).__name__}: {e}); "
                                "the files already there are unchanged") from None

    ctx.log(f"training: {n} samples ({len(val_set) if val_set is not None else 0} held out), "
            f"{steps_per_epoch} steps/epoch x {tc.epochs} epoch(s) -> {total_steps} optimizer steps, "
            f"global batch {tc.batch_size * tc.accumulation_steps * ctx.world_size} "
            f"(batch {tc.batch_size} x accum {tc.accumulation_steps} x {ctx.world_size} process(es)), "
            f"warmup {warmup}")
    for h in hooks:
        h.on_train_start(raw, optimizer, total_steps)

    t_start = time.time()
    elapsed0, tokens0, step0 = state["elapsed_s"], state["tokens"], state["step"]
    t_log, tokens_log = t_start, state["tokens"]
    recent = deque(maxlen=tc.log_interval)  # per-step losses for the log line / final_loss
    val_loss, last_val_step, last_saved = None, -1, (state["step"] if state["step"] > 0 else None)
    boundary_rng = get_rng_states(ctx.device)
    interrupted, stepping = False, False

    def log_row(**row) -> None:
        if ctx.is_main:
            write_csv_rows(files.csv, [row])

    def log_step(step: int, epoch: int, lr: float) -> None:
        nonlocal t_log, tokens_log
        now = time.time()
        tok_s = (state["tokens"] - tokens_log) / max(now - t_log, 1e-9)
        t_log, tokens_log = now, state["tokens"]
        rate = (now - t_start) / (step - step0)
        avg = sum(recent) / len(recent)
        ctx.log(f"step {step}/{total_steps} | epoch {epoch + 1}/{tc.epochs} | loss {avg:.4f} | "
                f"lr {lr:.2e} | {tok_s:,.0f} tok/s | elapsed {_hms(state['elapsed_s'])} | "
                f"eta {_hms(rate * (total_steps - step))}")
        log_row(step=step, epoch=epoch + 1, tokens=state["tokens"], lr=f"{lr:.6g}",
                train_loss=f"{avg:.6f}", tok_per_s=f"{tok_s:.1f}", elapsed_s=f"{state['elapsed_s']:.1f}")

    def validate(step: int, epoch: int) -> None:
        nonlocal val_loss, last_val_step
        val_loss, last_val_step = evaluate(raw, val_set, collate_fn, tc.batch_size, ctx, tc.val_batches), step
        if val_loss is not None:
            ctx.log(f"step {step}/{total_steps} | val_loss {val_loss:.4f}")
            log_row(step=step, epoch=epoch + 1, tokens=state["tokens"], val_loss=f"{val_loss:.6f}",
                    elapsed_s=f"{state['elapsed_s']:.1f}")
        for h in hooks:
            h.at_validation(raw, step, val_loss)

    def check_finite(step_loss: float) -> None:
        if math.isfinite(step_loss):
            return
        saved = (f"the last good checkpoint (step {last_saved}) is kept in {files.weights}"
                 if last_saved is not None else "no checkpoint was written")
        raise TinyMindError(f"loss is {step_loss} at step {state['step'] + 1}: training stopped before "
                            f"updating the weights; {saved}. Try a lower --learning_rate (or --dtype float32)")

    try:
        for epoch in range(state["epoch"], tc.epochs):
            if state["step"] >= total_steps:
                break
            batches = epoch_batches(n, tc.batch_size, tc.seed, epoch, ctx.rank, ctx.world_size, lengths)
            groups = [batches[i:i + tc.accumulation_steps] for i in range(0, len(batches), tc.accumulation_steps)]
            first = state["step_in_epoch"] if epoch == state["epoch"] else 0
            # A dedicated generator: creating the loader must not consume the global torch RNG.
            loader = DataLoader(train_set, batch_sampler=[b for g in groups[first:] for b in g],
                                collate_fn=collate_fn, num_workers=tc.num_workers,
                                pin_memory=ctx.device.type == "cuda", generator=torch.Generator())
            it = iter(loader)
            for gi in range(first, len(groups)):
                if state["step"] >= total_steps:
                    break
                # 1. learning rate
                lr = lr_at(state["step"], total_steps, tc.learning_rate, warmup, tc.min_lr_ratio)
                set_lr(optimizer, lr)
                # 2. forward/backward, then the update
                step_loss, step_tokens = forward_backward(model, it, len(groups[gi]), ctx)
                check_finite(step_loss)
                stepping = True  # an interrupt inside optimizer.step() would leave half-updated weights
                update_weights(raw, optimizer, ctx, tc.grad_clip, hooks, state["step"] + 1)
                state.update(step=state["step"] + 1, tokens=state["tokens"] + step_tokens, epoch=epoch,
                             step_in_epoch=gi + 1, elapsed_s=elapsed0 + time.time() - t_start)
                stepping = False
                boundary_rng = get_rng_states(ctx.device)  # what a resume file after Ctrl-C restores
                recent.append(step_loss)
                step = state["step"]
                # 3. log
                if step % tc.log_interval == 0 or step == total_steps:
                    log_step(step, epoch, lr)
                # 4. validate and save (not counted in tok/s)
                t_pause = time.time()
                if tc.eval_interval > 0 and step % tc.eval_interval == 0 and step < total_steps:
                    validate(step, epoch)
                if tc.save_interval > 0 and step % tc.save_interval == 0 and step < total_steps:
                    save_all(get_rng_states(ctx.device))
                    last_saved = step
                    ctx.log(f"step {step}: saved {files.weights.name} and {files.resume.name}")
                t_log += time.time() - t_pause

        if last_val_step != state["step"]:
            validate(state["step"], state["epoch"])
        state["finished"] = True
        save_all(get_rng_states(ctx.device))
        ctx.log(f"saved {files.weights} and {files.resume}")
        if ctx.ddp:
            dist.barrier()  # other ranks wait until rank 0's files are in place
    except KeyboardInterrupt:
        interrupted = True
        if stepping:
            ctx.log("interrupted during an optimizer step: the weights are half-updated, no resume file written")
        else:
            optimizer.zero_grad(set_to_none=True)  # the partial accumulation is redone after resuming
            state["finished"] = False
            save_all(boundary_rng, weights=False)
            ctx.log(f"interrupted: saved {files.resume} at step {state['step']}/{total_steps}; "
                    "continue with --from_resume 1")
    wall = time.time() - t_start
    if ctx.is_main and (plot := plot_loss(files.csv, files.png, f"{files.weights.stem} loss")):
        ctx.log(f"loss curve: {plot}")
    session_tokens = state["tokens"] - tokens0
    return {
        "final_loss": (sum(recent) / len(recent)) if recent else None,
        "val_loss": val_loss,
        "steps": state["step"],
        "total_steps": total_steps,
        "tokens": state["tokens"],
        "tokens_per_s": session_tokens / wall if wall > 0 else 0.0,
        "wall_time_s": wall,
        "interrupted": interrupted,
        "weights": files.weights,
        "resume": files.resume,
    }


def finish_run(metrics: dict, ctx: DeviceContext) -> dict:
    """The closing summary line; after Ctrl-C, exit with status 130 (no traceback)."""
    if metrics["interrupted"]:
        raise SystemExit(130)
    loss = "n/a" if metrics["final_loss"] is None else f"{metrics['final_loss']:.4f}"
    val = "n/a" if metrics["val_loss"] is None else f"{metrics['val_loss']:.4f}"
    ctx.log(f"done: {metrics['steps']} steps, {metrics['tokens']:,} tokens in {metrics['wall_time_s']:.1f}s "
            f"({metrics['tokens_per_s']:,.0f} tok/s), final loss {loss}, val loss {val}")
    return metrics
