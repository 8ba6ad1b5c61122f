"""Generate TinyMind's shipped demo data: one small, closed world, written out in MiniMind's formats.

The driver of the generator in dataset/demo/; the parts live beside it:

- world.py: ``build_world`` (the people of the demo world, split into a training split and a
  ``pretrain_only`` split whose facts are never asked in SFT; side characters; every fact of people
  and real-world entities), ``plan_questions`` (10 phrasings per attribute, 2 held out for evaluation),
  ``Sizes`` and the helpers every part shares;
- pretrain_text.py: ``make_pretrain``: biographies, person cards, encyclopedia entries, stories,
  dialogues, number facts, hospital vocabulary (no condition names), plain descriptions of the
  condition names (body part and kind of illness, never a department or symptom), and a literacy
  section ("识字") so every character of the chat files also occurs in pretraining;
- sft_chat.py: ``make_sft``: fact Q&A, greetings and small talk, the base persona "TinyMind",
  simple instructions, multi-turn and system-turn conversations, and copy exercises (side characters'
  names, medical words one kind per list, pieces of the LoRA persona);
- lora_eval_sets.py: ``make_lora_identity`` / ``make_lora_medical`` (the new persona of
  world_chat.py and the medical table of world_medical.py, each with replayed general conversations)
  and ``make_eval`` (dataset/eval/: held-out phrasings and facts);
- demo_world.py, world_chat.py, world_medical.py, world_stories.py: the knowledge tables;
- persona_en.py: ``make_identity_en``, the English identity set for a released English-only model
  (``--lang en``: dataset/lora_identity_en.jsonl, nothing else; docs/08-lora-on-real-models.md).

This file: ``generate`` (every file's records in memory, plus the guard that no evaluation prompt
is a training prompt), ``write_all``, ``stats`` (the numbers in dataset/README.md) and ``main``.
What the files may contain where (for example which medical words may stand together before the
LoRA) is checked by tests/test_demo_data.py.

Everything is drawn from ``random.Random`` objects seeded from ``--seed`` and written with sorted
iteration and ``json.dumps(ensure_ascii=False)``, so the same seed gives byte-identical files.

    python dataset/demo/make_demo_data.py                       # writes dataset/*.jsonl and dataset/eval/
    python dataset/demo/make_demo_data.py --seed 7 --out_dir /tmp/demo   # another world, elsewhere
    python dataset/demo/make_demo_data.py --name 小明 --maker 某某实验室   # your own LoRA persona: rewrites
                                        # only dataset/lora_identity.jsonl and dataset/eval/identity.jsonl
    python dataset/demo/make_demo_data.py --lang en --name Nova --maker "Acme Lab"   # the same in English,
                                        # for an English-only released model: only dataset/lora_identity_en.jsonl
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere

import argparse
import gzip
import json
import random
import re
import time
from collections import Counter

from dataset.demo.lora_eval_sets import make_eval, make_lora_identity, make_lora_medical, medical_plan, replay_pool
from dataset.demo.persona_en import english_persona, make_identity_en
from dataset.demo.pretrain_text import make_pretrain
from dataset.demo.sft_chat import identity_prompts, make_sft, persona_convs
from dataset.demo.world import Sizes, build_world
from dataset.demo import world_chat as C
from model.common import TinyMindError, atomic_write_text, repo_path, run_main

FILES = ("pretrain_demo.jsonl", "sft_demo.jsonl", "lora_identity.jsonl", "lora_medical.jsonl",
         "eval/general_qa.jsonl", "eval/identity.jsonl", "eval/medical_qa.jsonl")


# ----------------------------------------------------------------------------- driver

def user_turns(convs: list[dict]) -> set[str]:
    return {m["content"] for c in convs for m in c["conversations"] if m["role"] == "user"}


def chat_text(*sets) -> str:
    parts = []
    for convs in sets:
        for c in convs:
            if "conversations" in c:
                parts += [m["content"] for m in c["conversations"]]
            else:
                parts += [c.get("question", ""), c.get("reference", ""), c.get("system", "")] + c.get("answers", [])
    return "".join(parts)


def generate(seed: int = 42, sizes: Sizes | None = None, persona: dict | None = None) -> dict[str, list[dict]]:
    """Build every file's records in memory: {"pretrain_demo.jsonl": [...], ...}.

    persona: the LoRA persona (``world_chat.lora_persona``); the default is the shipped one. It changes
    only lora_identity.jsonl and eval/identity.jsonl (pretraining and SFT never name it).
    """
    sizes = sizes or Sizes()
    persona = persona or C.LORA_PERSONA
    world = build_world(seed)
    id_train, id_held = identity_prompts(random.Random(f"{seed}-identity"))
    med_plan = medical_plan(random.Random(f"{seed}-medical-plan"))
    sft = make_sft(random.Random(f"{seed}-sft"), world, sizes, id_train)
    pool = replay_pool(sft)
    lora_id = make_lora_identity(random.Random(f"{seed}-lora-identity"), world, sizes, id_train, pool, persona)
    keep_identity = persona_convs(random.Random(f"{seed}-lora-medical-persona"), C.BASE_PERSONA, id_train,
                                  sizes.medical_persona_replay, sizes.system_share)
    lora_med = make_lora_medical(random.Random(f"{seed}-lora-medical"), sizes, med_plan, pool, keep_identity)
    ev = make_eval(random.Random(f"{seed}-eval"), world, sizes, id_held, med_plan, persona)
    # The literacy section covers the shipped persona's characters, whatever persona is asked for, so
    # a new name or maker never changes pretraining (and the base model trained on it stays valid).
    shipped_id = lora_id if persona is C.LORA_PERSONA else make_lora_identity(
        random.Random(f"{seed}-lora-identity"), world, sizes, id_train, pool)
    pretrain = make_pretrain(random.Random(f"{seed}-pretrain"), world, sizes,
                             chat_text(sft, shipped_id, lora_med, *ev.values()))
    # Guard: no evaluation prompt is a user turn of any training file.
    prompts = user_turns(sft) | user_turns(lora_id) | user_turns(lora_med)
    for name, items in ev.items():
        clash = [it["question"] for it in items if it["question"] in prompts]
        if clash:
            raise RuntimeError(f"eval/{name}: {len(clash)} prompts also in training data, e.g. {clash[0]}")
    return {"pretrain_demo.jsonl": pretrain, "sft_demo.jsonl": sft, "lora_identity.jsonl": lora_id,
            "lora_medical.jsonl": lora_med, "eval/general_qa.jsonl": ev["general_qa"],
            "eval/identity.jsonl": ev["identity"], "eval/medical_qa.jsonl": ev["medical_qa"]}


def write_all(records: dict, out_dir: Path, files=FILES) -> None:
    """Write ``files`` (paths relative to ``out_dir``), each atomically: a crash leaves the old file."""
    for rel in files:
        text = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records[rel])
        atomic_write_text(out_dir / rel, text)


def stats(out_dir: Path, files=FILES) -> list[dict]:
    """Sizes and counts of the written files (what dataset/README.md reports)."""
    rows = []
    for rel in files:
        path = out_dir / rel
        raw = path.read_bytes()
        recs = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
        row = {"file": rel, "bytes": len(raw), "lines": len(recs)}
        if "text" in recs[0]:
            text = "\n".join(r["text"] for r in recs)
            sentences = {s for s in re.split(r"[。！？\n]", text) if s.strip()}
            row.update(chars=len(text), distinct_chars=len(set(text)), distinct_sentences=len(sentences),
                       gzip_ratio=round(len(raw) / len(gzip.compress(raw, 9, mtime=0)), 2))
        elif "conversations" in recs[0]:
            msgs = [m for r in recs for m in r["conversations"]]
            row.update(turns=len(msgs), chars=sum(len(m["content"]) for m in msgs),
                       multi_turn=sum(1 for r in recs if sum(m["role"] == "user" for m in r["conversations"]) > 1),
                       with_system=sum(1 for r in recs if r["conversations"][0]["role"] == "system"))
        else:
            row.update(kinds=dict(sorted(Counter(r["kind"] for r in recs).items())))
        rows.append(row)
    return rows


IDENTITY_FILES = ("lora_identity.jsonl", "eval/identity.jsonl")
ENGLISH_FILE = "lora_identity_en.jsonl"


def check_persona(name: str | None, maker: str | None, lang: str = "zh") -> dict:
    """The persona asked for by --name / --maker, or a TinyMindError saying what is wrong with it."""
    base = C.BASE_PERSONA
    for flag, value in (("--name", name), ("--maker", maker)):
        if value is not None and (not value.strip() or value != value.strip() or "\n" in value):
            raise TinyMindError(f"{flag} {value!r}: give a non-empty word without surrounding spaces")
        if lang == "en":   # the base is a released model with its own name, not TinyMind
            continue
        if value is not None and (base["name"].lower() in value.lower() or value.lower() in base["name"].lower()):
            raise TinyMindError(f"{flag} {value}: must differ from the base persona {base['name']} "
                                "(the evaluation tells the two apart by name)")
    return english_persona(name, maker) if lang == "en" else C.lora_persona(name, maker)


def rare_characters(text: str, pretrain: list[dict], need: int) -> str:
    """Characters of ``text`` that pretraining has fewer than ``need`` times (their embeddings are weak)."""
    counts = Counter("".join(r["text"] for r in pretrain))
    return "".join(sorted({c for c in text if not c.isascii() and counts[c] < need}))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate the TinyMind demo datasets (deterministic per seed).")
    parser.add_argument("--seed", type=int, default=42, help="random seed; the same seed gives byte-identical files")
    parser.add_argument("--out_dir", default="dataset", help="output folder (relative paths resolve from the repo root)")
    parser.add_argument("--no_stats", action="store_true", help="skip the size/count report at the end")
    parser.add_argument("--name", default=None,
                        help="your own LoRA persona's name (e.g. 小明): rewrites only lora_identity.jsonl and "
                             "eval/identity.jsonl; pretraining and SFT stay as they are (default: 知微)")
    parser.add_argument("--maker", default=None,
                        help="your own LoRA persona's maker (e.g. 某某实验室), used like --name (default: 青禾实验室; "
                             "with --lang en: Maple Lab)")
    parser.add_argument("--lang", default="zh", choices=["zh", "en"],
                        help="zh: the Chinese demo files; en: only the English identity set "
                             f"{ENGLISH_FILE} for an English-only released model, persona --name / --maker "
                             "(default name Juniper) (default: zh)")
    args = parser.parse_args(argv)
    out_dir = repo_path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TinyMindError(f"--out_dir {args.out_dir} exists and is not a folder")
    if args.lang == "en":
        return write_english(args, out_dir)
    custom = args.name is not None or args.maker is not None
    persona = check_persona(args.name, args.maker) if custom else None
    t0 = time.time()
    records = generate(args.seed, persona=persona)
    files = IDENTITY_FILES if custom else FILES
    write_all(records, out_dir, files)
    print(f"wrote {len(files)} files to {out_dir} in {time.time() - t0:.1f}s (seed {args.seed})")
    if custom:
        print(f"LoRA persona: {persona['name']}, made by {persona['maker']}; "
              + ", ".join(str(out_dir / f) for f in files))
        rare = rare_characters(persona["name"] + persona["maker"], records["pretrain_demo.jsonl"],
                               Sizes().min_char_count)
        if rare:
            print(f"note: pretraining seldom or never contains {rare}: the base model's embeddings of these "
                  "characters are weak, so the adapter may write them wrongly")
    if not args.no_stats:
        for row in stats(out_dir, files):
            print(json.dumps(row, ensure_ascii=False))
    return records


def write_english(args, out_dir: Path) -> dict:
    """--lang en: the English identity set alone (dataset/demo/persona_en.py)."""
    persona = check_persona(args.name, args.maker, "en")
    records = {ENGLISH_FILE: make_identity_en(args.seed, persona)}
    write_all(records, out_dir, (ENGLISH_FILE,))
    print(f"LoRA persona: {persona['name']}, made by {persona['maker']}; wrote {out_dir / ENGLISH_FILE} "
          f"({len(records[ENGLISH_FILE])} conversations, seed {args.seed})")
    if not args.no_stats:
        for row in stats(out_dir, (ENGLISH_FILE,)):
            print(json.dumps(row, ensure_ascii=False))
    return records


if __name__ == "__main__":
    run_main(main)
