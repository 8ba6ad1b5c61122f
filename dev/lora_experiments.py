"""Measure what the LoRA papers claim, on TinyMind's own demo: six named experiments, one script.

Every run starts from the same SFT checkpoint ({save_dir}/{from_weight}_{hidden}.pth) and is an ordinary
trainer/train_lora.py (or, for full fine-tuning, trainer/train_sft.py) run; a ``Scorer`` hook (a
``TrainHook``, model/train_hook.py) scores the model on dataset/eval/ during training, the way
scripts/evaluate.py does (tools/scoring.py). The experiments:

  learn_forget  Biderman et al. 2024 (2405.09673), "LoRA learns less and forgets less": full fine-tuning
                vs LoRA r = 4, 16, 64 on the medical task, scored after every epoch; medical QA is what was
                learned, general QA and the base persona what was (not) forgotten.
  rank          Hu et al. 2021 (2106.09685) section 7: r = 1 ... 64 on the identity and medical tasks; and the
                subspace similarity of the r = 8 and r = 64 adapters' top directions (the paper's Figure 3).
  targets       where to put the adapter: attention (q,v / q,k,v,o), MLP, every linear layer (QLoRA,
                2305.14314: all layers matter); on the medical task each set also adapts the embedding.
  scaling       alpha / r vs rsLoRA's alpha / sqrt(r) (2312.03732) across ranks at one learning rate.
  init          B = 0 (LoRA) vs PiSSA vs OLoRA vs LoRA-GA: the loss after the first steps.
  family        every variant in model/lora_variants with one budget: trainable numbers, step time, peak
                memory, score, general-QA drop, and how exactly the adapter merges into W.

A run is identified by its name and settings; results go to {out_dir}/lora_experiments.json (one row per
run, plus each experiment's summary) and {out_dir}/exp_{name}.png. Runs already in the JSON with the same
settings and base model are skipped, so an interrupted sweep continues where it stopped.

    python dev/lora_experiments.py                          # all six, `tiny` (run the pipeline first; ~1 h on 2 cores)
    python dev/lora_experiments.py --only rank,scaling      # some of them
    python dev/lora_experiments.py --jobs 2 --threads 1     # two runs at a time, one thread each
    python dev/lora_experiments.py --quick                  # every experiment, `smoke` model, a few steps (tests)
    python dev/lora_experiments.py --out_dir docs/results/lora_experiments --render docs/07-lora-experiments.md --update
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import torch

from model.common import (TinyMindError, atomic_save, atomic_write, atomic_write_text, find_checkpoint, repo_path,
                          run_main, safe_load)
from model.lora_variants import variants
from model.model import TinyMindForCausalLM, get_config, load_model, save_model, state_fingerprint
from model.model_lora import is_embedding, lora_modules, merge_lora
from model.tokenizer import load_tokenizer
from model.train_hook import TrainHook
from tools.doc_blocks import fill_blocks
from tools.measure import peak_memory_mb, reset_peak_memory
from tools.scoring import evaluate_model, load_eval_sets
from trainer import train_lora, train_sft
from trainer.trainer_utils import read_csv_rows

DATA = {"identity": "dataset/lora_identity.jsonl", "medical": "dataset/lora_medical.jsonl"}
ATTENTION = "q_proj,k_proj,v_proj,o_proj"
MLP = "gate_proj,up_proj,down_proj"
ALL_LINEAR = f"{ATTENTION},{MLP}"        # = model_lora.DEFAULT_TARGETS, written out so each table names it
SCORE = {"identity": "identity_new", "medical": "medical"}   # each task's own score in an evaluation summary


# ------------------------------------------------------------------------------------------- runs

@dataclass
class Run:
    """One training run (or, kind "base", the SFT model scored as it is)."""
    id: str
    kind: str = "lora"            # "lora" (train_lora.py), "full" (train_sft.py on the task's data) or "base"
    task: str = ""                # "identity" or "medical"
    flags: dict = field(default_factory=dict)   # trainer flags on top of the task's recipe
    score_every: int = 0          # score at the end of each of this many equal parts of training (0: at the end)
    keep_A: bool = False          # save the adapters' A matrices (for the subspace similarity)
    merge_check: bool = False     # measure how exactly the trained adapter merges into W
    probe: bool = False           # record the variant's own state before and after training (MechanismProbe)

    def key(self) -> dict:
        """The settings that identify the run (``probe`` only where set: the runs measured before it
        existed keep their key)."""
        return {k: v for k, v in asdict(self).items() if k != "id" and not (k == "probe" and not v)}


# The adapters' recipe the committed experiments ran with (the pipeline's until 2026-12-07; the pipeline now
# trains the medical adapter 16 epochs on every linear layer + embedding, tools/recipes.py). Kept here so
# that the experiment definitions, and the run keys of the committed results, do not move with the demo.
EXPERIMENT_STAGES = {"lora_identity": [],
                     "lora_medical": ["--epochs", "9", "--learning_rate", "7e-3", "--weight_decay", "0.1",
                                      "--lora_targets", "q_proj,k_proj,v_proj,o_proj,embed_tokens"]}


def recipe(task: str, quick: bool) -> dict:
    """The experiments' recipe of each task (``EXPERIMENT_STAGES``); --quick: a
    handful of steps on `smoke`."""
    if quick:
        return {"epochs": 2, "max_steps": 4, "batch_size": 8, "max_seq_len": 96, "learning_rate": 3e-3,
                "lora_rank": 4, "lora_alpha": 8, "warmup_steps": 1}
    stage = EXPERIMENT_STAGES[f"lora_{task}"]     # the adapter's flags, typed by train_lora
    args = train_lora.build_parser().parse_args(stage)
    # identity: no flags, train_lora.py's defaults (4 epochs, lr 2e-3, r 16, alpha 32, all linear)
    return {"epochs": args.epochs, **{k.lstrip("-"): getattr(args, k.lstrip("-")) for k in stage[::2]}}


# train_lora.py's defaults for the flags the tables show, so that every row states them
LORA_DEFAULTS = {"lora_rank": 16, "lora_alpha": 32, "lora_targets": ALL_LINEAR, "use_rslora": 0, "lora_variant": "lora"}


def make_run(id: str, kind: str, task: str, quick: bool, **kw) -> Run:
    """A run whose flags are complete: the task's recipe, then the experiment's own flags."""
    flags = {**recipe(task, quick), **kw.pop("flags", {})}
    if kind == "lora":
        flags = {**LORA_DEFAULTS, **flags}
    else:   # full fine-tuning: no adapter flags
        flags = {k: v for k, v in flags.items() if not k.startswith(("lora_", "use_rslora"))}
    return Run(id, kind=kind, task=task, flags=flags, **kw)


def lora(r, **flags):
    """LoRA at rank r with alpha = 2r (the default r16/alpha32 ratio: scaling 2 at every rank)."""
    return {"lora_rank": r, "lora_alpha": 2 * r, **flags}


def family_flags(variant: str, quick: bool) -> dict:
    """The family's flags beyond the variant: Delta-LoRA's W updates start a quarter into the run (its
    default K = 500 is the paper's, longer than the whole run: with it, Delta-LoRA is plain LoRA)."""
    flags = {}
    if variant == "delta_lora":
        flags["delta_lora_start_step"] = 1 if quick else 30     # of 4 (quick) or 120 steps
    return flags


def experiment_runs(quick: bool) -> dict[str, list[Run]]:
    """Each experiment's runs. Two runs with the same kind, task and flags are one run (first name wins):
    e.g. the medical adapter at r16 on q,k,v,o + embedding is learn_forget's, rank's and targets' run."""
    ranks = (1, 4) if quick else (1, 2, 4, 8, 16, 64)
    med_ranks = (1, 4) if quick else (1, 4, 8, 16, 64)   # a medical run is 9 epochs: r2 left out to save time
    sub_ranks = (1, 4) if quick else (8, 64)      # the pair compared by the subspace similarity
    lf_ranks = (4,) if quick else (4, 16, 64)
    ft_lrs = (1e-3,) if quick else (1e-4, 5e-4)
    per_epoch = 0 if quick else 9                 # learn_forget scores the medical runs after every epoch
    run = lambda *a, **kw: make_run(*a, quick=quick, **kw)
    base = Run("sft", kind="base")
    exps = {
        "learn_forget": [base]
        + [run(f"medical_full_lr{lr:g}", "full", "medical", score_every=per_epoch,
               flags={"learning_rate": lr, "weight_decay": 0.1}) for lr in ft_lrs]
        + [run(f"medical_r{r}", "lora", "medical", flags=lora(r), score_every=per_epoch, keep_A=r in sub_ranks)
           for r in lf_ranks]
        # r64 at the recipe's lr diverges (alpha = 2r: the update grows with r); a quarter of the lr keeps
        # r * lr as at r16 -- the learn/forget curve of a rank-64 adapter that trains
        + ([] if quick else [run("medical_r64_lr1.75e-3", "lora", "medical", score_every=per_epoch,
                                 flags=lora(64, learning_rate=1.75e-3))]),
        "rank": [base]
        + [run(f"identity_r{r}", "lora", "identity", flags=lora(r), keep_A=r in sub_ranks) for r in ranks]
        + [run(f"medical_r{r}", "lora", "medical", flags=lora(r), keep_A=r in sub_ranks) for r in med_ranks],
        "targets": [base]
        + [run(f"{task}_{label}", "lora", task, flags=lora(4 if quick else 16, lora_targets=t + emb))
           for task, emb in (("identity", ""), ("medical", ",embed_tokens"))
           for label, t in (("qv", "q_proj,v_proj"), ("attn", ATTENTION), ("mlp", MLP), ("all", ALL_LINEAR))
           if quick or (task, label) != ("medical", "mlp")],   # MLP + embedding: docs/results/medical_adapter_targets.md
        "scaling": [run(f"identity_{name}_r{r}", "lora", "identity",
                        flags={"lora_rank": r, "lora_alpha": 16, "use_rslora": rs, **({} if quick else {"epochs": 2})})
                    for r in ((1, 4) if quick else (4, 16, 64, 128)) for name, rs in (("alpha_r", 0), ("rslora", 1))],
        "init": [run(f"identity_init_{v}", "lora", "identity",
                     flags={"lora_variant": v, "log_interval": 1, **({} if quick else {"epochs": 1})})
                 for v in ("lora", "pissa", "olora", "lora_ga")],
    }
    exps["family"] = [base] + [run(f"identity_{v}", "lora", "identity", flags={"lora_variant": v, **family_flags(v, quick)},
                                   merge_check=True, probe=True) for v in variants()]
    merged: dict[str, Run] = {}
    for runs in exps.values():
        for i, r in enumerate(runs):
            key = json.dumps([r.kind, r.task, r.flags], sort_keys=True)
            if key in merged:
                m = merged[key]
                m.score_every, m.keep_A = max(m.score_every, r.score_every), m.keep_A or r.keep_A
                m.merge_check = m.merge_check or r.merge_check
                m.probe = m.probe or r.probe
                runs[i] = m
            else:
                merged[key] = r
    ids = [r.id for r in merged.values()]
    assert len(ids) == len(set(ids)), "one run id names two different settings"
    return exps


# -------------------------------------------------------------------------------------- scoring

def score(model, tok, sets, device, quick: bool) -> dict:
    """Evaluate the model as it is (tools/scoring.py, as scripts/evaluate.py does) and keep the numbers the
    tables use: fractions, and the held-out loss of the reference replies."""
    res = evaluate_model(model, tok, sets, device, batch_size=64, max_new_tokens=8 if quick else 48)
    g, i, m = res.get("general_qa", {}), res.get("identity", {}), res.get("medical_qa", {})
    return {"general": g.get("accuracy"), "identity_new": i.get("new_share"),
            "identity_base": i.get("base_share"), "medical": m.get("accuracy"),
            "heldout_loss": res["heldout"]["loss"]}


def make_scorer(sets, tok, device, parts: int, quick: bool):
    """A TrainHook that scores the model at the end of each of ``parts`` equal parts of training (each
    epoch when parts = epochs), keeps the model for the checks after training, and notes the peak memory."""
    class Scorer(TrainHook):
        def __init__(self):
            self.points, self.seconds, self.model, self.total = [], 0.0, None, 0
            self.trainable, self.peak_mb = 0, None

        def on_train_start(self, model, optimizer, total_steps):
            self.model, self.total = model, total_steps
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            reset_peak_memory(device)

        def after_optimizer_step(self, model, optimizer, step):
            at = {max(1, round(self.total * k / parts)) for k in range(1, parts + 1)} if parts else {self.total}
            if step not in at:
                return
            if step == self.total:
                self.peak_mb = peak_memory_mb(device)   # before scoring adds its own buffers
            t0 = time.time()
            was_training = model.training
            model.eval()
            point = {"step": step, "progress": round(step / self.total, 4), **score(model, tok, sets, device, quick)}
            model.train(was_training)
            self.points.append(point)
            self.seconds += time.time() - t0

    return Scorer()


def adapter_state(model, name: str) -> dict[str, torch.Tensor]:
    """Every tensor of adapter ``name``, grouped by its role, as fp32 copies: "A", "B", "W" (the base weight
    the branch adds to; QLoRA's is dequantised) and each variant parameter by its own name (DoRA's
    ``magnitude``, VeRA's ``vera_b`` / ``vera_d``, AdaLoRA's ``lora_E``). Values: the layers' tensors
    flattened and concatenated, in module order."""
    parts: dict[str, list[torch.Tensor]] = {}
    for _, m in lora_modules(model):
        if name not in m.configs:
            continue
        found = {"W": m.base.weight}
        if name in m.lora_A:
            found.update(A=m.lora_A[name], B=m.lora_B[name])
        if name in getattr(m, "variants", {}):
            found.update(dict(m.variants[name].named_parameters(recurse=False)))
        for role, t in found.items():
            parts.setdefault(role, []).append(t.detach().float().flatten().clone())
    return {role: torch.cat(ts) for role, ts in parts.items()}


def rel_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """||new - old|| / ||old|| (or ||new|| where old is 0, as B at LoRA's init)."""
    d = float((new - old).norm())
    ref = float(old.norm())
    return d / ref if ref > 0 else d


class MechanismProbe(TrainHook):
    """What a variant changes that plain LoRA does not, read off the model and the optimizer: the base W
    before training against the SFT model's (PiSSA, OLoRA, LoRA-GA move it into the residual, QLoRA
    quantises it), every adapter tensor's change during training (Delta-LoRA moves W, LoRA-FA keeps A,
    DoRA trains a magnitude), the learning-rate scales of the optimizer's groups (LoRA+), the distinct A
    matrices among the adapted layers (LoRA-drop shares one), and the share of AdaLoRA's λ pruned to zero."""

    def __init__(self, name: str, sft_weights: dict[str, torch.Tensor]):
        self.name, self.sft, self.start, self.facts = name, sft_weights, {}, {}

    def on_train_start(self, model, optimizer, total_steps):
        self.start = adapter_state(model, self.name)
        layers = [m for _, m in lora_modules(model) if self.name in m.configs]
        sft_w = torch.cat([self.sft[f"{n}.weight"].float().flatten() for n, m in lora_modules(model) if self.name in m.configs])
        self.facts = {
            "W_at_start_vs_sft": rel_change(self.start["W"], sft_w),
            "B_at_start": float(self.start["B"].norm()) if "B" in self.start else None,
            "lr_scales": sorted({float(g.get("lr_scale", 1.0)) for g in optimizer.param_groups}),
            "layers": len(layers),
            "distinct_A": len({id(m.lora_A[self.name]) for m in layers if self.name in m.lora_A}),
        }

    def finish(self, model) -> dict:
        end = adapter_state(model, self.name)
        facts = dict(self.facts)
        facts["moved"] = {role: rel_change(end[role], self.start[role]) for role in end}
        if "lora_E" in end:
            facts["lambda_zero_share"] = float((end["lora_E"] == 0).float().mean())
        return facts


# variant -> (what its own mechanism leaves behind, the check on MechanismProbe's facts). Plain LoRA's row
# is the reference: W untouched, A and B both trained, one lr, one A per layer.
MECHANISMS = {
    "lora": ("A and B train, W stays", lambda f: f["moved"]["W"] == 0 and f["moved"]["A"] > 0 and f["moved"]["B"] > 0),
    "dora": ("magnitude m trains", lambda f: f["moved"].get("magnitude", 0) > 0),
    "vera": ("only b, d train (shared A, B frozen)",
             lambda f: f["moved"].get("vera_b", 0) > 0 and f["moved"].get("vera_d", 0) > 0 and "A" not in f["moved"]),
    "pissa": ("W starts as the residual, B A = top singular part",
              lambda f: f["W_at_start_vs_sft"] > 1e-3 and (f["B_at_start"] or 0) > 0),
    "olora": ("W starts as the residual, B A from QR", lambda f: f["W_at_start_vs_sft"] > 1e-3 and (f["B_at_start"] or 0) > 0),
    "lora_ga": ("W starts as the residual, B A from the gradient's SVD",
                lambda f: f["W_at_start_vs_sft"] > 0 and (f["B_at_start"] or 0) > 0),
    "qlora": ("W is 4-bit NF4 (differs from fp32 W)", lambda f: f["W_at_start_vs_sft"] > 1e-3 and f["moved"]["W"] == 0),
    "adalora": ("budget prunes λ entries to 0", lambda f: f.get("lambda_zero_share", 0) > 0),
    "lora_fa": ("A frozen, only B trains", lambda f: f["moved"]["A"] == 0 and f["moved"]["B"] > 0),
    "lora_plus": ("B's lr = 16 x A's", lambda f: len(f["lr_scales"]) > 1 and max(f["lr_scales"]) / min(f["lr_scales"]) > 1),
    "lora_pro": ("gradients projected (loss curve differs from LoRA's)", lambda f: True),
    "delta_lora": ("W moves during training", lambda f: f["moved"]["W"] > 0),
    "lora_drop": ("layers share one (A, B)", lambda f: f["distinct_A"] < f["layers"]),
}


def mechanism_summary(facts: dict) -> str:
    """The probe's facts in one table cell: W's change at the start and in training, A's and B's change."""
    if not facts:
        return "—"
    mv = facts["moved"]
    cells = [f"W₀ {facts['W_at_start_vs_sft']:.1e}", f"ΔW {mv['W']:.1e}"]
    cells += [f"Δ{k} {v:.2g}" for k, v in mv.items() if k != "W"]
    if len(facts["lr_scales"]) > 1:
        cells.append("lr ×" + "/".join(f"{v:g}" for v in facts["lr_scales"]))
    if 0 < facts["distinct_A"] < facts["layers"]:   # VeRA has no per-layer A at all
        cells.append(f"{facts['distinct_A']} A for {facts['layers']} layers")
    if "lambda_zero_share" in facts:
        cells.append(f"λ=0: {100 * facts['lambda_zero_share']:.0f}%")
    return ", ".join(cells)


def same_as_lora(row: dict, lora_row: dict) -> bool:
    """A run indistinguishable from plain LoRA's: the same loss at every logged step and the same val loss."""
    return row.get("loss_curve") == lora_row.get("loss_curve") and row.get("val_loss") == lora_row.get("val_loss")


def mechanism_verdict(variant: str, row: dict, lora_row: dict | None) -> str:
    """"yes" when the variant's run differs from plain LoRA's and its own mechanism left its mark
    (MECHANISMS); "NO: ..." naming what failed; "— (not probed)" for a row measured before the probe."""
    if variant != "lora" and lora_row is not None and same_as_lora(row, lora_row):
        return "NO: same loss curve and val loss as LoRA"
    facts = row.get("mechanism")
    if not facts:
        return "— (not probed)"
    what, check = MECHANISMS[variant]
    return "yes" if check(facts) else f"NO: {what} not seen"


def merge_error(model, vocab: int, seed: int = 0) -> float:
    """max |logits after merge_lora - logits with the live branch| / max |logits| on a fixed random batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 24), generator=g)
    model = copy.deepcopy(model).eval()
    with torch.inference_mode():
        live = model(ids).logits.float()
        merged = merge_lora(model)(ids).logits.float()
    return float((merged - live).abs().max() / live.abs().max())


def loss_curve(csv_path: Path) -> list[list]:
    return [[int(r["step"]), round(float(r["train_loss"]), 5)] for r in read_csv_rows(csv_path) if r.get("train_loss")]


def execute(run: Run, cfg: dict) -> dict:
    """Train and score one run in this process; returns its row for the results JSON."""
    quick, hidden = cfg["quick"], cfg["hidden"]
    run_dir = Path(cfg["work_dir"]) / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    base_file = run_dir / f"full_sft_{hidden}.pth"
    if not base_file.exists():
        try:
            base_file.symlink_to(Path(cfg["base"]).resolve())
        except OSError:
            shutil.copyfile(cfg["base"], base_file)
    device = torch.device("cpu")
    tok = load_tokenizer()
    sets = load_eval_sets("dataset/eval")
    if quick:
        sets = {k: v[:6] for k, v in sets.items()}
    row = {"id": run.id, **run.key()}
    t0 = time.time()
    if run.kind == "base":
        model, _ = load_model(base_file)
        row["points"] = [{"step": 0, "progress": 0.0, **score(model.eval(), tok, sets, device, quick)}]
        row["final"] = row["points"][-1]
        row["seconds"] = round(time.time() - t0, 1)
        return row
    flags = run.flags
    name = "ft" if run.kind == "full" else "adapter"
    argv = ["--save_dir", str(run_dir), "--from_weight", "full_sft", "--hidden_size", str(hidden),
            "--data_path", DATA[run.task], "--device", "cpu", "--save_interval", "0", "--eval_interval", "0",
            "--watch_prompts", "none", "--seed", str(cfg["seed"])]
    argv += ["--weight", name] if run.kind == "full" else ["--lora_name", name]
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    epochs = flags["epochs"]
    scorer = make_scorer(sets, tok, device, run.score_every or 0, quick)
    hooks = [scorer]
    if run.probe:   # the SFT model's weights, to see what a variant's init did to W
        sft, _ = load_model(base_file)
        hooks.append(MechanismProbe(name, {n: p.detach().clone() for n, p in sft.named_parameters()
                                           if n.endswith(".weight")}))
    main = train_sft.main if run.kind == "full" else train_lora.main
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            metrics = main(argv, hooks=hooks)
    finally:   # the trainer's output, also (above all) when it failed
        atomic_write_text(run_dir / "train.log", log.getvalue())
    if not scorer.points:
        raise TinyMindError(f"run {run.id}: training ended before it could be scored")
    train_s = max(1e-9, metrics["wall_time_s"] - scorer.seconds)
    row.update({
        "argv": argv, "epochs": epochs, "steps": metrics["steps"], "trainable": scorer.trainable,
        "train_seconds": round(train_s, 2), "step_ms": round(1000 * train_s / max(1, metrics["steps"]), 2),
        "tokens_per_s": round(metrics["tokens"] / train_s, 1), "peak_mb": round(scorer.peak_mb or 0.0, 1),
        "final_loss": metrics["final_loss"], "val_loss": metrics["val_loss"],
        "loss_curve": loss_curve(metrics["weights"].with_name(metrics["weights"].stem + "_log.csv")),
        "points": scorer.points, "final": scorer.points[-1], "seconds": round(time.time() - t0, 1)})
    model = scorer.model
    if run.keep_A:
        atomic_save({n: m.lora_A[name].detach().float().clone() for n, m in lora_modules(model)
                     if name in m.lora_A and not is_embedding(m)}, run_dir / "lora_A.pth")
    if run.probe:
        row["mechanism"] = hooks[1].finish(model)
    if run.merge_check:
        try:
            row["merge_error"] = merge_error(model, model.config.vocab_size)
        except TinyMindError as e:   # QLoRA: W is 4-bit, so merge_lora refuses (and says why)
            row["merge_error"], row["merge_note"] = None, str(e)
    for p in run_dir.glob("*_resume.pth"):   # 3x the weights each, and a finished run never resumes
        p.unlink()
    return row


# ----------------------------------------------------------------------------------- analyses

def similarity_table(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """Hu et al. (2021) eq. 4 for every i <= r1, j <= r2 at once: [r1, r2], entry (i-1, j-1) is
    phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), in [0, 1].

    A1 [r1, d], A2 [r2, d]: U are the right-singular vectors of A (directions of the input space, strongest
    first). 1: the top-i directions of one lie inside the top-j of the other; 0: they are orthogonal.
    With M = U1^T U2, ||M[:i, :j]||_F^2 is a 2-D running sum of M^2.
    """
    U1, U2 = (torch.linalg.svd(a.double(), full_matrices=False).Vh for a in (A1, A2))   # [r, d] rows
    i, j = torch.arange(1, U1.shape[0] + 1)[:, None], torch.arange(1, U2.shape[0] + 1)[None, :]
    return (U1 @ U2.T).pow(2).cumsum(0).cumsum(1) / torch.minimum(i, j)


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """phi(A1, A2, i, j): one entry of ``similarity_table``."""
    return float(similarity_table(A1, A2)[i - 1, j - 1])


def similarity_grid(path_lo: Path, path_hi: Path, kinds=("q_proj", "v_proj")) -> dict:
    """phi(i, j) for i <= r_lo, j <= r_hi, averaged over the layers of each kind."""
    a_lo, a_hi = (safe_load(p, "file of LoRA A matrices") for p in (path_lo, path_hi))
    out = {}
    for kind in kinds:
        names = [n for n in a_lo if n.endswith(kind) and n in a_hi]
        if not names:
            continue
        r_lo, r_hi = a_lo[names[0]].shape[0], a_hi[names[0]].shape[0]
        grid = (sum(similarity_table(a_lo[n], a_hi[n]) for n in names) / len(names)).tolist()
        d = a_lo[names[0]].shape[1]
        out[kind] = {"r_lo": r_lo, "r_hi": r_hi, "layers": len(names), "grid": grid,
                     "random_top1": 1.0 / d}   # E[phi(1, 1)] of two random directions in d dimensions
    return out


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def num(v, fmt=".3f") -> str:
    return "—" if v is None else format(v, fmt)


def drop(v, ref) -> str:
    return "—" if v is None or ref is None else f"{100 * (v - ref):+.1f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def method_label(r: Run) -> str:
    """"full FT, lr 0.0005" / "LoRA r16" / "LoRA r64, lr 0.00175" (the lr only where it is not the recipe's)."""
    if r.kind == "full":
        return f"full FT, lr {r.flags['learning_rate']:g}"
    lr = r.flags.get("learning_rate")
    same = lr is None or lr == recipe(r.task, False).get("learning_rate", lr)
    return f"LoRA r{r.flags['lora_rank']}" + ("" if same else f", lr {lr:g}")


def render(name: str, runs: list[Run], rows: dict, extra: dict) -> str:
    """The markdown table of one experiment, from the results JSON only."""
    base = rows.get("sft", {}).get("final", {})
    got = [(r, rows[r.id]) for r in runs if r.id in rows and r.kind != "base"]
    if name == "learn_forget":
        body = [["SFT (before)", "—", pct(base.get("medical")), pct(base.get("general")), "—",
                 pct(base.get("identity_base")), "—"]]
        for r, x in got:
            f = x["final"]
            body.append([method_label(r), f"{x['trainable']:,}", pct(f["medical"]), pct(f["general"]),
                         drop(f["general"], base.get("general")), pct(f["identity_base"]), f"{x['train_seconds']:.0f}"])
        return table(["method", "trainable", "medical QA (learned)", "general QA", "Δ general (points)",
                      "base persona kept", "train s"], body)
    if name == "rank":
        body = []
        for task in ("identity", "medical"):
            for r, x in got:
                if r.task != task:
                    continue
                f = x["final"]
                body.append([task, r.flags["lora_rank"], f"{x['trainable']:,}", pct(f[SCORE[task]]), pct(f["general"]),
                             num(x["val_loss"]), f"{x['step_ms']:.0f}"])
        t = table(["task", "r", "trainable", "task score", "general QA", "val loss", "ms/step"], body)
        sim = []
        for task, grids in extra.get("similarity", {}).items():
            for kind, g in grids.items():
                top, lo, hi = g["grid"], g["r_lo"], g["r_hi"]
                sim.append([task, kind, f"r{lo} vs r{hi}", g["layers"], f"{top[0][0]:.2f}",
                            f"{sum(top[i][i] for i in range(lo)) / lo:.2f}", f"{top[-1][-1]:.2f}",
                            f"{g['random_top1']:.3f}", f"{hi * g['random_top1']:.2f}"])
        if sim:   # E[phi(i, j)] of random subspaces is j / d: the yardsticks of the phi columns
            t += "\n\n" + table(["task", "layer", "adapters", "layers", "φ(1,1)", "mean φ(i,i), i ≤ r_lo",
                                 "φ(r_lo, r_hi)", "φ(1,1) of random directions",
                                 "φ(r_lo, r_hi) of random subspaces"], sim)
        return t
    if name == "targets":
        body = []
        for r, x in got:
            f = x["final"]
            body.append([r.task, r.flags["lora_targets"].replace("_proj", ""), f"{x['trainable']:,}", pct(f[SCORE[r.task]]),
                         pct(f["general"]), drop(f["general"], base.get("general")), num(x["val_loss"])])
        return table(["task", "targets", "trainable", "task score", "general QA", "Δ general", "val loss"], body)
    if name == "scaling":
        body = []
        for r, x in got:
            f = x["final"]
            s = r.flags["lora_alpha"] / (math.sqrt(r.flags["lora_rank"]) if r.flags["use_rslora"] else r.flags["lora_rank"])
            body.append(["rsLoRA α/√r" if r.flags["use_rslora"] else "α/r", r.flags["lora_rank"], f"{s:g}",
                         num(x["final_loss"]), num(x["val_loss"]), pct(f["identity_new"])])
        return table(["scaling", "r", "s", "final train loss", "val loss", "new persona"], body)
    if name == "init":
        body = []
        for r, x in got:
            curve = dict(x["loss_curve"])
            at = [curve.get(s) for s in (1, 5, 10, 20)]
            body.append([r.flags["lora_variant"], *(num(v) for v in at), num(x["final_loss"]), num(x["val_loss"]),
                         pct(x["final"]["identity_new"])])
        return table(["init", "loss @1", "@5", "@10", "@20", "final train loss", "val loss", "new persona"], body)
    if name == "family":
        body, mech = [], []
        lora_row = next((x for r, x in got if r.flags["lora_variant"] == "lora"), None)
        for r, x in got:
            f = x["final"]
            v = r.flags["lora_variant"]
            stale = x.get("flags") != r.flags      # measured with other settings than the sweep's now
            body.append([v + (" †" if stale else ""), f"{x['trainable']:,}", f"{x['step_ms']:.0f}", f"{x['peak_mb']:.0f}",
                         pct(f["identity_new"]), drop(f["general"], base.get("general")), num(x["val_loss"]),
                         f"{x['merge_error']:.1e}" if x.get("merge_error") is not None
                         else "refused" if x.get("merge_note") else "—"])
            mech.append([v + (" †" if stale else ""), MECHANISMS[v][0], mechanism_summary(x.get("mechanism", {})),
                         mechanism_verdict(v, x, lora_row)])
        return (table(["variant", "trainable", "ms/step", "peak MB", "new persona", "Δ general", "val loss",
                       "merge error"], body) + "\n\n"
                + table(["variant", "its own mechanism", "measured (W₀: W at the start vs SFT; Δ: change in training)",
                         "at work"], mech))
    raise KeyError(name)


def analyse(name: str, runs: list[Run], rows: dict, work_dir: Path, old: dict) -> dict:
    """Numbers computed across runs (kept from the JSON when the files they need are gone)."""
    if name != "rank":
        return {}
    out = {}
    for task in ("identity", "medical"):
        pair = [r for r in runs if r.task == task and r.keep_A and r.id in rows]
        files = [work_dir / r.id / "lora_A.pth" for r in pair]
        if len(pair) == 2 and all(f.exists() for f in files):
            pair_files = sorted(zip(pair, files), key=lambda rf: rf[0].flags["lora_rank"])
            out[task] = similarity_grid(pair_files[0][1], pair_files[1][1])
        elif task in old.get("similarity", {}):
            out[task] = old["similarity"][task]
    return {"similarity": out}


# ------------------------------------------------------------------------------------ figures

def rank_curves(ax, curves: dict, ylabel: str, title: str) -> None:
    """One line per label over the rank (log2 axis); curves: label -> [(r, value), ...]."""
    for label, pts in curves.items():
        if pts:
            ax.plot(*zip(*sorted(pts)), "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)


def figure(name: str, runs: list[Run], rows: dict, extra: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    got = [(r, rows[r.id]) for r in runs if r.id in rows and r.kind != "base"]
    base = rows.get("sft", {}).get("final", {})
    if name == "learn_forget":
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        for r, x in got:
            label = method_label(r)
            if (x["final"]["general"] or 0) < 0.5 * (base.get("general") or 0):   # diverged: would squash the chart
                ax.plot([], [], " ", label=f"{label}: diverged (general {pct(x['final']['general'])}), not drawn")
                continue
            pts = [(base.get("medical") or 0, base.get("general") or 0)] + [(p["medical"], p["general"]) for p in x["points"]]
            ax.plot([100 * a for a, _ in pts], [100 * b for _, b in pts], "o-" if r.kind != "full" else "s--",
                    label=label, markersize=4)
        ax.plot([100 * (base.get("medical") or 0)], [100 * (base.get("general") or 0)], "k*", markersize=12, label="SFT")
        ax.set_xlabel("medical QA % (learned)")
        ax.set_ylabel("general QA % (kept)")
        ax.set_title("learns less, forgets less? (one point per epoch)", fontsize=10)
    elif name == "rank":
        sims = [(task, kind, g) for task, grids in extra.get("similarity", {}).items() for kind, g in grids.items()]
        fig, axes = plt.subplots(1, 1 + len(sims), figsize=(4.2 * (1 + len(sims)), 3.8), squeeze=False)
        rank_curves(axes[0][0], {task: [(r.flags["lora_rank"], 100 * x["final"][key]) for r, x in got if r.task == task]
                                 for task, key in SCORE.items()},
                    "task score %", "score vs rank")
        for k, (task, kind, g) in enumerate(sims, 1):
            im = axes[0][k].imshow(g["grid"], aspect="auto", vmin=0, vmax=1, cmap="viridis",
                                   extent=(0.5, g["r_hi"] + 0.5, g["r_lo"] + 0.5, 0.5))
            axes[0][k].set_xlabel(f"j (r = {g['r_hi']})")
            axes[0][k].set_ylabel(f"i (r = {g['r_lo']})")
            axes[0][k].set_title(f"φ(i, j), {task} {kind}", fontsize=10)
        if sims:
            fig.colorbar(im, ax=axes[0][-1])
    elif name in ("targets", "family"):
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        labels = [(r.task + " " + r.flags["lora_targets"].replace("_proj", "")) if name == "targets"
                  else r.flags["lora_variant"] for r, _ in got]
        vals = [100 * (x["final"][SCORE[r.task]] or 0) for r, x in got]
        ax.barh(range(len(vals)), vals)
        ax.set_yticks(range(len(vals)), labels, fontsize=7)
        for k, (r, x) in enumerate(got):
            ax.text(vals[k] + 1, k, f"{x['trainable']:,} params", va="center", fontsize=6)
        ax.set_xlim(0, 130)
        ax.set_xlabel("task score % (identity: new persona; medical: medical QA)")
        ax.set_title("where to put the adapter" if name == "targets" else "the LoRA family, one budget", fontsize=10)
    elif name == "scaling":
        fig, ax = plt.subplots(figsize=(6, 4))
        rank_curves(ax, {label: [(r.flags["lora_rank"], x["final_loss"]) for r, x in got if r.flags["use_rslora"] == rs]
                         for rs, label in ((0, "α/r"), (1, "rsLoRA α/√r"))},
                    "final train loss", "scaling vs rank at one learning rate")
    elif name == "init":
        fig, ax = plt.subplots(figsize=(6, 4))
        for r, x in got:
            if x["loss_curve"]:
                ax.plot(*zip(*x["loss_curve"]), label=r.flags["lora_variant"])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss")
        ax.set_title("loss in the first epoch, by initialisation", fontsize=10)
    else:
        raise KeyError(name)
    if name not in ("targets", "family") and fig.axes[0].get_legend_handles_labels()[0]:
        fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------ the sweep

EXPERIMENTS = ("learn_forget", "rank", "targets", "scaling", "init", "family")
CLAIMS = {   # what each experiment tests, and where the claim comes from (printed above its table)
    "learn_forget": "full fine-tuning learns more, LoRA forgets less (Biderman et al. 2024, arXiv 2405.09673)",
    "rank": "a small r is enough; r=8 and r=64 share their top directions (Hu et al. 2021, arXiv 2106.09685 s7)",
    "targets": "adapting every linear layer beats attention only (QLoRA, arXiv 2305.14314)",
    "scaling": "with alpha/sqrt(r) a larger r lowers the loss; with alpha/r it does not (rsLoRA, arXiv 2312.03732)",
    "init": "PiSSA / OLoRA / LoRA-GA converge faster than B = 0 (arXiv 2404.02948, 2406.01775, 2407.05000)",
    "family": "each variant's own promise: fewer parameters, less memory, closer to full fine-tuning (model/lora_variants)",
}
SOURCE = "lora_experiments"   # the docs' blocks <!-- lora_experiments:NAME --> (tools/doc_blocks.py)


def load_results(path: Path) -> dict:
    if not path.exists():
        return {"runs": {}, "experiments": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TinyMindError(f"{path}: not a results file ({e.msg}); move it away to start afresh") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise TinyMindError(f"{path}: not a lora_experiments results file")
    data.setdefault("experiments", {})
    return data


def base_checkpoint(args) -> tuple[Path, int, str]:
    """The SFT checkpoint every run starts from: (path, hidden size, fingerprint). --quick makes a seeded
    random `smoke` model in the work folder (a LoRA learns on random weights too), so it needs nothing."""
    if args.quick:
        path = Path(args.work_dir) / "base" / "full_sft_64.pth"
        if not path.exists():
            torch.manual_seed(0)
            save_model(TinyMindForCausalLM(get_config("smoke")), path, stage="sft", weight="full_sft")
    else:
        path = find_checkpoint(repo_path(args.save_dir), args.from_weight, args.hidden_size,
                               what="SFT checkpoint (run scripts/run_pipeline.py first)")
    model, _ = load_model(path)
    return path, model.config.hidden_size, state_fingerprint(model.state_dict())


def run_in_child(run: Run, cfg: dict) -> dict:
    """One run in a fresh process (its own peak memory, its own threads); the row comes back as JSON."""
    spec = Path(cfg["work_dir"]) / run.id / "spec.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(spec, json.dumps({"run": asdict(run), "cfg": cfg}))
    out = spec.with_name("row.json")
    if out.exists():
        out.unlink()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_worker", str(spec)],
                       capture_output=True, text=True)
    if p.returncode != 0 or not out.exists():
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        raise TinyMindError(f"run {run.id} failed: {tail[0]} (log: {spec.parent / 'train.log'})")
    return json.loads(out.read_text(encoding="utf-8"))


def build_parser():
    p = argparse.ArgumentParser(description="TinyMind: the LoRA papers' claims measured on the demo (six experiments).")
    p.add_argument("--only", default="", help=f"comma list of experiments (default: all: {', '.join(EXPERIMENTS)})")
    p.add_argument("--save_dir", default="out", help="folder with the SFT checkpoint (default: out)")
    p.add_argument("--from_weight", default="full_sft", help="the SFT checkpoint's name (default: full_sft)")
    p.add_argument("--hidden_size", type=int, default=None, help="picks the checkpoint; default: the only one")
    p.add_argument("--out_dir", default="", help="results JSON and figures go here "
                                                 "(default: out/lora_experiments, --quick: out/lora_experiments_quick)")
    p.add_argument("--work_dir", default="", help="one folder per run: its adapter, log and A matrices "
                                                  "(default: out/lora_experiments[_quick]/runs)")
    p.add_argument("--quick", action="store_true", help="every experiment on a random `smoke` model, a few steps")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, each in its own process")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: all cores / jobs)")
    p.add_argument("--seed", type=int, default=42, help="seed of every run (default: 42)")
    p.add_argument("--render", default="", help="print the tables from the results JSON into this markdown "
                                                "file's <!-- lora_experiments:NAME --> blocks (no training)")
    p.add_argument("--update", action="store_true", help="with --render: rewrite the file (else: check, exit 1 if stale)")
    p.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    return p


def render_blocks(text: str, results: dict, where: str = "text") -> str:
    """``text`` with each experiment's block (<!-- lora_experiments:NAME -->) set to its table from ``results``."""
    runs = experiment_runs(results.get("meta", {}).get("quick", False))
    tables = {name: render(name, runs[name], results["runs"], results["experiments"][name].get("extra", {}))
              for name in EXPERIMENTS if name in results["experiments"]}
    return fill_blocks(text, SOURCE, tables, where)[0]


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args._worker:
        spec = json.loads(Path(args._worker).read_text(encoding="utf-8"))
        torch.set_num_threads(spec["cfg"]["threads"])
        row = execute(Run(**spec["run"]), spec["cfg"])
        atomic_write_text(Path(args._worker).with_name("row.json"), json.dumps(row))
        return row
    default_dir = "out/lora_experiments" + ("_quick" if args.quick else "")
    out_dir = repo_path(args.out_dir or default_dir)
    results_path = out_dir / "lora_experiments.json"
    if args.render:
        doc = repo_path(args.render)
        if not doc.exists():
            raise TinyMindError(f"--render: {doc} not found")
        if not results_path.exists():
            raise TinyMindError(f"--render: no results at {results_path} (the committed ones: "
                                "--out_dir docs/results/lora_experiments)")
        text = doc.read_text(encoding="utf-8")
        new = render_blocks(text, load_results(results_path), where=args.render)
        if args.update:
            atomic_write_text(doc, new)
            print(f"[lora_experiments] {doc}: tables {'rewritten' if new != text else 'already current'}")
            return 0
        print("current" if new == text else f"{doc}: tables differ from {results_path}")
        return 0 if new == text else 1
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise TinyMindError(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
    if args.jobs < 1 or args.threads < 0:
        raise TinyMindError("--jobs must be >= 1 and --threads >= 0")
    args.work_dir = str(repo_path(args.work_dir or f"{default_dir}/runs"))
    base, hidden, fingerprint = base_checkpoint(args)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    cfg = {"quick": args.quick, "hidden": hidden, "base": str(base), "work_dir": args.work_dir,
           "threads": threads, "seed": args.seed}
    exps = experiment_runs(args.quick)
    results = load_results(results_path)
    if results.get("meta", {}).get("base_fingerprint") not in (None, fingerprint):
        raise TinyMindError(f"{results_path} holds runs of another base model; choose another --out_dir")
    wanted = {r.id: r for n in names for r in exps[n]}
    todo = [r for r in wanted.values() if {k: results["runs"].get(r.id, {}).get(k) for k in r.key()}
            != json.loads(json.dumps(r.key()))]
    if todo or "meta" not in results:   # with nothing to train, the rows (and their meta) stay the earlier sweep's
        results["meta"] = {"base": base.name, "base_fingerprint": fingerprint, "quick": args.quick, "seed": args.seed,
                           "machine": f"{platform.machine()}, {torch.get_num_threads() if args.jobs == 1 else threads} "
                                      f"threads per run, {args.jobs} job(s), torch {torch.__version__}",
                           "command": "python dev/lora_experiments.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "date": time.strftime("%Y-%m-%d")}
    # longest first, so that --jobs N ends together: full fine-tuning, medical (9 epochs), identity
    todo.sort(key=lambda r: (r.kind == "full", r.task == "medical", r.score_every, r.flags.get("epochs", 0)),
              reverse=True)
    print(f"[lora_experiments] {', '.join(names)}: {len(todo)} run(s) to train, "
          f"{len(wanted) - len(todo)} already in {results_path}", flush=True)

    def finished(run: Run, row: dict):
        results["runs"][run.id] = row
        atomic_write_text(results_path, json.dumps(results, ensure_ascii=False, indent=1))
        f = row["final"]
        print(f"[lora_experiments] {run.id:<28} general {pct(f['general'])}  identity new {pct(f['identity_new'])}"
              f"  medical {pct(f['medical'])}  ({row['seconds']:.0f}s)", flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    if args.jobs == 1 and args.quick:   # in this process: fast, and peak memory is only indicative
        if args.threads:
            torch.set_num_threads(args.threads)
        for run in todo:
            finished(run, execute(run, cfg))
    else:   # each run in its own process: its own peak memory and threads, and --jobs of them at once
        errors = []
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_in_child, r, cfg): r for r in todo}
            for fut in as_completed(futures):
                try:
                    finished(futures[fut], fut.result())
                except TinyMindError as e:
                    errors.append(str(e))
        if errors:   # the finished runs are saved; rerunning trains only the failed ones
            raise TinyMindError(f"{len(errors)} run(s) failed, first: {errors[0]}")
    for n in names:
        extra = analyse(n, exps[n], results["runs"], Path(args.work_dir), results["experiments"].get(n, {}).get("extra", {}))
        results["experiments"][n] = {"runs": [r.id for r in exps[n]], "extra": extra}
        figure(n, exps[n], results["runs"], extra, out_dir / f"exp_{n}.png")
        print(f"\n## {n}: {CLAIMS[n]}\n\n{render(n, exps[n], results['runs'], extra)}")
    atomic_write_text(results_path, json.dumps(results, ensure_ascii=False, indent=1))
    print(f"\n[lora_experiments] wrote {results_path} and {len(names)} figure(s) in {out_dir}")
    return results


if __name__ == "__main__":
    run_main(main)
