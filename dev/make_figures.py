"""Draw the diagrams the docs show, into docs/images/*.png (matplotlib, no network, a few seconds on a CPU).

What this file implements (one function per figure; each reads the real code where there is code to read):
- ``fig_lora_branch``: the LoRA branch beside the frozen W (scaled while r-sized, between A and B, as
  LoRALinear.forward does), and dW = B @ A drawn to scale, with the
  shapes of the `tiny` preset's q_proj and gate_proj (read from model/model.py) and the rank of
  model_lora.LoRAConfig's default;
- ``fig_attention_mask``: the boolean mask TinyMindModel.forward really builds for a left-padded batch
  (captured from the first attention layer with a forward pre-hook on a `smoke` model);
- ``fig_lr_schedule``: trainer/train_loop.py::lr_at over a run (warmup + cosine to the floor);
- ``fig_rope``: how model.model.apply_rope turns one (x_i, x_{i+hd/2}) pair by position, for a fast and
  a slower frequency, using rope_tables;
- ``fig_gqa``: which query heads share which key/value head, for the `tiny` and `small` presets;
- ``fig_loss_curves``: the training and validation loss of every run in out/*_log.csv (skipped when there are none);
- ``copy_results``: out/eval_chart.png -> docs/images/eval_chart.png when the evaluation has been run.

    python dev/make_figures.py                 # all figures
    python dev/make_figures.py --only lora,lr  # a subset (names: see --help)
    python dev/make_figures.py --only loss,results --hidden_size 192   # after the tiny pipeline
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from model.common import atomic_write, repo_path, run_main
from model.model import TinyMindForCausalLM, apply_rope, get_config, rope_tables
from model.model_lora import LoRAConfig
from tools.shapes import shapes_only_model
from trainer.train_loop import lr_at
from trainer.trainer_utils import COMMON_DEFAULTS

IMAGES = "docs/images"
BLUE, ORANGE, GREEN, GREY, RED = "#4c72b0", "#dd8452", "#55a868", "#8c8c8c", "#c44e52"


def shown(path: Path) -> str:
    """``docs/images/x.png`` for files in the repo, the absolute path otherwise."""
    try:
        return str(path.resolve().relative_to(repo_path(".").resolve()))
    except ValueError:
        return str(path)


def save(fig, out_dir: Path, name: str) -> Path:
    path = out_dir / name
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix[1:])
    plt.close(fig)
    print(f"wrote {shown(path)}")
    return path


def box(ax, x, y, w, h, text, color, fontsize=9, alpha=0.85, textcolor="white"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=color, ec="black", lw=0.8, alpha=alpha))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, color=textcolor)


def arrow(ax, x0, y0, x1, y1, color="black"):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12, lw=1.1, color=color))


# ----------------------------------------------------------------------------- LoRA

def fig_lora_branch(out_dir: Path) -> Path:
    model = shapes_only_model("tiny")   # the real module tree (shapes only, no init): the layer sizes below are read from it
    q = model.model.layers[0].self_attn.q_proj
    gate = model.model.layers[0].mlp.gate_proj
    lc = LoRAConfig()
    r, alpha = lc.rank, lc.alpha

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.15, 1]})
    # left: the data flow of LoRALinear.forward
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 7)
    ax.axis("off")
    i, o = q.in_features, q.out_features
    box(ax, 4.0, 6.1, 2.0, 0.6, f"x  (..., in={i})", GREY)
    box(ax, 0.6, 2.7, 3.6, 2.2, f"W  [out={o}, in={i}]\nfrozen (requires_grad=False)\n{o * i:,} numbers",
        BLUE, fontsize=9)
    # A, then the scaling on the r-sized z (as LoRALinear.forward does: fewer numbers to multiply), then B
    box(ax, 6.0, 4.35, 3.2, 0.7, f"A  [r={r}, in={i}]\nKaiming-uniform init", ORANGE, fontsize=8.5)
    box(ax, 6.0, 3.35, 3.2, 0.6, f"z = (A x) * alpha / r = {alpha:g}/{r}\nscaled while it is r-sized", GREEN,
        fontsize=8)
    box(ax, 6.0, 2.15, 3.2, 0.8, f"B  [out={o}, r={r}]\nzero init", ORANGE, fontsize=8.5)
    ax.add_patch(plt.Circle((5.0, 0.75), 0.32, fc="white", ec="black"))
    ax.text(5.0, 0.75, "+", ha="center", va="center", fontsize=16)
    box(ax, 6.3, 0.35, 3.0, 0.55, f"y  (..., out={o})", GREY)
    arrow(ax, 4.7, 6.1, 2.6, 4.95)
    arrow(ax, 5.3, 6.1, 7.6, 5.05)
    ax.text(6.75, 5.65, "lora_dropout (training only)", fontsize=7.5, color=GREY)
    arrow(ax, 7.6, 4.35, 7.6, 3.95)
    ax.text(7.7, 4.05, f"(..., r={r})", fontsize=7.5)
    arrow(ax, 7.6, 3.35, 7.6, 2.95)
    ax.text(7.7, 3.02, f"z (..., r={r})", fontsize=7.5)
    arrow(ax, 2.4, 2.7, 4.7, 0.9)
    arrow(ax, 7.0, 2.15, 5.3, 0.95)
    ax.text(6.45, 1.45, f"B z  (..., out={o})", fontsize=7.5)
    arrow(ax, 5.32, 0.75, 6.3, 0.65)
    ax.text(0.1, 5.9, "y = W x + B z\nz = (alpha / r) * (A x)", fontsize=9, family="monospace")
    ax.text(0.4, 0.2, f"trainable: A and B only, r*(in+out) = {r * (i + o):,} per layer", fontsize=9,
            family="monospace")
    ax.set_title(f"LoRALinear on q_proj of the `tiny` preset (r={r}, alpha={alpha:g})", fontsize=10)

    # right: dW = B @ A drawn to scale for a non-square layer
    ax2.set_aspect("equal")
    ax2.axis("off")
    gi, go = gate.in_features, gate.out_features
    s = 1 / 100  # plot units per matrix row/column
    ax2.add_patch(Rectangle((0, 0), r * s, go * s, fc=ORANGE, ec="black"))
    ax2.text(r * s / 2, go * s + 0.12, f"B\n[{go}, {r}]", ha="center", fontsize=8.5)
    ax2.text(r * s + 0.18, go * s / 2, "@", fontsize=14, va="center")
    ax2.add_patch(Rectangle((0.55, go * s - r * s), gi * s, r * s, fc=ORANGE, ec="black"))
    ax2.text(0.55 + gi * s / 2, go * s + 0.12, f"A [{r}, {gi}]", ha="center", fontsize=8.5)
    x0 = 0.55 + gi * s + 0.5
    ax2.text(x0 - 0.35, go * s / 2, "=", fontsize=14, va="center")
    ax2.add_patch(Rectangle((x0, 0), gi * s, go * s, fc="#f2c9a8", ec="black", hatch="//"))
    ax2.text(x0 + gi * s / 2, go * s + 0.12, f"dW = B @ A\n[{go}, {gi}], rank <= {r}", ha="center", fontsize=8.5)
    ax2.text(0, -0.55, f"gate_proj (`tiny`): W has {go * gi:,} numbers; A and B together {r * (gi + go):,} "
             f"({100 * r * (gi + go) / (go * gi):.1f}%)", fontsize=8.5)
    ax2.set_xlim(-0.2, x0 + gi * s + 0.3)
    ax2.set_ylim(-0.8, go * s + 0.8)
    ax2.set_title("the update is a product of two thin matrices (to scale)", fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir, "lora_branch.png")


# ----------------------------------------------------------------------------- attention mask

def capture_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The mask TinyMindModel.forward passes to the first attention layer, for these (B, T) inputs."""
    torch.manual_seed(0)
    model = TinyMindForCausalLM(get_config("smoke")).eval()
    seen = {}

    def hook(module, args):
        seen["mask"] = args[3]  # Attention.forward(x, cos, sin, mask, ...)

    h = model.model.layers[0].self_attn.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(torch.ones_like(attention_mask), attention_mask=attention_mask)
    h.remove()
    mask = seen.get("mask")
    if mask is None or mask.dtype != torch.bool:
        raise RuntimeError("could not capture the attention mask from model.model (did Attention.forward change?)")
    return mask[:, 0]  # (B, T, S)


def fig_attention_mask(out_dir: Path) -> Path:
    T = 7
    lengths = (7, 4)  # row 0: no padding; row 1: three pads on the left
    am = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        am[b, T - n:] = 1
    mask = capture_mask(am)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for b, ax in enumerate(axes):
        m = mask[b].int().numpy()
        ax.imshow(m, cmap="Blues", vmin=-0.3, vmax=1.2)
        labels = ["pad" if am[b, t] == 0 else f"t{int(am[b, :t + 1].sum()) - 1}" for t in range(T)]
        ax.set_xticks(range(T), labels, fontsize=8)
        ax.set_yticks(range(T), labels, fontsize=8)
        ax.set_xlabel("key position (attended to)")
        ax.set_ylabel("query position")
        for qi in range(T):
            for ki in range(T):
                ax.text(ki, qi, "1" if m[qi, ki] else "0", ha="center", va="center", fontsize=8,
                        color="white" if m[qi, ki] else GREY)
        pads = T - lengths[b]
        ax.set_title(f"row {b}: attention_mask = {am[b].tolist()}\n"
                     + ("no padding: plain causal (lower triangle)" if pads == 0 else
                        f"{pads} left pads: no real token attends to a pad;\n"
                        "a pad query sees itself only (no all -inf softmax row)"), fontsize=9)
    fig.suptitle("Boolean attention mask built by TinyMindModel.forward (True = may attend), captured from "
                 "the real code;\ntN = a real token at RoPE position N (positions count real tokens only)", fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir, "attention_mask.png")


# ----------------------------------------------------------------------------- LR schedule

def fig_lr_schedule(out_dir: Path) -> Path:
    total = 400
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for warmup_ratio, min_ratio, color in ((COMMON_DEFAULTS["warmup_ratio"], COMMON_DEFAULTS["min_lr_ratio"], BLUE),
                                           (0.1, 0.0, ORANGE)):
        warmup = int(warmup_ratio * total)  # what train_loop does with --warmup_ratio
        lrs = [lr_at(s, total, 2e-3, warmup, min_ratio) for s in range(total)]
        ax.plot(range(total), lrs, color=color, lw=1.6,
                label=f"--warmup_ratio {warmup_ratio:g} ({warmup} steps), --min_lr_ratio {min_ratio:g}")
    ax.axhline(2e-3 * COMMON_DEFAULTS["min_lr_ratio"], color=GREY, ls=":", lw=1)
    ax.set_xlabel("optimizer step (total 400)")
    ax.set_ylabel("learning rate")
    ax.set_title("train_loop.lr_at: linear warmup, then cosine to lr * min_lr_ratio (--learning_rate 2e-3)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, out_dir, "lr_schedule.png")


# ----------------------------------------------------------------------------- RoPE and GQA

def fig_rope(out_dir: Path) -> Path:
    cfg = get_config("tiny")
    hd = cfg.hidden_size // cfg.num_attention_heads
    positions = 12
    stride_slow = 8
    cos, sin = rope_tables(hd, positions * stride_slow, cfg.rope_theta)          # (P, hd)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    for ax, i, stride in ((axes[0], 0, 1), (axes[1], hd // 8, stride_slow)):
        pos = list(range(0, positions * stride, stride))
        x = torch.zeros(1, 1, len(pos), hd)
        x[..., i] = 1.0                                              # the vector (1, 0) in the (i, i + hd/2) plane
        y = apply_rope(x, cos[pos], sin[pos])[0, 0]                  # (len(pos), hd), the real rotation
        pts = y[:, [i, i + hd // 2]]
        ax.add_patch(plt.Circle((0, 0), 1, fill=False, color=GREY, ls=":"))
        for k, p in enumerate(pos):
            ax.annotate("", xy=(float(pts[k, 0]), float(pts[k, 1])), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="-|>", color=plt.cm.viridis(k / len(pos)), lw=1.2))
            ax.text(1.12 * float(pts[k, 0]), 1.12 * float(pts[k, 1]), str(p), fontsize=7, ha="center", va="center")
        theta = 1.0 / cfg.rope_theta ** (2 * i / hd)
        ax.set_title(f"pair {i}: angle = position x {theta:.3g} rad\n(positions {pos[0]}, {pos[1]}, ..., {pos[-1]})",
                     fontsize=9)
        ax.set_xlim(-1.3, 1.3)
        ax.set_ylim(-1.3, 1.3)
        ax.set_aspect("equal")
        ax.set_xlabel(f"component {i}")
        ax.set_ylabel(f"component {i + hd // 2}")
    fig.suptitle(f"RoPE (rotate-half) turns each (x_i, x_(i+hd/2)) pair by an angle proportional to the position "
                 f"(`tiny`: head size {hd}, theta {cfg.rope_theta:g}); from model.apply_rope", fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir, "rope_rotation.png")


def fig_gqa(out_dir: Path) -> Path:
    fig, axes = plt.subplots(2, 1, figsize=(10, 4.6))
    for ax, preset in zip(axes, ("tiny", "small")):
        cfg = get_config(preset)
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = cfg.hidden_size // nh
        group = nh // nkv
        colors = plt.cm.Set2.colors
        ax.set_xlim(-0.5, nh + 0.5)
        ax.set_ylim(-0.3, 2.6)
        ax.axis("off")
        for h in range(nh):
            g = h // group   # the same rule as repeat_interleave / enable_gqa: head h reads k/v head h // group
            box(ax, h + 0.05, 1.7, 0.9, 0.6, f"q{h}", colors[g % len(colors)], textcolor="black")
            kx = g * group + (group - 1) / 2
            arrow(ax, h + 0.5, 1.7, kx + 0.5, 0.85, color=GREY)
        for g in range(nkv):
            kx = g * group + (group - 1) / 2
            box(ax, kx + 0.05, 0.2, 0.9, 0.6, f"k{g},v{g}", colors[g % len(colors)], textcolor="black")
        ax.text(-0.45, 2.45, f"`{preset}`: {nh} query heads share {nkv} key/value heads ({group} per group), "
                f"head size {hd}; k_proj/v_proj are [{nkv * hd}, {cfg.hidden_size}] instead of "
                f"[{nh * hd}, {cfg.hidden_size}]", fontsize=8.5)
    fig.tight_layout()
    return save(fig, out_dir, "gqa_heads.png")


# ----------------------------------------------------------------------------- results from out/

def fig_loss_curves(out_dir: Path, save_dir: Path, hidden_size: int | None = None) -> Path | None:
    """One panel per run in {save_dir}/*_log.csv (only the runs of ``hidden_size`` when given)."""
    runs = []
    pattern = f"*_{hidden_size}_log.csv" if hidden_size else "*_log.csv"
    for path in sorted(save_dir.glob(pattern)):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]
        val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r.get("val_loss")]
        if train or val:
            runs.append((path.name[: -len("_log.csv")], train, val))
    if not runs:
        print(f"no {save_dir.name}/*_log.csv yet: loss curves skipped (run scripts/run_pipeline.py first)")
        return None
    order = {"pretrain": 0, "full_sft": 1, "lora_identity": 2, "lora_medical": 3}
    runs.sort(key=lambda r: (order.get(r[0].rsplit("_", 1)[0], 9), r[0]))
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), squeeze=False)
    for ax, (name, train, val) in zip(axes[0], runs):
        if train:
            ax.plot(*zip(*train), lw=1.2, label="train")
        if val:
            ax.plot(*zip(*val), "o-", ms=3, lw=1.2, label="val")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("cross-entropy loss")
    fig.suptitle(f"loss curves from {save_dir.name}/*_log.csv", fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir, "loss_curves.png")


def copy_results(out_dir: Path, save_dir: Path) -> list[Path]:
    copied = []
    for name in ("eval_chart.png",):
        src = save_dir / name
        if src.exists():
            shutil.copyfile(src, out_dir / name)
            print(f"copied {shown(src)} -> {shown(out_dir / name)}")
            copied.append(out_dir / name)
        else:
            print(f"no {src.name} in {save_dir.name}/ yet: not copied (run scripts/run_pipeline.py first)")
    return copied


FIGURES = {"lora": fig_lora_branch, "mask": fig_attention_mask, "lr": fig_lr_schedule,
           "rope": fig_rope, "gqa": fig_gqa}


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw the docs' diagrams into docs/images/ (and copy result charts from out/).")
    p.add_argument("--only", default="", help=f"comma list of {','.join(FIGURES)},loss,results (default: all)")
    p.add_argument("--out_dir", default=IMAGES, help="where the PNGs go (default: docs/images)")
    p.add_argument("--save_dir", default="out", help="where training logs and the evaluation chart are read from")
    p.add_argument("--hidden_size", type=int, default=None,
                   help="loss curves of this model width only, e.g. 192 for the tiny preset (default: every *_log.csv)")
    args = p.parse_args(argv)
    out_dir, save_dir = repo_path(args.out_dir), repo_path(args.save_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()] or [*FIGURES, "loss", "results"]
    torch.set_num_threads(1)
    written = []
    for name in wanted:
        if name in FIGURES:
            written.append(FIGURES[name](out_dir))
        elif name == "loss":
            written.append(fig_loss_curves(out_dir, save_dir, args.hidden_size))
        elif name == "results":
            written += copy_results(out_dir, save_dir)
        else:
            p.error(f"--only: unknown figure {name!r}")
    return [w for w in written if w is not None]


if __name__ == "__main__":
    run_main(main)
