"""Score a TinyMind checkpoint, with or without LoRA adapters, on the held-out sets in dataset/eval/.

What it measures (every prompt here is absent from every training file):
- general QA accuracy: a reply is correct when it contains one of the item's answer keywords;
  reported overall and per subset ("kind"), e.g. held-out phrasings vs facts seen only in pretraining;
- identity: the share of replies naming the base persona and the share naming the new one;
- medical QA accuracy: the same keyword rule on questions about the conditions in lora_medical;
- held-out loss / perplexity: teacher-forced loss on the reference replies of all three sets.

Replies come from batched greedy decoding (left-padded prompts, one KV cache per batch), so a full
evaluation of the `tiny` preset takes seconds, not minutes.

    python scripts/evaluate.py --weight full_sft                                # SFT alone
    python scripts/evaluate.py --weight full_sft --lora_weight lora_identity    # with one adapter
    python scripts/evaluate.py --weight full_sft --compare 1                    # SFT, +identity, +medical, +both
    python scripts/evaluate.py --weight full_sft --compare 1 --device cuda      # on a GPU

`--compare 1` writes out/eval_report.json, out/eval_report.md and out/eval_chart.png.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import torch

from model.common import (TinyMindError, atomic_write, atomic_write_text, find_checkpoint, repo_path, run_main,
                          setup_device)

EVAL_SETS = ("general_qa", "identity", "medical_qa")
# The four variants the README compares: (label, adapters active).
COMPARE = (("SFT", ()), ("+identity", ("lora_identity",)), ("+medical", ("lora_medical",)),
           ("+both", ("lora_identity", "lora_medical")))


# ----------------------------------------------------------------------------- data

def load_eval_sets(eval_dir) -> dict[str, list[dict]]:
    """Read dataset/eval/{general_qa,identity,medical_qa}.jsonl; a missing set is skipped."""
    eval_dir = repo_path(eval_dir)
    sets = {}
    for name in EVAL_SETS:
        path = eval_dir / f"{name}.jsonl"
        if not path.exists():
            continue
        items = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise TinyMindError(f"{path} line {n}: malformed JSON ({e.msg})") from None
            if "question" not in item:
                raise TinyMindError(f"{path} line {n}: missing key 'question'")
            items.append(item)
        sets[name] = items
    if not sets:
        raise TinyMindError(f"no evaluation sets ({', '.join(EVAL_SETS)}.jsonl) found in {eval_dir}")
    return sets


def messages_for(item: dict) -> list[dict]:
    msgs = [{"role": "system", "content": item["system"]}] if item.get("system") else []
    return msgs + [{"role": "user", "content": item["question"]}]


def reference_reply(item: dict) -> str | None:
    """The reply used for the teacher-forced loss: an explicit reference, else the first answer."""
    if item.get("reference"):
        return item["reference"]
    if item.get("answers"):
        return item["answers"][0]
    return None  # identity items have no single right reply


# ----------------------------------------------------------------------------- scoring

def contains_any(reply: str, keys) -> bool:
    reply = reply.lower()
    return any(k.lower() in reply for k in keys)


def score_qa(items: list[dict], replies: list[str]) -> dict:
    """Keyword accuracy, overall and per subset ("kind")."""
    hits = [contains_any(r, it["answers"]) for it, r in zip(items, replies)]
    by_kind: dict[str, list[bool]] = {}
    for it, h in zip(items, hits):
        by_kind.setdefault(it.get("kind", "all"), []).append(h)
    return {"accuracy": sum(hits) / max(1, len(hits)), "n": len(hits),
            "by_kind": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_kind.items())}}


def score_identity(items: list[dict], replies: list[str]) -> dict:
    """Share of replies that name the base persona, and the share that name the new one."""
    base = [contains_any(r, it.get("base_names", [])) for it, r in zip(items, replies)]
    new = [contains_any(r, it.get("new_names", [])) for it, r in zip(items, replies)]
    n = max(1, len(replies))
    return {"base_share": sum(base) / n, "new_share": sum(new) / n, "n": len(replies)}


# ----------------------------------------------------------------------------- model side

@torch.inference_mode()
def generate_replies(model, tok, items, device, batch_size=32, max_new_tokens=48) -> list[str]:
    """Batched greedy decoding. Prompts are sorted by length so each batch pads little."""
    prompts = [tok.encode(tok.apply_chat_template(messages_for(it), add_generation_prompt=True))
               for it in items]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        longest = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), longest), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every prompt ends at the last column
            ids[row, longest - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, longest - len(prompts[i]):] = 1
        out = model.generate(ids.to(device), max_new_tokens=max_new_tokens, temperature=0.0,
                             eos_token_id=tok.eos_id, attention_mask=mask.to(device))
        for row, i in enumerate(idx):
            new = out[row, longest:].tolist()
            if tok.eos_id in new:
                new = new[:new.index(tok.eos_id)]
            replies[i] = tok.decode(new, skip_special_tokens=True).strip()
    return replies


@torch.inference_mode()
def heldout_loss(model, tok, items, device, batch_size=32) -> dict:
    """Mean teacher-forced loss over the reference reply tokens (and <|im_end|>) of every item."""
    seqs = []
    for it in items:
        ref = reference_reply(it)
        if ref is None:
            continue
        prompt = tok.encode(tok.apply_chat_template(messages_for(it), add_generation_prompt=True))
        reply = tok.encode(ref) + [tok.eos_id]
        seqs.append((prompt + reply, [-100] * len(prompt) + reply))
    total, count = 0.0, 0
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        T = max(len(x) for x, _ in chunk)
        ids = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), T), -100, dtype=torch.long)
        for row, (x, y) in enumerate(chunk):  # right padding is fine for a causal loss
            ids[row, :len(x)], labels[row, :len(y)] = torch.tensor(x), torch.tensor(y)
        n = int((labels[:, 1:] != -100).sum())
        loss = model(ids.to(device), labels=labels.to(device)).loss
        total, count = total + float(loss) * n, count + n
    mean = total / max(1, count)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}


def evaluate_model(model, tok, sets, device, batch_size=32, max_new_tokens=48, keep_replies=False) -> dict:
    """Score one model (whatever adapters are active) on every loaded set."""
    result, all_items = {}, []
    for name, items in sets.items():
        replies = generate_replies(model, tok, items, device, batch_size, max_new_tokens)
        score = score_identity(items, replies) if name == "identity" else score_qa(items, replies)
        if keep_replies:
            score["replies"] = [{"question": it["question"], "reply": r} for it, r in zip(items, replies)]
        result[name] = score
        all_items += items
    result["heldout"] = heldout_loss(model, tok, all_items, device, batch_size)
    return result


# ----------------------------------------------------------------------------- report

def summary_row(label: str, res: dict) -> dict:
    g, i, m = res.get("general_qa", {}), res.get("identity", {}), res.get("medical_qa", {})
    return {"variant": label, "general_qa": g.get("accuracy"), "identity_new": i.get("new_share"),
            "identity_base": i.get("base_share"), "medical_qa": m.get("accuracy"),
            "heldout_loss": res["heldout"]["loss"], "heldout_ppl": res["heldout"]["ppl"]}


def markdown_table(rows: list[dict]) -> str:
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"
    lines = ["| variant | general QA | identity: new persona | identity: base persona | medical QA | held-out loss (ppl) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {pct(r['general_qa'])} | {pct(r['identity_new'])} | "
                     f"{pct(r['identity_base'])} | {pct(r['medical_qa'])} | "
                     f"{r['heldout_loss']:.3f} ({r['heldout_ppl']:.2f}) |")
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
    atomic_write_text(paths["md"], f"{markdown_table(rows)}\n\n{meta['machine']}; `{meta['command']}`; {meta['date']}\n")
    bar_chart(rows, paths["png"], f"TinyMind held-out evaluation ({meta['weight']}, {meta['date']})")
    return paths


# ----------------------------------------------------------------------------- CLI

def build_parser():
    p = argparse.ArgumentParser(description="Score a TinyMind checkpoint (and LoRA adapters) on dataset/eval/.")
    p.add_argument("--weight", default="full_sft", help="base checkpoint name: reads {save_dir}/{weight}_{hidden}.pth")
    p.add_argument("--lora_weight", default="", help="LoRA name(s), comma-separated, all active together")
    p.add_argument("--compare", type=int, default=0,
                   help="1: score SFT alone, +lora_identity, +lora_medical and both, and write the report files")
    p.add_argument("--save_dir", default="out", help="folder with checkpoints and LoRA files; reports go here too")
    p.add_argument("--hidden_size", type=int, default=None, help="picks the file name; default: the only one present")
    p.add_argument("--eval_dir", default="dataset/eval", help="folder with general_qa/identity/medical_qa.jsonl")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--batch_size", type=int, default=64, help="prompts decoded together")
    p.add_argument("--max_new_tokens", type=int, default=48, help="reply length cap (answers are short)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N items of each set (0 = all)")
    p.add_argument("--show", type=int, default=0, help="print N example replies per set")
    p.add_argument("--out", default="", help="also write the full result JSON (with replies) here")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from model.model import load_model
    from model.model_lora import load_lora, set_active_adapters
    from model.tokenizer import load_tokenizer

    # Scores are computed in fp32 on every device, so they compare across machines.
    device = setup_device(args.device, "float32", log=False, inference=True).device
    save_dir = repo_path(args.save_dir)
    sets = load_eval_sets(args.eval_dir)
    if args.limit:
        sets = {k: v[:args.limit] for k, v in sets.items()}
    ckpt_path = find_checkpoint(save_dir, args.weight, args.hidden_size)
    model, ckpt = load_model(ckpt_path, device=device)
    model.eval()
    hidden = model.config.hidden_size
    tok = load_tokenizer()

    if args.compare:
        variants = [(label, names) for label, names in COMPARE
                    if all(find_checkpoint(save_dir, n, hidden, missing_ok=True) for n in names)]
    else:
        names = tuple(n.strip() for n in args.lora_weight.split(",") if n.strip())
        variants = [("+" + "+".join(names) if names else args.weight, names)]
    loaded = set()
    for _, names in variants:
        for n in names:
            if n not in loaded:
                load_lora(model, find_checkpoint(save_dir, n, hidden, what="LoRA file"), adapter_name=n)
                loaded.add(n)
    model.eval()

    rows, results = [], {}
    for label, names in variants:
        if loaded:
            set_active_adapters(model, list(names) if names else None)
        t0 = time.time()
        res = evaluate_model(model, tok, sets, device, args.batch_size, args.max_new_tokens,
                             keep_replies=bool(args.out or args.show))
        res["seconds"] = round(time.time() - t0, 1)
        results[label], row = res, summary_row(label, res)
        rows.append(row)
        print(f"[eval] {label:<10} general {row['general_qa'] or 0:.3f}  identity new/base "
              f"{row['identity_new'] or 0:.3f}/{row['identity_base'] or 0:.3f}  medical {row['medical_qa'] or 0:.3f}"
              f"  held-out loss {row['heldout_loss']:.3f}  ({res['seconds']}s)", flush=True)
        for name in sets:
            for ex in res[name].get("replies", [])[:args.show]:
                print(f"    [{name}] {ex['question']} -> {ex['reply']}")
    print(markdown_table(rows))
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
