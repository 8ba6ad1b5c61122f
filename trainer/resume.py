"""Everything that makes ``--from_resume 1`` exact.

Implements:
- ``split_indices`` / ``split_dataset``: a fixed held-out validation slice, from the seed alone.
- ``epoch_batches`` / ``sample_lengths``: the deterministic sampler. One permutation per epoch from
  (seed, epoch), strided across DDP ranks, optionally grouped by length; nothing depends on hidden
  state, so a resumed run recomputes the same batches and skips the ones already done.
- ``seed_everything``, ``get_rng_states`` / ``set_rng_states``: every RNG (Python, NumPy, torch, CUDA)
  as plain tensors and ints, so a resume file loads with ``weights_only=True``.
- ``run_key``: what a resume file must agree on with the current run.
- ``trainable_state`` / ``frozen_fingerprint``: the weights a resume file keeps (for LoRA only the
  trainable ones) and a digest of the frozen ones, so a resume cannot land on another base.
- ``resume_payload`` / ``load_resume``: write and check-and-restore the resume file.

The resume file is taken at an optimizer-step boundary and holds the weights, the optimizer and scaler
state, the step, the data position (epoch, optimizer step inside it), the RNG states and the state of
any training hooks. On CPU a resumed run ends with bit-identical weights to an uninterrupted one
(tests/test_trainer.py checks it).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from model.common import DeviceContext, TinyMindError, repo_path, safe_load
from model.model import state_fingerprint

RESUME_FORMAT = "tinymind-resume"


def run_key(args: argparse.Namespace, stage: str, ctx: DeviceContext, *extra_flags: str) -> dict:
    """What a resume file must agree on with the current run (anything that changes the batches or
    the optimizer's trajectory). Logging/saving intervals, device, dtype and workers may change."""
    names = ["data_path", "max_seq_len", "epochs", "batch_size", "accumulation_steps", "learning_rate",
             "warmup_ratio", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "max_steps",
             "seed", "val_ratio", "group_by_length", *extra_flags]
    key = {"stage": stage, "world_size": ctx.world_size}
    for n in names:
        v = getattr(args, n)
        key[n] = str(repo_path(v)) if n == "data_path" else v
    if args.optimizer != "adamw":  # absent for the default, so resume files from before the flag still fit
        key["optimizer"] = args.optimizer
    return key


def split_indices(n: int, val_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed random held-out slice: (train indices, validation indices), from ``seed`` alone."""
    if not 0 <= val_ratio < 1:
        raise TinyMindError(f"--val_ratio must lie in [0, 1) (got {val_ratio})")
    n_val = 0 if val_ratio == 0 or n < 2 else max(1, round(n * val_ratio))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1_000_003)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def split_dataset(dataset, val_ratio: float, seed: int):
    """(train Subset, validation Subset or None) of ``dataset``, via ``split_indices``."""
    train_idx, val_idx = split_indices(len(dataset), val_ratio, seed)
    return Subset(dataset, train_idx), (Subset(dataset, val_idx) if val_idx else None)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                  lengths=None, group_size: int = 64) -> list[list[int]]:
    """This rank's micro-batches (lists of indices into the training split) for one epoch.

    One permutation per epoch from (seed, epoch), identical on every rank; rank r takes every
    world_size-th element starting at r. The tail that does not divide evenly is dropped, so every
    rank has the same number of batches (DDP needs all ranks to step together). The last batch may be
    smaller than batch_size. Nothing here depends on hidden state, so a resumed run can recompute the
    same list and skip the batches already done.

    ``lengths`` (one per sample, optional) groups samples of similar length: the shuffled samples are
    cut into runs of ``group_size`` batches, each run is sorted by length and cut into batches, and
    the batches are shuffled. Every sample is still seen once per epoch, but a batch is padded to a
    length close to its own samples' instead of to the longest of 32 random ones.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    mine = perm[rank: (n // world_size) * world_size: world_size]
    if lengths is None:
        return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    run = batch_size * group_size
    batches = []
    for i in range(0, len(mine), run):
        chunk = sorted(mine[i:i + run], key=lambda j: lengths[j])  # stable: ties keep the shuffled order
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[k] for k in order]


def sample_lengths(dataset):
    """Token length of every sample of ``dataset`` (an SFTDataset or a Subset of one), or None when
    all samples are equally long (pretraining windows) or the dataset does not say."""
    if isinstance(dataset, Subset):
        inner = sample_lengths(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    lengths = getattr(dataset, "lengths", None)
    return None if lengths is None else [int(x) for x in lengths]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_states(device: torch.device) -> dict:
    """All RNG states as tensors/ints, so the resume file loads with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by their plain names (for full training: every parameter)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def frozen_fingerprint(model: nn.Module) -> str | None:
    """Digest of the frozen parameters (the LoRA base), so a resume cannot land on another base."""
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    return state_fingerprint(frozen) if frozen else None


def resume_payload(model: nn.Module, optimizer, scaler, state: dict, rng: dict, run: dict,
                   hooks=()) -> dict:
    """Everything ``--from_resume 1`` needs, as plain tensors/ints/strings (weights_only-loadable).
    ``hooks``: the loop's ``TrainHook``s; their ``state_dict()``s are kept when there are any."""
    payload = {
        "format": RESUME_FORMAT,
        "config": model.config.to_dict(),
        "run": run,
        "model": trainable_state(model),
        "frozen_fingerprint": frozen_fingerprint(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        **state,  # the position: trainer/train_loop.py::RESUME_FIELDS (step, epoch, ..., finished)
    }
    if hooks:
        payload["hooks"] = [h.state_dict() for h in hooks]
    return payload


def load_resume(path: Path, model: nn.Module, optimizer, scaler, run: dict, hooks=()) -> dict:
    """Check a resume file against the current run, then restore model, optimizer and hook states in
    place. Returns the checkpoint (for step, data position, RNG). Any mismatch is a one-line error."""
    ck = safe_load(path, "resume file")
    if ck.get("format") != RESUME_FORMAT:
        raise TinyMindError(f"{path} is not a TinyMind resume file (format={ck.get('format')!r})")
    fix = "; rerun with the same flags, or --from_resume 0 to start over"

    def diff(old: dict, new: dict) -> list[str]:
        return [f"{k}: {old.get(k)!r} in the file, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]

    d = diff(ck.get("config", {}), model.config.to_dict())
    if d:
        raise TinyMindError(f"{path.name} was written for another model config ({'; '.join(d[:3])}){fix}")
    d = diff(ck.get("run", {}), run)
    if d:
        raise TinyMindError(f"{path.name} was written by a different run ({'; '.join(d[:3])}){fix}")
    if ck.get("frozen_fingerprint") != frozen_fingerprint(model):
        raise TinyMindError(f"{path.name} was trained on top of other frozen (base) weights{fix}")
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    got = set(ck["model"])
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise TinyMindError(f"{path.name} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}){fix}")
    with torch.no_grad():
        for n, t in ck["model"].items():
            if params[n].shape != t.shape:
                raise TinyMindError(f"{path.name}: {n} has shape {tuple(t.shape)}, the model {tuple(params[n].shape)}{fix}")
            params[n].copy_(t)
    optimizer.load_state_dict(ck["optimizer"])
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    saved_hooks = ck.get("hooks", [])
    if hooks and len(saved_hooks) != len(hooks):
        raise TinyMindError(f"{path.name} holds the state of {len(saved_hooks)} training hook(s), "
                            f"this run has {len(hooks)}{fix}")
    for h, hs in zip(hooks, saved_hooks):
        h.load_state_dict(hs)
    return ck
