"""The pieces every TinyMind training script shares (pretrain, SFT and LoRA use the same loop).

Implements, each as a plain function with explicit arguments:
- ``setup_device``: picks cuda -> mps -> cpu, the autocast dtype (bf16, or fp16 + GradScaler, on CUDA;
  fp32 elsewhere) and DDP from ``torchrun``'s environment (NCCL on CUDA, Gloo on CPU); logs why.
- ``add_common_args``: MiniMind's training flags (``--weight``, ``--epochs``, ``--batch_size``, ...).
- ``lr_at``: linear warmup, then cosine decay down to ``min_lr_ratio * learning_rate``.
- ``build_optimizer``: AdamW with weight decay on matrices only, over the parameters that train.
- ``split_dataset`` / ``epoch_batches``: a held-out validation slice, and a deterministic sampler: one
  permutation per epoch from ``(seed, epoch)``, strided across DDP ranks, resumable mid-epoch.
- ``train_loop``: gradient accumulation, clipping, NaN guard, log lines, validation loss, CSV + loss
  plot, checkpoints and resume files (atomic, rank 0 only), Ctrl-C handling. Returns its metrics.
- script helpers: ``RunFiles`` (the four files a run writes), ``load_from_weight`` (the checkpoint an
  SFT/LoRA run starts from), ``require_file``, ``seed_everything``, ``finish_run``.

Exactness of ``--from_resume 1``: the resume file holds the weights (for LoRA only the trainable ones,
plus a fingerprint of the frozen ones), the optimizer and scaler state, the step, the data position
(epoch, optimizer step inside it) and the RNG states, all taken at an optimizer-step boundary. The
sampler derives every batch from (seed, epoch) alone, so a resumed run sees exactly the batches the
uninterrupted run would have seen: on CPU both end with bit-identical weights.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import random
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset

from model.common import TinyMindError, atomic_save, find_checkpoint, repo_path, safe_load

RESUME_FORMAT = "tinymind-resume"
CSV_FIELDS = ["step", "epoch", "tokens", "lr", "train_loss", "val_loss", "tok_per_s", "elapsed_s"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# device, dtype, DDP


@dataclass
class DeviceContext:
    """Where and how a run computes; made by ``setup_device``."""

    device: torch.device
    dtype: torch.dtype = torch.float32  # autocast dtype; float32 means no autocast at all
    scaler: object | None = None  # a GradScaler, only for fp16 on CUDA (bf16 has fp32's exponent range)
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    reason: str = ""  # the one-line explanation that setup_device logged

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """Context for forward passes: mixed precision on GPUs, a no-op in fp32."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def log(self, msg: str) -> None:
        """Print on rank 0 only, so N processes do not print N copies."""
        if self.is_main:
            print(msg, flush=True)


def setup_device(device: str = "auto", dtype: str = "auto", log: bool = True) -> DeviceContext:
    """Decide device, autocast dtype and DDP in one place; log (rank 0) what was chosen and why.

    device: auto (cuda -> mps -> cpu), cpu, cuda, cuda:N, mps. dtype: auto, float32, bfloat16, float16.
    Under ``torchrun --nproc_per_node N`` (WORLD_SIZE > 1) the process group is initialised here:
    NCCL when training on CUDA (each rank on cuda:LOCAL_RANK), Gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    ddp = world_size > 1

    if device == "auto":
        if torch.cuda.is_available():
            dev, why = torch.device("cuda", local_rank if ddp else 0), "CUDA is available"
        elif torch.backends.mps.is_available() and not ddp:
            dev, why = torch.device("mps"), "Apple MPS is available, no CUDA"
        else:
            dev, why = torch.device("cpu"), "no CUDA or MPS found"
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise TinyMindError(f"--device {device}: expected auto, cpu, cuda, cuda:N or mps") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise TinyMindError(f"--device {device}: this torch build sees no CUDA GPU (use --device cpu)")
            if ddp:  # torchrun gives every rank its own GPU
                dev = torch.device("cuda", local_rank)
            elif dev.index is None:
                dev = torch.device("cuda", 0)
            if dev.index >= torch.cuda.device_count():
                raise TinyMindError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        elif dev.type == "mps":
            if not torch.backends.mps.is_available():
                raise TinyMindError("--device mps: MPS is not available on this machine (use --device cpu)")
            if ddp:
                raise TinyMindError("--device mps cannot be used with torchrun (DDP); run one process")
        elif dev.type != "cpu":
            raise TinyMindError(f"--device {device}: expected auto, cpu, cuda, cuda:N or mps")
        why = "--device " + device

    if dtype == "auto":
        if dev.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            amp = torch.bfloat16 if bf16 else torch.float16
            dwhy = "GPU supports bf16" if bf16 else "GPU lacks bf16, fp16 with loss scaling"
        else:
            amp, dwhy = torch.float32, f"{dev.type.upper()} trains in fp32"
    else:
        if dtype not in DTYPES:
            raise TinyMindError(f"--dtype {dtype}: expected auto, float32, bfloat16 or float16")
        amp, dwhy = DTYPES[dtype], "--dtype " + dtype
        if amp == torch.float16 and dev.type == "cpu":
            raise TinyMindError("--dtype float16 needs a GPU; on CPU use float32 (or bfloat16)")
    scaler = None
    if amp == torch.float16 and dev.type == "cuda":  # torch < 2.3 only has the torch.cuda.amp spelling
        scaler = torch.amp.GradScaler("cuda") if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler()

    if ddp:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        mode = f"DDP rank {rank}/{world_size} ({dist.get_backend()})"
    else:
        mode = "single process"
    dname = f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""
    reason = (f"device {dev}{dname} [{why}], dtype {str(amp)[6:]} [{dwhy}], {mode}")
    ctx = DeviceContext(dev, amp, scaler, ddp, rank, local_rank, world_size, reason)
    if log:
        ctx.log(reason)
    return ctx


def cleanup_distributed(ctx: DeviceContext) -> None:
    """Tear down the process group that ``setup_device`` started (no-op without DDP)."""
    if ctx.ddp and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# command line


@dataclass
class TrainConfig:
    """The loop's hyperparameters, one field per command-line flag of the same name."""

    epochs: int = 1  # passes over the training split
    batch_size: int = 16  # sequences per micro-batch per process
    learning_rate: float = 2e-3  # peak LR
    accumulation_steps: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    warmup_ratio: float = 0.03  # warmup as a fraction of all optimizer steps
    warmup_steps: int = 0  # > 0: warmup length in steps (wins over warmup_ratio)
    min_lr_ratio: float = 0.1  # LR floor at the end of the cosine
    weight_decay: float = 0.1  # AdamW decay on matrices
    max_steps: int = 0  # cap on optimizer steps (0 = epochs decide)
    val_batches: int = 8  # batches per validation pass (0 = all)
    log_interval: int = 10  # steps between log lines
    eval_interval: int = 100  # steps between validation passes (0 = end only)
    save_interval: int = 200  # steps between checkpoints (0 = end only)
    seed: int = 42  # data order and per-rank RNG streams
    num_workers: int = 0  # DataLoader workers
    use_compile: int = 0  # 1: torch.compile
    group_by_length: int = 1  # 1: batch chat samples of similar length together (see epoch_batches)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        cfg = cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
        for name in ("epochs", "batch_size", "accumulation_steps", "log_interval"):
            if getattr(cfg, name) < 1:
                raise TinyMindError(f"--{name} must be >= 1 (got {getattr(cfg, name)})")
        if cfg.learning_rate <= 0 or not math.isfinite(cfg.learning_rate):
            raise TinyMindError(f"--learning_rate must be a positive number (got {cfg.learning_rate})")
        if not 0 <= cfg.min_lr_ratio <= 1 or not 0 <= cfg.warmup_ratio <= 1:
            raise TinyMindError("--min_lr_ratio and --warmup_ratio must lie in [0, 1]")
        if min(cfg.max_steps, cfg.val_batches, cfg.eval_interval, cfg.save_interval, cfg.warmup_steps,
               cfg.num_workers) < 0 or cfg.grad_clip < 0 or cfg.weight_decay < 0:
            raise TinyMindError("step counts, intervals, --grad_clip and --weight_decay cannot be negative")
        return cfg


# The defaults of every common flag: the loop's come from TrainConfig, the rest are set here. Each script
# overrides a few (add_common_args(parser, weight=..., learning_rate=...)).
COMMON_DEFAULTS = dict(
    save_dir="out", weight="pretrain", data_path=None, tokenizer_path="model/tokenizer.json",
    preset=None, hidden_size=None, num_hidden_layers=None, max_seq_len=256, val_ratio=0.02,
    device="auto", dtype="auto", from_resume=0, skip_bad_lines=0, **asdict(TrainConfig()),
)


def add_common_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), **defaults) -> argparse.ArgumentParser:
    """Add MiniMind's training flags to ``parser``; ``defaults`` override ``COMMON_DEFAULTS``,
    flags named in ``skip`` are left out (train_lora.py names its output with --lora_name instead of --weight)."""
    unknown = set(defaults) - set(COMMON_DEFAULTS)
    if unknown:
        raise ValueError(f"add_common_args: unknown defaults {sorted(unknown)}")
    d = {**COMMON_DEFAULTS, **defaults}
    flags = [
        ("save_dir", str, "folder for checkpoints, resume files, CSV logs and loss plots (relative to the repo root)"),
        ("weight", str, "name of this run's output: writes {save_dir}/{weight}_{hidden}.pth"),
        ("data_path", str, "training data (.jsonl)"),
        ("tokenizer_path", str, "tokenizer file"),
        ("preset", str, "model size preset: smoke, tiny, small, base (SFT/LoRA: only picks and checks the checkpoint)"),
        ("hidden_size", int, "model width (default: the preset's, or the checkpoint's)"),
        ("num_hidden_layers", int, "number of transformer blocks (default: the preset's, or the checkpoint's)"),
        ("epochs", int, "passes over the training data"),
        ("batch_size", int, "sequences per micro-batch on each process"),
        ("learning_rate", float, "peak learning rate (after warmup)"),
        ("max_seq_len", int, "tokens per training sequence (longer samples are truncated)"),
        ("accumulation_steps", int, "micro-batches accumulated per optimizer step"),
        ("grad_clip", float, "clip the gradient norm to this value (0 = off)"),
        ("warmup_ratio", float, "fraction of optimizer steps used for linear warmup"),
        ("warmup_steps", int, "warmup length in optimizer steps; overrides --warmup_ratio when > 0"),
        ("min_lr_ratio", float, "cosine decay ends at learning_rate * min_lr_ratio"),
        ("weight_decay", float, "AdamW weight decay (applied to matrices only, never to norms)"),
        ("max_steps", int, "stop after this many optimizer steps; the schedule is fitted to it (0 = no cap)"),
        ("val_ratio", float, "fraction of the samples held out for validation loss (0 = no validation)"),
        ("val_batches", int, "at most this many batches per validation pass (0 = the whole held-out slice)"),
        ("log_interval", int, "print a log line and a CSV row every N optimizer steps"),
        ("eval_interval", int, "validation loss every N optimizer steps (0 = only at the end)"),
        ("save_interval", int, "write the checkpoint and the resume file every N optimizer steps (0 = only at the end)"),
        ("device", str, "auto (cuda -> mps -> cpu), cpu, cuda, cuda:N or mps"),
        ("dtype", str, "auto (bf16/fp16 autocast on CUDA, fp32 elsewhere), float32, bfloat16 or float16"),
        ("from_resume", int, "1: continue from {save_dir}/{weight}_{hidden}_resume.pth exactly where it stopped"),
        ("use_compile", int, "1: torch.compile the model (faster steps after a slow first one)"),
        ("seed", int, "random seed (model init, data order, validation split)"),
        ("num_workers", int, "DataLoader worker processes (0 = load in the training process)"),
        ("skip_bad_lines", int, "1: skip and count malformed data lines instead of stopping at the first"),
        ("group_by_length", int, "1: batch conversations of similar length together, so less padding is "
                                 "computed (SFT/LoRA; pretraining windows are all the same length)"),
    ]
    choices = {"from_resume": [0, 1], "use_compile": [0, 1], "skip_bad_lines": [0, 1], "group_by_length": [0, 1],
               "dtype": ["auto", "float32", "bfloat16", "float16"]}
    for name, typ, help_text in flags:
        if name in skip:
            continue
        default = d[name]
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(f"--{name}", type=typ, default=default, choices=choices.get(name),
                            help=help_text + shown)
    return parser


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
    return key


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
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; a tied weight is counted once."""
    params = list(model.parameters())  # .parameters() already yields a shared tensor only once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# data order


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


# ----------------------------------------------------------------------------------------------
# files


@dataclass
class RunFiles:
    """The files one run writes: {save_dir}/{name}_{hidden}.pth, _resume.pth, _log.csv, _loss.png."""

    weights: Path
    resume: Path
    csv: Path
    png: Path

    @classmethod
    def for_run(cls, save_dir, name: str, hidden: int) -> "RunFiles":
        base = repo_path(save_dir) / f"{name}_{hidden}"
        return cls(base.with_name(base.name + ".pth"), base.with_name(base.name + "_resume.pth"),
                   base.with_name(base.name + "_log.csv"), base.with_name(base.name + "_loss.png"))


def require_file(path, flag: str = "--data_path") -> Path:
    """``path`` resolved from the repo root; a missing file is a one-line user error."""
    if not path:
        raise TinyMindError(f"{flag} is required")
    p = repo_path(path)
    if not p.is_file():
        raise TinyMindError(f"{flag} {path}: file not found ({p})")
    return p


def write_csv_rows(path: Path, rows: list[dict], append: bool = True) -> None:
    new = not (append and path.exists())
    with open(path, "a" if append else "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerows({k: row.get(k, "") for k in CSV_FIELDS} for row in rows)


def read_csv_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def plot_loss(csv_path: Path, png_path: Path, title: str) -> Path | None:
    """Draw train and validation loss against the step from the run's CSV (atomic write)."""
    rows = read_csv_rows(csv_path)
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
    if not train and not val:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend needed

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", linewidth=1.2, markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(png_path.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, png_path)
    return png_path


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by their plain names (for full training: every parameter)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def frozen_fingerprint(model: nn.Module) -> str | None:
    """Digest of the frozen parameters (the LoRA base), so a resume cannot land on another base."""
    from model.model import state_fingerprint

    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    return state_fingerprint(frozen) if frozen else None


def load_from_weight(save_dir, from_weight: str, hidden_size: int | None = None,
                     num_hidden_layers: int | None = None, preset: str | None = None, what: str = "--from_weight"):
    """Load the checkpoint a run starts from, ``{save_dir}/{from_weight}_{hidden}.pth``.

    The config comes from the file. Architecture flags given on the command line must agree with it
    (a mismatch is an error, not a silent choice). Without --hidden_size (or --preset) the single
    ``{from_weight}_*.pth`` in save_dir is used. Returns (model, checkpoint dict, path).
    """
    from model.model import get_config, load_model

    hidden = hidden_size or (get_config(preset).hidden_size if preset else None)
    path = find_checkpoint(save_dir, from_weight, hidden, what=what)
    model, ckpt = load_model(path)
    cfg = model.config
    want = {"hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers}
    if preset:
        pc = get_config(preset, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers)
        want = {k: getattr(pc, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "num_key_value_heads", "intermediate_size")}
    for k, v in want.items():
        if v is not None and getattr(cfg, k) != v:
            src = f"--preset {preset}" if preset and k not in ("hidden_size", "num_hidden_layers") else f"--{k}"
            raise TinyMindError(f"{src} asks for {k}={v} but {path.name} has {k}={getattr(cfg, k)}; "
                                "leave the architecture flags out, the checkpoint carries its own config")
    return model, ckpt, path


def check_tokenizer_fits(tokenizer, config, max_seq_len: int, where: str) -> None:
    if len(tokenizer) > config.vocab_size:
        raise TinyMindError(f"the tokenizer has {len(tokenizer)} tokens but {where} only {config.vocab_size}: "
                            "not the tokenizer this model was trained with (--tokenizer_path)")
    if max_seq_len > config.max_position_embeddings:
        raise TinyMindError(f"--max_seq_len {max_seq_len} exceeds {where}'s max_position_embeddings "
                            f"{config.max_position_embeddings}")


# ----------------------------------------------------------------------------------------------
# resume files


def resume_payload(model: nn.Module, optimizer, scaler, state: dict, rng: dict, run: dict) -> dict:
    """Everything ``--from_resume 1`` needs, as plain tensors/ints/strings (weights_only-loadable)."""
    return {
        "format": RESUME_FORMAT,
        "config": model.config.to_dict(),
        "run": run,
        "model": trainable_state(model),
        "frozen_fingerprint": frozen_fingerprint(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        **state,  # step, epoch, step_in_epoch, tokens, elapsed_s, finished
    }


def load_resume(path: Path, model: nn.Module, optimizer, scaler, run: dict) -> dict:
    """Check a resume file against the current run, then restore model and optimizer in place.
    Returns the checkpoint (for step, data position, RNG). Any mismatch is a one-line error."""
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
    return ck


# ----------------------------------------------------------------------------------------------
# the loop


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


def train_loop(model: nn.Module, train_set, val_set, collate_fn: Callable, tc: TrainConfig, ctx: DeviceContext,
               files: RunFiles, save_weights: Callable[[nn.Module], Path], run: dict,
               resume: bool = False) -> dict:
    """Train ``model`` on ``train_set``; the one loop behind pretrain, SFT and LoRA.

    model: a plain model (not yet compiled or DDP-wrapped; this function wraps it). Only parameters
        with ``requires_grad`` train (LoRA freezes the base before calling this).
    train_set / val_set: indexable datasets of (input_ids, labels) items; val_set may be None.
    collate_fn: list of items -> (input_ids, labels, attention_mask), padded on the right.
    save_weights: called with the unwrapped model to write the weights file (save_model or save_lora).
    run: the resume key (``run_key``); a resume file made with another key is refused.
    resume: continue from ``files.resume`` if it exists.

    Returns dict(final_loss, val_loss, steps, total_steps, tokens, tokens_per_s, wall_time_s,
    interrupted, weights, resume).
    """
    model.to(ctx.device)
    model.train()
    optimizer = build_optimizer(model, tc.learning_rate, tc.weight_decay)

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
        ck = load_resume(files.resume, model, optimizer, ctx.scaler, run)
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
        if state["step"] > 0:  # drop rows logged after the resume point by the interrupted run
            keep = [r for r in read_csv_rows(files.csv) if int(r["step"]) <= state["step"]]
            write_csv_rows(files.csv, keep, append=False)
        else:
            write_csv_rows(files.csv, [], append=False)

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
            atomic_save(resume_payload(raw, optimizer, ctx.scaler, state, rng, run), files.resume)
        except OSError as e:  # disk full, permissions: atomic_save left the previous files as they were
            raise TinyMindError(f"could not write to {files.weights.parent} ({type(e).__name__}: {e}); "
                                "the files already there are unchanged") from None

    ctx.log(f"training: {n} samples ({len(val_set) if val_set is not None else 0} held out), "
            f"{steps_per_epoch} steps/epoch x {tc.epochs} epoch(s) -> {total_steps} optimizer steps, "
            f"global batch {tc.batch_size * tc.accumulation_steps * ctx.world_size} "
            f"(batch {tc.batch_size} x accum {tc.accumulation_steps} x {ctx.world_size} process(es)), "
            f"warmup {warmup}")

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

    def validate(step: int, epoch: int) -> None:
        nonlocal val_loss, last_val_step
        val_loss, last_val_step = evaluate(raw, val_set, collate_fn, tc.batch_size, ctx, tc.val_batches), step
        if val_loss is not None:
            ctx.log(f"step {step}/{total_steps} | val_loss {val_loss:.4f}")
            log_row(step=step, epoch=epoch + 1, tokens=state["tokens"], val_loss=f"{val_loss:.6f}",
                    elapsed_s=f"{state['elapsed_s']:.1f}")

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
                lr = lr_at(state["step"], total_steps, tc.learning_rate, warmup, tc.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                n_micro = len(groups[gi])
                stats = torch.zeros(2, device=ctx.device)  # (sum of micro-batch losses, real tokens)
                for mi in range(n_micro):
                    input_ids, labels, attention_mask = next(it)
                    input_ids = input_ids.to(ctx.device, non_blocking=True)
                    labels = labels.to(ctx.device, non_blocking=True)
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
                step_loss, step_tokens = (stats[0] / n_micro).item(), int(stats[1].item())
                if not math.isfinite(step_loss):
                    saved = (f"the last good checkpoint (step {last_saved}) is kept in {files.weights}"
                             if last_saved is not None else "no checkpoint was written")
                    raise TinyMindError(f"loss is {step_loss} at step {state['step'] + 1}: training stopped before "
                                        f"updating the weights; {saved}. Try a lower --learning_rate "
                                        "(or --dtype float32)")
                stepping = True  # an interrupt inside optimizer.step() would leave half-updated weights
                if ctx.scaler is not None:
                    ctx.scaler.unscale_(optimizer)
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(raw.parameters(), tc.grad_clip)
                if ctx.scaler is not None:
                    ctx.scaler.step(optimizer)
                    ctx.scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.update(step=state["step"] + 1, tokens=state["tokens"] + step_tokens, epoch=epoch,
                             step_in_epoch=gi + 1, elapsed_s=elapsed0 + time.time() - t_start)
                stepping = False
                boundary_rng = get_rng_states(ctx.device)  # what a resume file after Ctrl-C restores
                recent.append(step_loss)
                step = state["step"]

                if step % tc.log_interval == 0 or step == total_steps:
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
                t_pause = time.time()
                if tc.eval_interval > 0 and step % tc.eval_interval == 0 and step < total_steps:
                    validate(step, epoch)
                if tc.save_interval > 0 and step % tc.save_interval == 0 and step < total_steps:
                    save_all(get_rng_states(ctx.device))
                    last_saved = step
                    ctx.log(f"step {step}: saved {files.weights.name} and {files.resume.name}")
                t_log += time.time() - t_pause  # tok/s measures training, not validation or saving

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
