"""Flags, file helpers and the shared set-up of the training scripts (MiniMind's file name).

Implements:
- ``TrainConfig`` / ``RunFlags``: every common training flag, described once. Each dataclass field
  carries its default and its help text (``flag(...)``); ``add_common_args`` builds the parser from the
  fields, and ``TrainConfig.from_args`` reads the loop's hyperparameters back and checks them.
- ``RunFiles``: the four files a run writes ({name}_{hidden}.pth, _resume.pth, _log.csv, _loss.png).
- ``require_file``, ``load_from_weight`` (the checkpoint an SFT/LoRA run starts from, found with
  ``model.common.find_checkpoint``), ``check_tokenizer_fits``.
- ``setup_run`` / ``RunSetup``: the start train_sft.py and train_lora.py share (data file, tokenizer,
  the --from_weight model, the chat dataset and its held-out split, the run's files).
- ``write_csv_rows`` / ``read_csv_rows`` / ``plot_loss``: the run's CSV log and loss curve, both
  written through ``model.common.atomic_write``.

The loop itself is in trainer/train_loop.py, exact resume in trainer/resume.py, and the device rule
(``setup_device``) in model/common.py.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dataset.lm_dataset import SFTDataset
from model.common import TinyMindError, atomic_write, find_checkpoint, repo_path
from model.model import TinyMindForCausalLM, get_config, load_model
from model.tokenizer import TinyMindTokenizer, load_tokenizer
from trainer.optim import OPTIMIZERS
from trainer.resume import split_dataset

CSV_FIELDS = ["step", "epoch", "tokens", "lr", "train_loss", "val_loss", "tok_per_s", "elapsed_s"]


# ----------------------------------------------------------------------------------------------
# command line: each flag described once, on its dataclass field


def flag(default, help: str, type=None, choices=None):
    """A dataclass field that is also a command-line flag ``--{field name}``.

    type: what argparse converts the string to (default: the type of ``default``; give it when the
    default is None). choices: the allowed values, or None.
    """
    return field(default=default, metadata={"help": help, "type": type, "choices": choices})


@dataclass
class RunFlags:
    """What to train on, where the files go, and how to compute: the flags that are not the loop's
    hyperparameters (those are ``TrainConfig``)."""

    save_dir: str = flag("out", "folder for checkpoints, resume files, CSV logs and loss plots "
                                "(relative to the repo root)")
    weight: str = flag("pretrain", "name of this run's output: writes {save_dir}/{weight}_{hidden}.pth")
    data_path: str | None = flag(None, "training data (.jsonl)", type=str)
    tokenizer_path: str = flag("model/tokenizer.json", "tokenizer file")
    preset: str | None = flag(None, "model size preset: smoke, tiny, small, base, minimind3 (SFT/LoRA: only picks "
                                    "and checks the checkpoint)", type=str)
    hidden_size: int | None = flag(None, "model width (default: the preset's, or the checkpoint's)", type=int)
    num_hidden_layers: int | None = flag(None, "number of transformer blocks (default: the preset's, or the "
                                               "checkpoint's)", type=int)
    max_seq_len: int = flag(256, "tokens per training sequence (longer samples are truncated)")
    val_ratio: float = flag(0.02, "fraction of the samples held out for validation loss (0 = no validation)")
    device: str = flag("auto", "auto (cuda -> mps -> cpu), cpu, cuda, cuda:N or mps")
    dtype: str = flag("auto", "auto (CUDA: bf16/fp16 autocast; CPU: bf16 autocast where it has native bf16, "
                              "AVX512-BF16 or AMX, else fp32; MPS: fp32), float32, bfloat16 or float16",
                      choices=["auto", "float32", "bfloat16", "float16"])
    from_resume: int = flag(0, "1: continue from {save_dir}/{weight}_{hidden}_resume.pth exactly where it stopped",
                            choices=[0, 1])
    skip_bad_lines: int = flag(0, "1: skip and count malformed data lines instead of stopping at the first",
                               choices=[0, 1])


@dataclass
class TrainConfig:
    """The loop's hyperparameters, one field per command-line flag of the same name."""

    epochs: int = flag(1, "passes over the training data")
    batch_size: int = flag(16, "sequences per micro-batch on each process")
    learning_rate: float = flag(2e-3, "peak learning rate (after warmup)")
    accumulation_steps: int = flag(1, "micro-batches accumulated per optimizer step")
    grad_clip: float = flag(1.0, "clip the gradient norm to this value (0 = off)")
    warmup_ratio: float = flag(0.03, "fraction of optimizer steps used for linear warmup")
    warmup_steps: int = flag(0, "warmup length in optimizer steps; overrides --warmup_ratio when > 0")
    min_lr_ratio: float = flag(0.1, "cosine decay ends at learning_rate * min_lr_ratio")
    weight_decay: float = flag(0.1, "AdamW weight decay (applied to matrices only, never to norms)")
    optimizer: str = flag("adamw", "adamw: AdamW on every weight; muon: Muon on the blocks' hidden matrices "
                                   "(attention q/k/v/o, MLP gate/up/down), AdamW on the embedding/LM head and "
                                   "the norms, at the same --learning_rate (full training only: pretrain and "
                                   "SFT, not LoRA)", choices=list(OPTIMIZERS))
    max_steps: int = flag(0, "stop after this many optimizer steps; the schedule is fitted to it (0 = no cap)")
    val_batches: int = flag(8, "at most this many batches per validation pass (0 = the whole held-out slice)")
    log_interval: int = flag(10, "print a log line and a CSV row every N optimizer steps")
    eval_interval: int = flag(100, "validation loss every N optimizer steps (0 = only at each epoch's end, "
                                   "and at the middle of a one-epoch run)")
    save_interval: int = flag(200, "write the checkpoint and the resume file every N optimizer steps "
                                   "(0 = only at the end)")
    seed: int = flag(42, "random seed (model init, data order, validation split)")
    num_workers: int = flag(0, "DataLoader worker processes (0 = load in the training process)")
    use_compile: int = flag(0, "1: torch.compile the model (faster steps after a slow first one)", choices=[0, 1])
    group_by_length: int = flag(1, "1: batch conversations of similar length together, so less padding is "
                                   "computed (SFT/LoRA; pretraining windows are all the same length)",
                                choices=[0, 1])

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


COMMON_FLAGS = [*fields(RunFlags), *fields(TrainConfig)]
# The default of every common flag, as the fields give them; each script overrides a few
# (add_common_args(parser, weight=..., learning_rate=...)).
COMMON_DEFAULTS = {**asdict(RunFlags()), **asdict(TrainConfig())}


def add_common_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), **defaults) -> argparse.ArgumentParser:
    """Add MiniMind's training flags to ``parser``, one per field of ``RunFlags`` and ``TrainConfig``;
    ``defaults`` override the fields' defaults, flags named in ``skip`` are left out (train_lora.py names
    its output with --lora_name instead of --weight)."""
    unknown = set(defaults) - set(COMMON_DEFAULTS)
    if unknown:
        raise ValueError(f"add_common_args: unknown defaults {sorted(unknown)}")
    for f in COMMON_FLAGS:
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        typ = f.metadata["type"] or type(f.default)
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(f"--{f.name}", type=typ, default=default, choices=f.metadata["choices"],
                            help=f.metadata["help"] + shown)
    return parser


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
    """Add ``rows`` to the run's CSV log (or start it afresh with ``append=False``).

    The whole file is rewritten through ``atomic_write``: a log of a few hundred rows costs nothing
    to rewrite, and a crash mid-write can never leave a half-written row."""
    old = path.read_text(encoding="utf-8") if append and path.exists() else ""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    if not old:
        w.writeheader()
    w.writerows({k: row.get(k, "") for k in CSV_FIELDS} for row in rows)
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            f.write(old + buf.getvalue())


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
    with atomic_write(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return png_path


def load_from_weight(save_dir, from_weight: str, hidden_size: int | None = None,
                     num_hidden_layers: int | None = None, preset: str | None = None, what: str = "--from_weight"):
    """Load the checkpoint a run starts from, ``{save_dir}/{from_weight}_{hidden}.pth``.

    The config comes from the file. Architecture flags given on the command line must agree with it
    (a mismatch is an error, not a silent choice). Without --hidden_size (or --preset) the single
    ``{from_weight}_*.pth`` in save_dir is used. Returns (model, checkpoint dict, path).
    """
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
# the set-up train_sft.py and train_lora.py share


@dataclass
class RunSetup:
    """What a chat-data run (SFT or LoRA) starts from."""

    data_path: Path  # the --data_path file, resolved from the repo root
    tok: TinyMindTokenizer
    model: TinyMindForCausalLM  # loaded from --from_weight, with the config stored in that file
    src: Path  # the checkpoint it came from
    train_set: object  # Subset of the SFTDataset
    val_set: object  # the held-out Subset, or None with --val_ratio 0
    files: RunFiles  # what this run writes: {save_dir}/{name}_{hidden}.pth and the rest


def setup_run(args: argparse.Namespace, name: str) -> RunSetup:
    """The start of train_sft.py and train_lora.py: everything that can fail on user input, before
    anything is written. ``name`` names the run's files (--weight for SFT, --lora_name for LoRA)."""
    data_path = require_file(args.data_path)
    tok = load_tokenizer(args.tokenizer_path)
    model, _, src = load_from_weight(args.save_dir, args.from_weight, args.hidden_size,
                                     args.num_hidden_layers, args.preset)
    config = model.config
    check_tokenizer_fits(tok, config, args.max_seq_len, src.name)
    dataset = SFTDataset(data_path, tok, args.max_seq_len, skip_bad_lines=bool(args.skip_bad_lines))
    train_set, val_set = split_dataset(dataset, args.val_ratio, args.seed)
    files = RunFiles.for_run(args.save_dir, name, config.hidden_size)
    return RunSetup(data_path=data_path, tok=tok, model=model, src=src, train_set=train_set, val_set=val_set,
                    files=files)
