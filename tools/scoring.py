"""Scoring a model on the held-out sets in dataset/eval/: what scripts/evaluate.py reports and
dev/lora_experiments.py measures each variant with.

- ``load_eval_sets``: dataset/eval/{general_qa,identity,medical_qa}.jsonl (every prompt there is absent
  from every training file); ``messages_for`` / ``reference_reply``: an item's chat and its reference reply.
- ``score_qa`` (keyword accuracy, overall and per subset) and ``score_identity`` (the shares of replies
  naming the base persona and the new one).
- ``generate_replies``: the greedy replies, batched (``model/engine.py::greedy_replies``).
- ``heldout_loss``: the teacher-forced loss on the reference replies, computed by the training loop's own
  ``trainer/heldout.py::evaluate`` (one definition of a held-out loss: token-weighted mean).
- ``evaluate_model``: all of it for one model, whatever adapters are active.
- ``COMPARE`` / ``compare_variants`` / ``each_variant``: the four variants the reports compare (SFT alone,
  +identity, +medical, +both), which of them a folder has the LoRA files for, and the model answering as
  each in turn: scripts/evaluate.py scores them, tools/spread.py shows their chat replies.
"""
from __future__ import annotations

import json
import math

import torch

from model.common import DeviceContext, TinyMindError, find_checkpoint, repo_path
from model.engine import encode_chat, greedy_replies, load_adapters
from model.lora_adapters import set_active_adapters
from trainer.heldout import evaluate

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
    """The reply used for the teacher-forced loss: the item's ``reference`` sentence. None without one
    (identity items have no single right reply; a bare answer word is not a reply the model would give)."""
    return item.get("reference") or None


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

def generate_replies(model, tok, items, batch_size=32, max_new_tokens=48) -> list[str]:
    """Batched greedy replies to every item's chat. Prompts are sorted by length so each batch pads little."""
    prompts = [encode_chat(tok, messages_for(it)) for it in items]
    return greedy_replies(model, tok, prompts, max_new_tokens, batch_size)


def heldout_loss(model, tok, items, device, batch_size=32) -> dict:
    """Mean teacher-forced loss over the reference reply tokens (and <|im_end|>) of every item."""
    seqs = []   # (input ids, labels): the prompt is not scored, the reply and <|im_end|> are
    for it in items:
        ref = reference_reply(it)
        if ref is None:
            continue
        prompt = encode_chat(tok, messages_for(it))
        reply = tok.encode(ref) + [tok.eos_id]
        seqs.append((prompt + reply, [-100] * len(prompt) + reply))

    def right_pad(chunk):   # right padding is fine for a causal loss
        T = max(len(x) for x, _ in chunk)
        ids = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), T), -100, dtype=torch.long)
        for row, (x, y) in enumerate(chunk):
            ids[row, :len(x)], labels[row, :len(y)] = torch.tensor(x), torch.tensor(y)
        return ids, labels

    # the tokens the shifted loss averages over: every label after a sequence's first position
    count = sum(sum(1 for y in labels[1:] if y != -100) for _, labels in seqs)
    if not seqs:   # no reference replies (identity items, hand-written sets): no held-out loss
        return {"loss": None, "ppl": None, "tokens": 0}
    mean = evaluate(model, seqs, right_pad, batch_size, DeviceContext(torch.device(device)))
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}


def evaluate_model(model, tok, sets, device, batch_size=32, max_new_tokens=48, keep_replies=False) -> dict:
    """Score one model (whatever adapters are active) on every loaded set."""
    result, all_items = {}, []
    for name, items in sets.items():
        replies = generate_replies(model, tok, items, batch_size, max_new_tokens)
        score = score_identity(items, replies) if name == "identity" else score_qa(items, replies)
        if keep_replies:
            score["replies"] = [{"question": it["question"], "reply": r} for it, r in zip(items, replies)]
        result[name] = score
        all_items += items
    result["heldout"] = heldout_loss(model, tok, all_items, device, batch_size)
    return result


# ----------------------------------------------------------------------------- the variants

def compare_variants(save_dir, hidden_size: int) -> list[tuple[str, tuple[str, ...]]]:
    """The variants of ``COMPARE`` whose LoRA files ``{save_dir}/{name}_{hidden}.pth`` all exist (SFT always)."""
    return [(label, names) for label, names in COMPARE
            if all(find_checkpoint(save_dir, n, hidden_size, missing_ok=True) for n in names)]


def each_variant(model, save_dir, variants):
    """Yield each (label, adapter names) of ``variants`` with exactly those adapters active, so the loop body
    runs the model as that variant. Every adapter is loaded once, before the first (checked against the
    base by ``load_adapters``); the model is put in eval mode."""
    loaded = list(dict.fromkeys(n for _, names in variants for n in names))   # each adapter once, in order
    load_adapters(model, save_dir, loaded)
    model.eval()
    for label, names in variants:
        if loaded:
            set_active_adapters(model, list(names) if names else None)
        yield label, names
