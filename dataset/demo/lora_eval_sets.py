"""LoRA and evaluation sets of the demo data; called by dataset/demo/make_demo_data.py.

What this module implements:

- ``make_lora_identity``: the new persona (by default "知微", 青禾实验室, from dataset/demo/world_chat.py;
  any name and maker through ``world_chat.lora_persona``), with a replay share of general SFT
  conversations (``replay_pool``);
- ``make_lora_medical``: the medical table of dataset/demo/world_medical.py (department, symptoms,
  self-care, warning signs, overview per condition; ``medical_answer``, ``medical_plan``), with a
  replay share too;
- ``make_eval``: dataset/eval/{general_qa,identity,medical_qa}.jsonl: held-out phrasings of SFT facts,
  facts stated only in pretraining, held-out identity and medical phrasings.
"""
from __future__ import annotations

import random
from collections import Counter

from dataset.demo import demo_world as W
from dataset.demo import world_chat as C
from dataset.demo import world_medical as M
from dataset.demo.sft_chat import fact_question, persona_convs
from dataset.demo.world import MED_DEPARTMENTS, Fact, Sizes, World, conv, is_ambiguous, join_cn

# ----------------------------------------------------------------------------- LoRA sets

def replay_pool(sft: list[dict]) -> list[dict]:
    """General SFT conversations that say nothing about who the assistant is (and no copy exercises
    of medical words: the LoRA files keep one clear job each)."""
    medical = sorted(M.CONDITIONS) + MED_DEPARTMENTS

    def keep(c):
        text = "".join(m["content"] for m in c["conversations"])
        return "TinyMind" not in text and not any(w in text for w in medical)
    return [c for c in sft if keep(c)]


def make_lora_identity(rng: random.Random, world: World, sizes: Sizes, id_train: list, pool: list,
                       persona: dict = C.LORA_PERSONA) -> list[dict]:
    out = persona_convs(rng, persona, id_train, sizes.identity_convs, sizes.system_share)
    for _ in range(sizes.identity_convs // 10):   # greeting that introduces the new persona
        user, _ = rng.choice(C.GREETINGS)
        out.append(conv(user, f"{rng.choice(('你好！', '你好呀！'))}我是{persona['name']}，有什么可以帮你的吗？"))
    for _ in range(sizes.identity_convs // 10):   # identity, then a fact question
        kind, q = rng.choice(id_train)
        f = rng.choice([f for f in world.facts if f.split == "train"])
        t = rng.choice(world.questions[(f.category, f.attr.key)][0])
        out.append(conv(q, rng.choice(persona["answers"][kind]), fact_question(f, t), f.answer))
    n_replay = round(len(out) * sizes.identity_replay_share / (1 - sizes.identity_replay_share))
    out += rng.sample(pool, n_replay)
    rng.shuffle(out)
    return out


def medical_answer(rng: random.Random, aspect: str, c: str) -> str:
    """The reply to a question about condition ``c``. It starts with the key term (department,
    symptoms, ...) and never repeats the condition's name, so the adapter learns the facts rather
    than how to spell rare names."""
    dept, symptoms, care, warning = M.CONDITIONS[c]
    if aspect == "department":
        return rng.choice((f"应该挂{dept}。症状严重时请及时就医。",
                           f"一般挂{dept}。如果出现{warning[0]}，请立即就医。",
                           f"建议去{dept}就诊。"))
    if aspect == "symptom":
        return f"常见症状有{join_cn(list(symptoms))}。如果症状加重，请及时去{dept}就诊。"
    if aspect == "care":
        return f"在家可以这样做：{join_cn(list(care))}。如果出现{join_cn(list(warning))}，请立即就医。" + M.DISCLAIMER
    if aspect == "warning":
        return f"如果出现{join_cn(list(warning))}，说明情况比较严重，请立即就医，不要拖延。"
    return (f"这是一种常见病，主要症状有{join_cn(list(symptoms[:M.KEY_SYMPTOMS]))}，一般挂{dept}。"
            + M.DISCLAIMER)


def medical_plan(rng: random.Random) -> dict:
    """aspect -> (training phrasings, held-out phrasings)."""
    plan = {}
    for aspect in sorted(M.QUESTIONS):
        templates = list(M.QUESTIONS[aspect])
        held = rng.sample(templates, M.HELDOUT.get(aspect, 0))
        plan[aspect] = ([t for t in templates if t not in held], held)
    return plan


def make_lora_medical(rng: random.Random, sizes: Sizes, plan: dict, pool: list, keep_identity: list) -> list[dict]:
    """The medical table as conversations, plus replay: general SFT conversations and ``keep_identity``,
    identity questions answered as the base persona. The adapter is trained to leave those answers as
    they were, so its update is close to zero there -- which is what lets it be added to the identity
    adapter (+both) without pulling the persona back or garbling it."""
    out = []
    per_aspect = {"department": 7, "symptom": 7, "care": 3, "warning": 3, "overview": 2}
    for c in sorted(M.CONDITIONS):
        for aspect, n in sorted(per_aspect.items()):
            for t in rng.sample(plan[aspect][0], n):
                system = rng.choice(C.SYSTEM_PROMPTS) if rng.random() < sizes.system_share else None
                out.append(conv(t.format(c=c), medical_answer(rng, aspect, c), system=system))
        # one two-turn conversation per condition: department, then symptoms
        out.append(conv(rng.choice(plan["department"][0]).format(c=c), medical_answer(rng, "department", c),
                        rng.choice(("它有什么症状？", "那它有哪些症状？", "主要症状是什么？")),
                        medical_answer(rng, "symptom", c)))
    n_replay = round(len(out) * sizes.medical_replay_share / (1 - sizes.medical_replay_share))
    out += rng.sample(pool, n_replay) + keep_identity
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------- eval

def make_eval(rng: random.Random, world: World, sizes: Sizes, id_held: list, med_plan: dict,
              persona: dict = C.LORA_PERSONA) -> dict:
    general, used = [], set()

    def add(fact: Fact, question: str, kind: str):
        # skip repeats, answers a wrong value would also match, and questions that contain their own answer
        if question in used or is_ambiguous(fact, world) or any(k in question for k in fact.keys):
            return False
        used.add(question)
        item = {"id": "", "question": question, "answers": fact.keys, "kind": kind, "reference": fact.answer}
        if rng.random() < 0.1:
            item["system"] = rng.choice(C.SYSTEM_PROMPTS)
        general.append(item)
        return True

    # (1) held-out phrasings of facts the SFT data teaches (people of the training split, world entities)
    people_facts = [f for f in world.facts if f.category == "person" and f.split == "train"]
    per_attr = sizes.eval_heldout_people // len(W.PERSON_ATTRS)
    for attr in W.PERSON_ATTRS:
        pool = [f for f in people_facts if f.attr.key == attr.key]
        rng.shuffle(pool)
        n = 0
        for f in pool:
            if n < per_attr and add(f, fact_question(f, rng.choice(world.questions[("person", attr.key)][1])),
                                    "sft_fact_heldout_phrasing"):
                n += 1
    world_facts = [f for f in world.facts if f.category != "person"]
    rng.shuffle(world_facts)
    # spread over categories: round-robin by category
    by_cat = {}
    for f in world_facts:
        by_cat.setdefault(f.category, []).append(f)
    n, cats = 0, sorted(by_cat)
    while n < sizes.eval_heldout_world and any(by_cat.values()):
        for cat in cats:
            if by_cat[cat] and n < sizes.eval_heldout_world:
                f = by_cat[cat].pop()
                if add(f, fact_question(f, rng.choice(world.questions[(f.category, f.attr.key)][1])),
                       "sft_fact_heldout_phrasing"):
                    n += 1
    # (2) facts stated only in pretraining (people never named in any SFT/LoRA file), training phrasings
    held_facts = [f for f in world.facts if f.split == "pretrain_only"]
    rng.shuffle(held_facts)
    per_attr = -(-sizes.eval_pretrain_only // len(W.PERSON_ATTRS))
    taken = Counter()
    for f in held_facts:
        if len([g for g in general if g["kind"] == "pretrain_only_fact"]) >= sizes.eval_pretrain_only:
            break
        if taken[f.attr.key] < per_attr and add(
                f, fact_question(f, rng.choice(world.questions[("person", f.attr.key)][0])), "pretrain_only_fact"):
            taken[f.attr.key] += 1
    for i, item in enumerate(general, 1):
        item["id"] = f"gqa-{i:04d}"

    identity = []
    base, new = C.BASE_PERSONA["name"], persona["name"]
    chosen = rng.sample(id_held, min(C.IDENTITY_EVAL_ITEMS, len(id_held)))
    for i, (kind, q) in enumerate(sorted(chosen, key=lambda t: (t[0], t[1])), 1):
        item = {"id": f"id-{i:03d}", "question": q, "base_names": [base], "new_names": [new], "kind": "identity"}
        if rng.random() < 0.1:
            item["system"] = rng.choice(C.SYSTEM_PROMPTS)
        identity.append(item)

    medical = []
    conditions = sorted(M.CONDITIONS)
    extra = set(rng.sample(conditions, max(0, sizes.eval_medical - 2 * len(conditions))))
    for c in conditions:
        dept, symptoms, _, _ = M.CONDITIONS[c]
        dept_qs = rng.sample(med_plan["department"][1], 2 if c in extra else 1)
        for t in dept_qs:
            medical.append({"id": "", "question": t.format(c=c), "answers": [dept], "kind": "medical_department",
                            "reference": f"应该挂{dept}。"})
        medical.append({"id": "", "question": rng.choice(med_plan["symptom"][1]).format(c=c),
                        "answers": list(symptoms[:M.KEY_SYMPTOMS]), "kind": "medical_symptom",
                        "reference": f"常见症状有{join_cn(list(symptoms))}。"})
    for i, item in enumerate(medical, 1):
        item["id"] = f"med-{i:03d}"
    return {"general_qa": general, "identity": identity, "medical_qa": medical}

