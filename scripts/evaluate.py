"""Score a TinyMind checkpoint, with or without LoRA adapters, on the held-out sets in dataset/eval/.

What it measures (every prompt here is absent from every training file):
- general QA accuracy: a reply is correct when it contains one of the item's answer keywords;
  reported overall and per subset ("kind"), e.g. held-out phrasings vs facts seen only in pretraining;
- identity: the share of replies naming the base persona and the share naming the new one;
- medical QA accuracy: the same keyword rule on questions about the conditions in lora_medical,
  overall and per kind (which department to see, which symptoms to expect: the targets name them apart);
- held-out loss / perplexity: teacher-forced loss on the reference replies of all three sets.

Replies come from batched greedy decoding (left-padded prompts, one KV cache per batch), so a full
evaluation of the `tiny` preset takes seconds, not minutes. The scoring itself is tools/scoring.py; this
file is the command: which variants to score, the printed lines, and the report files.

    python scripts/evaluate.py --weight full_sft                                # SFT alone
    python scripts/evaluate.py --weight full_sft --lora_weight lora_identity    # with one adapter
    python scripts/evaluate.py --weight full_sft --compare 1                    # SFT, +identity, +medical, +both
    python scripts/evaluate.py --weight full_sft --compare 1 --device cuda      # on a GPU

`--compare 1` writes out/eval_report.json, out/eval_report.md (the table of every variant, then the
accuracy per kind of question) and out/eval_chart.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import torch

from model.common import atomic_write, atomic_write_text, repo_path, run_main, setup_device
from model.engine import load_base
from model.tokenizer import load_model_tokenizer
from tools.cli import add_model_flags, lora_names
from tools.scoring import compare_variants, each_variant, evaluate_model, load_eval_sets

# The sets whose accuracy is also reported per kind of question, and their short names in the kind table.
KIND_SETS = (("general_qa", "general"), ("medical_qa", "medical"))


# ----------------------------------------------------------------------------- report

def summary_row(label: str, res: dict) -> dict:
    g, i, m = res.get("general_qa", {}), res.get("identity", {}), res.get("medical_qa", {})
    return {"variant": label, "general_qa": g.get("accuracy"), "identity_new": i.get("new_share"),
            "identity_base": i.get("base_share"), "medical_qa": m.get("accuracy"),
            "heldout_loss": res["heldout"]["loss"], "heldout_ppl": res["heldout"]["ppl"],
            "general_qa_by_kind": g.get("by_kind"), "medical_qa_by_kind": m.get("by_kind")}


def heldout_text(row: dict) -> str:
    """"1.234 (3.43)", or "—" for a set without reference replies."""
    return "—" if row["heldout_loss"] is None else f"{row['heldout_loss']:.3f} ({row['heldout_ppl']:.2f})"


def markdown_table(rows: list[dict]) -> str:
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"
    lines = ["| variant | general QA | identity: new persona | identity: base persona | medical QA | held-out loss (ppl) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {pct(r['general_qa'])} | {pct(r['identity_new'])} | "
                     f"{pct(r['identity_base'])} | {pct(r['medical_qa'])} | "
                     f"{heldout_text(r)} |")
    return "\n".join(lines)


def kind_table(rows: list[dict]) -> str:
    """Accuracy per kind of question, one column per (set, kind), e.g. ``medical: medical_symptom (62)``;
    a set without kinds (one "all") adds no column. Empty when no row has any."""
    columns = {}   # (set, kind) -> number of questions, in the order first seen
    for r in rows:
        for key, _ in KIND_SETS:
            kinds = r.get(f"{key}_by_kind") or {}
            if set(kinds) != {"all"}:
                for kind, k in kinds.items():
                    columns.setdefault((key, kind), k["n"])
    if not columns:
        return ""
    short = dict(KIND_SETS)
    lines = ["| variant | " + " | ".join(f"{short[key]}: {kind} ({n})" for (key, kind), n in columns.items()) + " |",
             "| --- |" + " --- |" * len(columns)]
    for r in rows:
        cells = []
        for key, kind in columns:
            acc = ((r.get(f"{key}_by_kind") or {}).get(kind) or {}).get("accuracy")
            cells.append("—" if acc is None else f"{100 * acc:.1f}%")
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("general_qa", "general QA"), ("identity_new", "identity: new persona"),
               ("identity_base", "identity: base persona"), ("medical_qa", "medical QA")]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        xs = [j + (k - (len(rows) - 1) / 2) * width for j in range(len(metrics))]
        vals = [100 * (r[m] or 0.0) for m, _ in metrics]
        bars = ax.bar(xs, vals, width, label=r["variant"])
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(metrics)), [t for _, t in metrics])
    ax.set_ylabel("% of held-out prompts")
    ax.set_ylim(0, 110)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=len(rows))
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def write_report(rows, results, out_dir: Path, meta: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval_report.json", "md": out_dir / "eval_report.md",
             "png": out_dir / "eval_chart.png"}
    atomic_write_text(paths["json"], json.dumps({"meta": meta, "summary": rows, "results": results},
                                                ensure_ascii=False, indent=1))
    tables = "\n\n".join(t for t in (markdown_table(rows), kind_table(rows)) if t)
    atomic_write_text(paths["md"], f"{tables}\n\n{meta['machine']}; `{meta['command']}`; {meta['date']}\n")
    bar_chart(rows, paths["png"], f"TinyMind held-out evaluation ({meta['weight']}, {meta['date']})")
    return paths


# ----------------------------------------------------------------------------- CLI

def build_parser():
    p = argparse.ArgumentParser(description="Score a TinyMind checkpoint (and LoRA adapters) on dataset/eval/.")
    add_model_flags(p, "weight", "lora_weight", "save_dir", "hidden_size", "tokenizer_path", "device",
                    defaults={"lora_weight": ""},
                    helps={"save_dir": "folder with checkpoints and LoRA files; reports go here too"})
    p.add_argument("--compare", type=int, default=0,
                   help="1: score SFT alone, +lora_identity, +lora_medical and both, and write the report files")
    p.add_argument("--eval_dir", default="dataset/eval", help="folder with general_qa/identity/medical_qa.jsonl")
    p.add_argument("--batch_size", type=int, default=64, help="prompts decoded together")
    p.add_argument("--max_new_tokens", type=int, default=48, help="reply length cap (answers are short)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N items of each set (0 = all)")
    p.add_argument("--show", type=int, default=0, help="print N example replies per set")
    p.add_argument("--out", default="", help="also write the full result JSON (with replies) here")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    # Scores are computed in fp32 on every device, so they compare across machines.
    device = setup_device(args.device, "float32", log=False, inference=True).device
    save_dir = repo_path(args.save_dir)
    sets = load_eval_sets(args.eval_dir)
    if args.limit:
        sets = {k: v[:args.limit] for k, v in sets.items()}
    model, _, ckpt_path = load_base(save_dir, args.weight, args.hidden_size, device=device)
    hidden = model.config.hidden_size
    tok = load_model_tokenizer(repo_path(args.tokenizer_path), model.config.vocab_size, ckpt_path.name)

    if args.compare:
        variants = compare_variants(save_dir, hidden)
    else:
        names = tuple(lora_names(args.lora_weight))
        variants = [("+" + "+".join(names) if names else args.weight, names)]

    rows, results = [], {}
    for label, _ in each_variant(model, save_dir, variants):
        t0 = time.time()
        res = evaluate_model(model, tok, sets, device, args.batch_size, args.max_new_tokens,
                             keep_replies=bool(args.out or args.show))
        res["seconds"] = round(time.time() - t0, 1)
        results[label], row = res, summary_row(label, res)
        rows.append(row)
        print(f"[eval] {label:<10} general {row['general_qa'] or 0:.3f}  identity new/base "
              f"{row['identity_new'] or 0:.3f}/{row['identity_base'] or 0:.3f}  medical {row['medical_qa'] or 0:.3f}"
              f"  held-out loss {heldout_text(row)}  ({res['seconds']}s)", flush=True)
        for name in sets:
            for ex in res[name].get("replies", [])[:args.show]:
                print(f"    [{name}] {ex['question']} -> {ex['reply']}")
    print(markdown_table(rows))
    if kind_table(rows):
        print(kind_table(rows))
    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {device.type}, torch {torch.__version__}",
            "command": "python scripts/evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"), "weight": ckpt_path.name, "sets": {k: len(v) for k, v in sets.items()}}
    if args.compare:
        paths = write_report(rows, results, save_dir, meta)
        print(f"[eval] wrote {paths['json']}, {paths['md']}, {paths['png']}")
    if args.out:
        atomic_write_text(repo_path(args.out), json.dumps({"meta": meta, "summary": rows, "results": results},
                                                          ensure_ascii=False, indent=1))
    return {"summary": rows, "results": results, "meta": meta}


if __name__ == "__main__":
    run_main(main)
