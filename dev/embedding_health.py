"""Are the token embeddings a LoRA will need distinct, or collapsed onto each other?

A token the base model seldom predicts ends up with an embedding row that points where every other
rare token points: at each position the softmax pushes all unlikely tokens the same way, and a rare
token is almost never pulled back as the target. TinyMind ties the input embedding to ``lm_head`` and
LoRA freezes both, so an adapter can neither tell such tokens apart as input nor write a particular
one. This script measures that for the words the demo LoRAs need.

For each group of words (condition names, departments, symptom words, the LoRA persona, and common
words of the demo world as a reference) it tokenizes the words, and for each of their token ids finds
the largest cosine similarity between its embedding row and any other row. It prints the median of
those, and the share above 0.95 (collapsed).

    python dev/embedding_health.py                          # out/full_sft_*.pth
    python dev/embedding_health.py --weight pretrain
    python dev/embedding_health.py --out docs/results/embedding_health_full_sft.json   # also as JSON

The JSON holds the rows (each with a short ``id``: conditions, departments, symptoms, persona, reference),
the checkpoint's name and fingerprint, the command and the date; the docs quote it (dev/doc_numbers.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import torch

from dataset.demo import world_chat as C
from dataset.demo import world_medical as M
from model.common import atomic_write_text, run_main
from model.engine import load_base
from model.model import state_fingerprint
from model.tokenizer import load_tokenizer
from tools.cli import add_model_flags

COLLAPSED = 0.95


# group name -> the short id its JSON row carries
GROUP_IDS = {"condition names": "conditions", "departments": "departments", "symptom words": "symptoms",
             "LoRA persona": "persona", "reference: common words": "reference"}


def word_groups() -> dict[str, list[str]]:
    conditions = M.CONDITIONS.values()
    return {
        "condition names": sorted(M.CONDITIONS),
        "departments": sorted({dept for dept, *_ in conditions}),
        "symptom words": sorted({s for _, symptoms, _, _ in conditions for s in symptoms}),
        "LoRA persona": [C.LORA_PERSONA["name"], C.LORA_PERSONA["maker"]],
        "reference: common words": ["职业", "家乡", "老师", "司机", "南京", "西安", "苹果", "春天", "我是", "名字"],
    }


def max_cosine(embedding: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """For each id, the largest cosine similarity of its row to any other row of ``embedding`` (V, d)."""
    unit = torch.nn.functional.normalize(embedding.float(), dim=-1)
    sims = unit[ids] @ unit.T                                # (len(ids), V)
    sims[torch.arange(len(ids)), torch.tensor(ids)] = -1.0   # not itself
    return sims.max(dim=-1).values


def health_table(model, tokenizer, groups: dict[str, list[str]]) -> list[dict]:
    embedding = model.model.embed_tokens.weight.detach()   # (V, d), also lm_head.weight (tied)
    rows = []
    for name, words in groups.items():
        ids = sorted({i for w in words for i in tokenizer.encode(w)})
        cos = max_cosine(embedding, ids)
        rows.append({"id": GROUP_IDS.get(name, name), "group": name, "words": len(words), "tokens": len(ids),
                     "median_max_cos": cos.median().item(), "collapsed": (cos > COLLAPSED).float().mean().item()})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure how distinct the embeddings of the LoRA words are.")
    add_model_flags(p, "weight", "save_dir", "hidden_size", "tokenizer_path", defaults={"weight": "full_sft"})
    p.add_argument("--out", default="", help="also write the table, the checkpoint and the command as JSON here")
    args = p.parse_args(argv)
    model, _, path = load_base(args.save_dir, args.weight, args.hidden_size)
    rows = health_table(model, load_tokenizer(args.tokenizer_path), word_groups())
    if args.out:
        command = "python dev/embedding_health.py " + " ".join(argv if argv is not None else sys.argv[1:])
        atomic_write_text(args.out, json.dumps({
            "checkpoint": path.name, "fingerprint": state_fingerprint(model.state_dict()), "command": command,
            "date": time.strftime("%Y-%m-%d"), "rows": rows}, ensure_ascii=False, indent=1) + "\n")
    print(f"{path.name}: largest cosine similarity of each token's embedding to any other token's")
    print("| group | words | tokens | median | collapsed (> 0.95) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['group']} | {r['words']} | {r['tokens']} | {r['median_max_cos']:.2f} | {r['collapsed']:.0%} |")
    return rows


if __name__ == "__main__":
    run_main(main)
