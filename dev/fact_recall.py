"""Does a checkpoint know the demo world's facts as plain text, before any question is asked?

General QA asks two kinds of facts (dataset/eval/general_qa.jsonl): facts the SFT data teaches as
question and answer (asked here in held-out phrasings), and facts stated only in the pretraining text.
A chat model can only answer the second kind if pretraining stored them. This script measures that
storage directly, with no chat template and no generation: for every person fact of the demo world
(dataset/demo/world.py, the seed that wrote the shipped files) and every pretraining statement phrasing
whose value comes last ("{s}的家乡是{v}。"), it feeds the sentence and checks whether the model's top
prediction at each position of the value is the value's own token (teacher forcing). A fact counts as
recalled when its value is predicted in full in at least one phrasing.

    python dev/fact_recall.py --weight pretrain          # out/pretrain_*.pth
    python dev/fact_recall.py --weight full_sft --save_dir out

It prints the share of facts recalled per split (train: the SFT data asks them; pretrain_only: only
pretraining states them) and per attribute.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import torch

from dataset.demo.world import build_world
from model.common import run_main
from model.engine import load_base
from model.tokenizer import load_tokenizer
from tools.cli import add_model_flags

DATA_SEED = 42   # dataset/demo/make_demo_data.py's default: the world of the shipped files


def value_last_prompts(fact) -> list[tuple[str, str]]:
    """(prefix, value) for each pretraining phrasing of ``fact`` that ends with its value and a full stop."""
    value = fact.render("{v}")
    pairs = []
    for template in fact.attr.statements:
        text = fact.render(template)
        if text.endswith(value + "。") and len(text) > len(value) + 1:
            pairs.append((text[:-len(value) - 1], value))
    return pairs


def value_span(tok, prefix: str, value: str) -> tuple[list[int], int] | None:
    """Token ids of ``<bos> prefix value`` and the index of the value's first token, or None where the
    tokenizer merges across the boundary (then the value has no tokens of its own to predict)."""
    ids = [tok.bos_id, *tok.encode(prefix + value)]
    head = [tok.bos_id, *tok.encode(prefix)]
    if ids[:len(head)] != head or len(ids) == len(head):
        return None
    return ids, len(head)


@torch.no_grad()
def recalled(model, ids: list[int], start: int) -> bool:
    """Whether the model's argmax predicts every token of ``ids[start:]`` from the tokens before it."""
    logits = model(torch.tensor([ids])).logits[0]
    predicted = logits[start - 1:len(ids) - 1].argmax(-1)
    return bool(torch.equal(predicted, torch.tensor(ids[start:])))


def recall_table(model, tok, facts) -> dict:
    """{"split": {split: (recalled, total)}, "attr": {(split, attr label): (recalled, total)}} over the
    facts that have at least one testable phrasing."""
    hits = defaultdict(lambda: [0, 0])
    for fact in facts:
        spans = [s for s in (value_span(tok, p, v) for p, v in value_last_prompts(fact)) if s]
        if not spans:
            continue
        ok = any(recalled(model, ids, start) for ids, start in spans)
        for key in (("split", fact.split), ("attr", (fact.split, fact.attr.label))):
            hits[key][0] += ok
            hits[key][1] += 1
    table = {"split": {}, "attr": {}}
    for (kind, key), (n_ok, n) in sorted(hits.items(), key=lambda kv: str(kv[0])):
        table[kind][key] = (n_ok, n)
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure which facts of the demo world a checkpoint completes "
                                            "as plain text (teacher forcing, no chat template).")
    add_model_flags(p, "weight", "save_dir", "hidden_size", "tokenizer_path", defaults={"weight": "pretrain"})
    args = p.parse_args(argv)
    model, _, path = load_base(args.save_dir, args.weight, args.hidden_size)
    facts = [f for f in build_world(DATA_SEED).facts if f.category == "person"]
    table = recall_table(model, load_tokenizer(args.tokenizer_path), facts)
    print(f"{path.name}: person facts whose value the model predicts after a pretraining phrasing")
    print("| split | attribute | recalled |")
    print("| --- | --- | --- |")
    for split, (n_ok, n) in table["split"].items():
        print(f"| {split} | all | {n_ok}/{n} ({n_ok / n:.0%}) |")
    for (split, label), (n_ok, n) in table["attr"].items():
        print(f"| {split} | {label} | {n_ok}/{n} ({n_ok / n:.0%}) |")
    return table


if __name__ == "__main__":
    run_main(main)
