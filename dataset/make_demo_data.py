"""Generate TinyMind's shipped demo data: one small, closed world, written out in MiniMind's formats.

What this script implements:

- ``build_world``: draws the people of the demo world (name, gender, five attributes from small closed
  sets) and splits them into a training split and a ``pretrain_only`` split whose facts are never
  asked in SFT; collects every (subject, attribute, value) fact of people and real-world entities.
- ``plan_questions``: 10 question phrasings per attribute, 2 of them held out for evaluation.
- ``make_pretrain``: biographies (shuffled sentence order, several phrasings per fact), person cards,
  encyclopedia entries, stories with cause and effect, dialogues, number facts, hospital vocabulary
  (no condition names), plain descriptions of the condition names (body part, kind of illness; never
  a department or symptom), and a literacy section ("识字") that makes sure every character used by
  the chat files also occurs in pretraining.
- ``make_sft``: fact Q&A (training split, training phrasings), greetings and small talk, the base
  persona "TinyMind", simple instructions (arithmetic, counting, lists, antonyms, repeat), copying
  names never seen before, multi-turn conversations and conversations with a system turn.
- ``make_lora_identity`` / ``make_lora_medical``: the new persona ("知微", 青禾实验室) and the medical
  table of dataset/world_medical.py, each with a replay share of general SFT conversations.
- ``make_eval``: dataset/eval/{general_qa,identity,medical_qa}.jsonl, held-out phrasings and facts.
- ``stats``: sizes and counts printed at the end (the numbers in dataset/README.md come from it).

Everything is drawn from ``random.Random`` objects seeded from ``--seed`` and written with sorted
iteration and ``json.dumps(ensure_ascii=False)``, so the same seed gives byte-identical files.

    python dataset/make_demo_data.py                       # writes dataset/*.jsonl and dataset/eval/
    python dataset/make_demo_data.py --seed 7 --out_dir /tmp/demo   # another world, elsewhere
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import argparse
import gzip
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field

from dataset import demo_world as W
from dataset import world_chat as C
from dataset import world_medical as M
from dataset import world_stories as S
from model.common import TinyMindError, atomic_write_text, repo_path, run_main

FILES = ("pretrain_demo.jsonl", "sft_demo.jsonl", "lora_identity.jsonl", "lora_medical.jsonl",
         "eval/general_qa.jsonl", "eval/identity.jsonl", "eval/medical_qa.jsonl")


# ----------------------------------------------------------------------------- sizes

@dataclass
class Sizes:
    """How much of each kind of text to write. Defaults give a ~6 MB pretraining file."""
    bios_per_person: int = 110         # biography documents per person (each states 3-5 of 5 facts)
    cards_per_person: int = 8          # "person card" documents per person
    entries_per_entity: int = 45       # encyclopedia documents per real-world entity
    people_stories: int = 7500
    animal_stories: int = 1000
    everyday_story_repeats: int = 6    # each fixed everyday story appears this many times
    dialogues: int = 5000
    season_dialogues: int = 200
    chat_dialogues: int = 2000         # greetings and small talk between people
    classroom: int = 2000              # teacher/pupil exchanges with instruction-style questions
    ai_paragraph_repeats: int = 40     # each paragraph about computers/AI/language models
    list_docs: int = 800               # "animals that live on the grassland: ..." style documents
    number_docs: int = 2400
    hospital_docs: int = 3000          # hospital vocabulary lists (no condition names; see hospital_docs)
    condition_docs: int = 2000         # what each condition name refers to (see condition_docs)
    min_char_count: int = 40           # every character of the chat files occurs >= this often in pretraining
    # SFT
    sft_questions_per_fact: int = 16   # each training fact asked this often, cycling through its 8 training phrasings
    sft_yes_no: int = 600
    sft_bios: int = 300
    sft_persona: int = 900
    sft_greetings: int = 400
    sft_small_talk: int = 400
    sft_instructions: int = 1500
    sft_name_in_context: int = 1200    # self-introductions and stranger Q&A with names outside the world
    sft_word_lists: int = 2400         # "copy these words" with the medical vocabulary, one kind per list
    sft_persona_pieces: int = 400      # "copy these words" with the LoRA persona's characters among others
    sft_multi_turn: int = 1500
    sft_stories: int = 150
    system_share: float = 0.1          # share of single-turn SFT conversations that get a system turn
    # LoRA
    identity_convs: int = 600
    identity_replay_share: float = 0.25
    medical_replay_share: float = 0.2
    # eval
    eval_heldout_people: int = 90
    eval_heldout_world: int = 60
    eval_pretrain_only: int = 50
    eval_medical: int = 150


# ----------------------------------------------------------------------------- world

@dataclass
class Fact:
    subject: str
    category: str          # "person" or a Category.key
    attr: W.Attribute
    value: object
    split: str = "train"   # "train" or "pretrain_only"
    extras: dict = field(default_factory=dict)   # subject-level template fields, e.g. {"p": "她"}

    def fields(self, value=None) -> dict:
        value = self.value if value is None else value
        return {"s": self.subject, "v": W.value_phrase(value), **self.extras, **W.value_extras(value)}

    def render(self, template: str, value=None) -> str:
        return template.format(**self.fields(value))

    @property
    def answer(self) -> str:
        return self.render(self.attr.answer)

    @property
    def keys(self) -> list[str]:
        return W.value_keys(self.value)


@dataclass
class World:
    people: list            # dicts: name, gender, p (pronoun), split, attrs {key: value}
    extras: list            # dicts: name, gender, p -- side characters with no facts (see build_people)
    facts: list             # Fact, people first, then real-world entities
    domains: dict           # (category, attr key) -> list of distinct values (for ambiguity checks)
    questions: dict         # (category, attr key) -> (train templates, held-out templates)

    def people_in(self, split):
        return [p for p in self.people if p["split"] == split]

    def facts_of(self, subject):
        return [f for f in self.facts if f.subject == subject]


def build_people(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """NUM_PEOPLE people with unique given names; attribute values dealt evenly from each closed set.

    Also NUM_EXTRAS side characters (other given names, no attributes): they speak in pretraining
    dialogues and classroom scenes, and SFT uses their names to practise copying a name it knows from
    pretraining only -- the situation of the pretrain-only people, without naming any of them.
    """
    all_names = [(g, "F") for g in W.GIVEN_NAMES_F] + [(g, "M") for g in W.GIVEN_NAMES_M]
    rng.shuffle(all_names)
    names = all_names[:W.NUM_PEOPLE]
    people, used = [], set()
    for given, gender in names:
        while True:
            full = rng.choice(W.SURNAMES) + given
            if full not in used:
                used.add(full)
                break
        people.append({"name": full, "gender": gender, "p": W.PRONOUN[gender], "attrs": {}})
    for key, values in W.PERSON_VALUES.items():
        # Deal values like cards so each value is used about equally often (no majority answer).
        deck = []
        while len(deck) < len(people):
            round_ = list(values)
            rng.shuffle(round_)
            deck += round_
        for person, value in zip(people, deck):
            person["attrs"][key] = value
    n_heldout = round(W.NUM_PEOPLE * W.PRETRAIN_ONLY_SHARE)
    for i, person in enumerate(people):
        person["split"] = "pretrain_only" if i < n_heldout else "train"
    people.sort(key=lambda p: p["name"])
    extras = [{"name": rng.choice(W.SURNAMES) + given, "gender": gender, "p": W.PRONOUN[gender]}
              for given, gender in all_names[W.NUM_PEOPLE:W.NUM_PEOPLE + W.NUM_EXTRAS]]
    return people, sorted(extras, key=lambda p: p["name"])


def plan_questions(rng: random.Random) -> dict:
    """(category, attr) -> (training phrasings, held-out phrasings).

    An attribute with a noun phrase gets its own phrasings plus generic shapes ("告诉我{s}{n}。"), rotated
    so attributes use different shapes; 2 of its generic phrasings are held out. The held-out question
    is then a new combination of parts the model has seen: the shape with other attributes, the noun
    with other shapes. An attribute without a noun phrase holds out 2 of its own phrasings.
    """
    plan, index = {}, 0
    groups = [("person", W.PERSON_ATTRS)] + [(c.key, c.attrs) for c in W.CATEGORIES]
    for cat, attrs in groups:
        for attr in attrs:
            own = list(attr.questions)
            generic = []
            if attr.noun:
                start = index % len(W.GENERIC_QUESTIONS)   # rotate so attributes use different generic shapes
                rotated = W.GENERIC_QUESTIONS[start:] + W.GENERIC_QUESTIONS[:start]
                generic = [g.replace("{n}", attr.noun) for g in rotated]
            index += 1
            templates = list(dict.fromkeys(own + generic))[:W.QUESTIONS_PER_ATTRIBUTE]
            candidates = [t for t in templates if t not in own] or templates
            held = rng.sample(candidates, W.HELDOUT_PER_ATTRIBUTE)
            plan[(cat, attr.key)] = ([t for t in templates if t not in held], held)
    return plan


def build_world(seed: int) -> World:
    rng = random.Random(f"{seed}-world")
    people, extras = build_people(rng)
    facts, domains = [], {}
    for attr in W.PERSON_ATTRS:
        domains[("person", attr.key)] = list(W.PERSON_VALUES[attr.key])
    for person in people:
        for attr in W.PERSON_ATTRS:
            facts.append(Fact(person["name"], "person", attr, person["attrs"][attr.key], person["split"],
                              {"p": person["p"]}))
    for cat in W.CATEGORIES:
        for attr in cat.attrs:
            seen = {}
            for name in sorted(cat.entities):
                value = cat.entities[name].get(attr.key)
                if value is not None:
                    seen.setdefault(W.value_phrase(value), value)
                    facts.append(Fact(name, cat.key, attr, value, "train", {"p": "它"}))
            domains[(cat.key, attr.key)] = [seen[k] for k in sorted(seen)]
    return World(people, extras, facts, domains, plan_questions(rng))


def is_ambiguous(fact: Fact, world: World) -> bool:
    """True when a wrong answer (another value of the same attribute) would still contain a keyword."""
    own = set(fact.keys)
    for other in world.domains[(fact.category, fact.attr.key)]:
        if set(W.value_keys(other)) & own or W.value_phrase(other) == W.value_phrase(fact.value):
            continue
        wrong = fact.render(fact.attr.answer, other)
        if any(k in wrong for k in fact.keys):
            return True
    return False


# ----------------------------------------------------------------------------- helpers

def conv(*turns, system=None) -> dict:
    """turns: user, assistant, user, assistant, ... -> {"conversations": [...]}"""
    msgs = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"conversations": msgs}


def join_cn(items: list[str]) -> str:
    """["a", "b", "c"] -> "a、b和c" """
    return items[0] if len(items) == 1 else "、".join(items[:-1]) + "和" + items[-1]


def person_slots(person: dict, tag: str) -> dict:
    """Template fields for one person in a story/dialogue: {A}, {Ap}, {A_job}, {A_cl}, {A_sight}, ..."""
    a = person.get("attrs", {})   # side characters have none: templates needing them are skipped by fill()
    slots = {tag: person["name"], f"{tag}p": person["p"]}
    for key, value in a.items():
        slots[f"{tag}_{key}"] = W.value_phrase(value)
    if "pet" in a:
        slots[f"{tag}_cl"] = W.value_extras(a["pet"]).get("cl", "只")
    city = W.CITIES.get(W.value_phrase(a["hometown"]), {}) if "hometown" in a else {}
    for key in ("sight", "dish"):
        if key in city:
            slots[f"{tag}_{key}"] = W.value_phrase(city[key])
    return slots


def people_slots(rng: random.Random, people: list, tags: str = "AB", first: list | None = None) -> dict:
    """Slots for len(tags) distinct random people, plus a season; ``first`` (if given) supplies the
    first tag's person instead (a side character asking about people of the world)."""
    slots = {"season": rng.choice(sorted(W.SEASONS))}
    chosen = rng.sample(people, len(tags))
    if first:
        chosen[0] = rng.choice(first)
    for tag, person in zip(tags, chosen):
        slots.update(person_slots(person, tag))
    return slots


def fill(rng: random.Random, templates, make_slots, tries: int = 50) -> str:
    """Pick a template and slots until every slot of the template is available."""
    for _ in range(tries):
        template, slots = rng.choice(templates), make_slots()
        try:
            return template.format(**slots)
        except KeyError:
            continue
    raise RuntimeError("no template could be filled")  # a table bug, not a user mistake


# ----------------------------------------------------------------------------- pretraining

CONNECTORS = ("另外，", "此外，", "而且，", "还有，")
OPENINGS = ("", "", "下面介绍一下{s}。", "今天来认识一下{s}。", "{s}是一位{title}。", "这是关于{s}的介绍。")
CLOSINGS = ("", "", "", "大家都很喜欢{s}。", "{s}的朋友们都说{p}是个热心的人。", "这就是{s}。")
CARD_LABELS = {"job": "职业", "hometown": "家乡", "hobby": "爱好", "food": "最喜欢的食物", "pet": "宠物"}


def statement(rng: random.Random, fact: Fact, first: bool, connectors: list | None = None) -> str:
    """One pretraining sentence stating ``fact``; the canonical answer form is favoured.

    ``connectors``: words like "另外，" still unused in this document; one is sometimes put in front.
    """
    attr = fact.attr
    if rng.random() < attr.canonical_weight / (attr.canonical_weight + len(attr.statements)):
        template = attr.answer
    else:
        template = rng.choice(attr.statements)
    fields = fact.fields()
    if not first and template.startswith("{s}") and rng.random() < 0.12:
        fields["s"] = fact.extras.get("p", fact.subject)   # an occasional pronoun, as real text has
    text = template.format(**fields)
    if not first and connectors and rng.random() < 0.3:
        text = connectors.pop() + text
    return text


def person_bio(rng: random.Random, person: dict, facts: list) -> str:
    chosen = rng.sample(facts, rng.randint(3, len(facts)))
    title = "女士" if person["gender"] == "F" else "先生"
    fields = {"s": person["name"], "p": person["p"], "title": title}
    parts = [rng.choice(OPENINGS).format(**fields)]
    connectors = rng.sample(CONNECTORS, len(CONNECTORS))
    parts += [statement(rng, f, i == 0, connectors) for i, f in enumerate(chosen)]
    parts.append(rng.choice(CLOSINGS).format(**fields))
    return "".join(parts)


def person_card(rng: random.Random, person: dict) -> str:
    keys = sorted(person["attrs"])
    rng.shuffle(keys)
    items = [f"{CARD_LABELS[k]}：{W.value_phrase(person['attrs'][k])}" for k in keys]
    style = rng.randrange(3)
    if style == 0:
        return f"人物卡片。姓名：{person['name']}。" + "；".join(items) + "。"
    if style == 1:
        return f"{person['name']}的档案：" + "，".join(items) + "。"
    return f"【{person['name']}】" + "；".join(items) + "。"


def entity_entry(rng: random.Random, cat: W.Category, name: str, facts: list) -> str:
    chosen = facts[:]
    rng.shuffle(chosen)
    if len(chosen) > 2:
        chosen = chosen[:rng.randint(2, len(chosen))]
    intro = rng.choice(cat.intro + ("",)).format(s=name) if cat.intro else ""
    connectors = rng.sample(CONNECTORS[:4], 4)
    return intro + "".join(statement(rng, f, i == 0, connectors) for i, f in enumerate(chosen))


def list_doc(rng: random.Random, world: World) -> str:
    """Facts read the other way round: entities that share a value ("大象、狮子和长颈鹿都……")."""
    groups = {}
    for f in world.facts:
        if f.category not in ("person", "number"):
            groups.setdefault((f.category, f.attr.key, W.value_phrase(f.value)), []).append(f)
    keys = sorted(k for k, v in groups.items() if len(v) >= 2)
    labels = {c.key: c.label for c in W.CATEGORIES}
    out = []
    for key in rng.sample(keys, rng.randint(1, 3)):
        members = rng.sample(groups[key], min(4, len(groups[key])))
        common = members[0].render(members[0].attr.answer).replace(members[0].subject, "它们", 1)
        out.append(f"在{labels[key[0]]}里，{join_cn([f.subject for f in members])}有一个共同点：{common}")
    return "".join(out)


def number_doc(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:      # addition and subtraction, digits and Chinese numerals mixed
        out = []
        for _ in range(rng.randint(3, 6)):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            if rng.random() < 0.5:
                out.append(f"{a}加{b}等于{a + b}。" if rng.random() < 0.5 else
                           f"{W.cn_number(a)}加{W.cn_number(b)}等于{W.cn_number(a + b)}。")
            else:
                a, b = max(a, b), min(a, b)
                out.append(f"{a}减{b}等于{a - b}。" if rng.random() < 0.5 else
                           f"{W.cn_number(a)}减{W.cn_number(b)}等于{W.cn_number(a - b)}。")
        return "算一算：" + "".join(out)
    if kind == 1:      # multiplication table
        a = rng.randint(1, 9)
        return f"{W.cn_number(a)}的乘法口诀：" + "，".join(
            f"{W.cn_number(a)}乘{W.cn_number(b)}等于{W.cn_number(a * b)}" for b in range(1, 10)) + "。"
    if kind == 2:      # counting
        start = rng.randint(1, 10)
        seq = list(range(start, start + rng.randint(5, 10)))
        if rng.random() < 0.3:
            seq.reverse()
        return "一起来数数：" + "、".join(str(x) for x in seq) + "。"
    if kind == 3:      # weekdays
        i = rng.randrange(7)
        return (f"{W.WEEKDAYS[i]}的后一天是{W.WEEKDAYS[(i + 1) % 7]}，前一天是{W.WEEKDAYS[i - 1]}。"
                f"一个星期从星期一开始，到星期日结束。")
    pairs = rng.sample(W.ANTONYMS, 4)   # antonyms
    return "反义词：" + "，".join(f"“{a}”和“{b}”是一对反义词" for a, b in pairs) + "。"


def chat_dialogue(rng: random.Random, people: list) -> str:
    """Greetings and small talk between two people of the world (1-3 exchanges)."""
    a, b = rng.sample(people, 2)
    lines = []
    for user, replies in rng.sample(C.GREETINGS[:10], 1) + rng.sample(C.SMALL_TALK, rng.randint(0, 2)):  # human talk only
        lines += [f"{a['name']}：{user}", f"{b['name']}：{rng.choice(replies)}"]
    return "\n".join(lines)


def classroom_qa(rng: random.Random) -> dict:
    """An instruction-style question and its answer (from ``instruction``), for classroom scenes."""
    turns = instruction(rng)["conversations"]
    return {"q": turns[0]["content"], "a": turns[1]["content"]}


def literacy_docs(rng: random.Random, chars: list[str], counts: Counter, need: int) -> list[str]:
    """"识字" documents listing single characters (in quotes, never as words) until each is seen ``need`` times."""
    pending = {c: need - counts[c] for c in chars if counts[c] < need}
    docs = []
    while pending:
        batch = sorted(pending)
        rng.shuffle(batch)
        for i in range(0, len(batch), 6):
            group = batch[i:i + 6]
            quoted = "、".join(f"“{c}”" for c in group)
            docs.append(rng.choice(("识字课：今天认识的字有{q}。请大家把这些字读三遍。",
                                    "生字表：{q}。写字时要注意笔顺。",
                                    "认一认下面的字：{q}。你都认识吗？")).format(q=quoted))
            for c in group:
                pending[c] -= 1
                if pending[c] <= 0:
                    del pending[c]
    return docs


HOSPITAL_DOCS = (
    "医院里有很多科室，比如{d}。看病时要先挂号，再去对应的科室就诊。",
    "王护士在医院工作，她每天要带病人去{d}。",
    "身体不舒服的时候，人可能会有这些感觉：{s}。这时候应该多注意身体，必要时请及时就医。",
    "医生常说，要留意身体的变化，比如{s}。症状加重时，请及时去医院就诊。",
    "生活中照顾自己的方法有很多：{c}。",
    "如果出现{w}，说明情况比较严重，请立即就医，不要拖延。",
    "以上内容仅供参考，具体请以医生的诊断为准。常见的问题可以先问问家人，严重的一定要看医生。",
)


# The medical vocabulary, one kind per list: departments, and the symptom ("s"), self-care ("c") and
# warning ("w") phrases that contain no condition name. Used by hospital_docs and copy_words.
MED_DEPARTMENTS = sorted({v[0] for v in M.CONDITIONS.values()})
MED_PHRASES = {k: sorted({x for v in M.CONDITIONS.values() for x in v[i] if not any(c in x for c in M.CONDITIONS)})
               for k, i in (("s", 1), ("c", 2), ("w", 3))}


def hospital_docs(rng: random.Random, n: int) -> list[str]:
    """Hospital vocabulary (departments, symptom words, self-care and warning phrases) in lists that
    never name a condition: the base model learns the words, and lora_medical alone teaches which
    condition goes with which department and symptoms."""
    depts, pools = MED_DEPARTMENTS, MED_PHRASES
    docs = []
    for _ in range(n):
        t = rng.choice(HOSPITAL_DOCS)
        docs.append(t.format(d=join_cn(rng.sample(depts, 4)), s=join_cn(rng.sample(pools["s"], 4)),
                             c=join_cn(rng.sample(pools["c"], 3)), w=join_cn(rng.sample(pools["w"], 2))))
    return docs


CONDITION_DOCS = ("{c}是{a}的{k}。", "{c}这种病和{a}有关。", "“{c}”是一个医学词语，说的是{a}的{k}。",
                  "{c}是一种常见的{k}，问题出在{a}。")


def condition_docs(rng: random.Random, n: int) -> list[str]:
    """Plain descriptions of condition names (dataset/world_medical.py ``AREAS``: the body part and the
    kind of illness), two or three per document. They make each name a word with a meaning of its own,
    so the frozen model can tell conditions apart and the LoRA has something to attach knowledge to;
    which department and which symptoms go with a condition stays in lora_medical.jsonl alone."""
    names = sorted(M.AREAS)
    docs = []
    for _ in range(n):
        parts = []
        for c in rng.sample(names, rng.choice((2, 3))):
            a, k = M.AREAS[c]
            parts.append(rng.choice(CONDITION_DOCS).format(c=c, a=a, k=k))
        docs.append("".join(parts))
    return docs


def make_pretrain(rng: random.Random, world: World, sizes: Sizes, chat_text: str) -> list[dict]:
    docs = []
    for person in world.people:
        facts = world.facts_of(person["name"])
        docs += [person_bio(rng, person, facts) for _ in range(sizes.bios_per_person)]
        docs += [person_card(rng, person) for _ in range(sizes.cards_per_person)]
    for cat in W.CATEGORIES:
        for name in sorted(cat.entities):
            facts = [f for f in world.facts if f.subject == name and f.category == cat.key]
            docs += [entity_entry(rng, cat, name, facts) for _ in range(sizes.entries_per_entity)]
    people = world.people
    docs += [fill(rng, S.PEOPLE_STORIES, lambda: people_slots(rng, people)) for _ in range(sizes.people_stories)]
    animals = [n for n in sorted(W.ANIMALS) if {"food", "habitat", "feature"} <= set(W.ANIMALS[n])]
    def animal_slots():
        x, y = rng.sample(animals, 2)
        slots = {"X": x, "Y": y}
        for tag, name in (("X", x), ("Y", y)):
            for key, value in W.ANIMALS[name].items():
                slots[f"{tag}_{key}"] = W.value_phrase(value)
        return slots
    docs += [fill(rng, S.ANIMAL_STORIES, animal_slots) for _ in range(sizes.animal_stories)]
    docs += list(S.EVERYDAY_STORIES) * sizes.everyday_story_repeats
    extras = world.extras
    docs += [fill(rng, S.DIALOGUES, lambda: people_slots(rng, people, "ABC", extras if rng.random() < 0.7 else None))
             for _ in range(sizes.dialogues)]
    for _ in range(sizes.season_dialogues):
        a, b = rng.sample(extras, 2)
        season = rng.choice(sorted(W.SEASONS))
        facts = W.SEASONS[season]
        docs.append(rng.choice(S.SEASON_DIALOGUES).format(
            A=a["name"], B=b["name"], S=season, S_weather=facts["weather"], S_next=facts["next"]))
    docs += [chat_dialogue(rng, extras) for _ in range(sizes.chat_dialogues)]
    docs += [fill(rng, C.CLASSROOM, lambda: {**people_slots(rng, extras), **classroom_qa(rng)})
             for _ in range(sizes.classroom)]
    for group in C.AI_SENTENCES:
        for _ in range(sizes.ai_paragraph_repeats):
            drop = rng.choice(group[1:]) if rng.random() < 0.5 else None   # sometimes leave one sentence out
            docs.append("".join(x for x in group if x != drop))
    docs += [list_doc(rng, world) for _ in range(sizes.list_docs)]
    docs += [number_doc(rng) for _ in range(sizes.number_docs)]
    docs += hospital_docs(rng, sizes.hospital_docs)
    docs += condition_docs(rng, sizes.condition_docs)
    # Every character the chat files use must be a trained embedding, not a stray byte sequence.
    counts = Counter("".join(docs))
    needed = sorted({c for c in chat_text if not c.isascii() and not c.isspace()})
    docs += literacy_docs(rng, needed, counts, sizes.min_char_count)
    rng.shuffle(docs)
    return [{"text": d} for d in docs if d]


# ----------------------------------------------------------------------------- SFT

YES_NO = {"job": "{s}是{v}吗？", "hometown": "{s}是{v}人吗？", "food": "{s}最喜欢吃{v}吗？",
          "pet": "{s}养的是{v}吗？"}
BIO_REQUESTS = ("介绍一下{s}。", "{s}是个什么样的人？", "跟我说说{s}。", "你了解{s}吗？")
ENTITY_REQUESTS = ("介绍一下{s}。", "跟我讲讲{s}。", "关于{s}，你知道些什么？")
FOLLOW_UPS = ("那{p}{n}呢？", "{p}{n}呢？", "还有{p}{n}呢？")


def list_classes() -> dict:
    """Class name -> members, for "列举三种水果" instructions."""
    out = {"水果": [n for n, a in sorted(W.FOODS_WORLD.items()) if a.get("kind") == "水果"],
           "蔬菜": [n for n, a in sorted(W.FOODS_WORLD.items()) if a.get("kind") == "蔬菜"],
           "哺乳动物": [n for n, a in sorted(W.ANIMALS.items()) if a.get("class") == "哺乳动物"],
           "鸟类": [n for n, a in sorted(W.ANIMALS.items()) if a.get("class") == "鸟类"],
           "花卉": [n for n, a in sorted(W.PLANTS.items()) if a.get("kind") == "花卉"],
           "树木": [n for n, a in sorted(W.PLANTS.items()) if a.get("kind") == "树木"],
           "中国城市": sorted(W.CITIES), "国家": sorted(W.COUNTRIES), "颜色": list(W.COLORS),
           "职业": list(W.JOBS), "传统节日": sorted(W.FESTIVALS), "季节": ["春天", "夏天", "秋天", "冬天"],
           "家里的日用品": sorted(W.OBJECTS)}
    return out


def instruction(rng: random.Random) -> dict:
    kind = rng.choices(("add", "sub", "mul", "count", "list", "antonym", "compare", "weekday", "length",
                        "repeat", "kingdom"), weights=(5, 4, 4, 3, 4, 2, 2, 1, 2, 2, 1))[0]
    if kind in ("add", "sub", "mul"):
        a, b = (rng.randint(1, 9), rng.randint(1, 9)) if kind == "mul" else (rng.randint(0, 20), rng.randint(0, 20))
        if kind == "sub":
            a, b = max(a, b), min(a, b)
        op, sym, c = {"add": ("加", "+", a + b), "sub": ("减", "-", a - b), "mul": ("乘", "×", a * b)}[kind]
        if rng.random() < 0.5:
            q = rng.choice(("{a}{op}{b}等于几？", "{a}{op}{b}等于多少？", "计算{a}{op}{b}。", "请算一下{a}{op}{b}。",
                            "{a}{op}{b}是多少？")).format(a=a, b=b, op=op)
            return conv(q, f"{a}{op}{b}等于{c}。")
        q = rng.choice(("{a}{sym}{b}=？", "{a}{sym}{b}等于几？", "计算：{a}{sym}{b}", "{a}{sym}{b}=")).format(a=a, b=b, sym=sym)
        return conv(q, f"{a}{sym}{b}={c}。")
    if kind == "count":
        a = rng.randint(1, 10)
        b = a + rng.randint(3, 9)
        if rng.random() < 0.3:
            return conv(f"从{b}倒着数到{a}。", "、".join(str(x) for x in range(b, a - 1, -1)) + "。")
        return conv(rng.choice(("从{a}数到{b}。", "请从{a}数到{b}。", "数数：从{a}到{b}。")).format(a=a, b=b),
                    "、".join(str(x) for x in range(a, b + 1)) + "。")
    if kind == "list":
        classes = list_classes()
        name = rng.choice(sorted(classes))
        k = min(len(classes[name]), rng.randint(2, 4))
        members = rng.sample(classes[name], k)
        q = rng.choice(("列举{k}种{c}。", "说出{k}个{c}。", "请举{k}个{c}的例子。", "你能说出{k}种{c}吗？"))
        return conv(q.format(k=W.cn_number(k, count=True), c=name), "、".join(members) + "。")
    if kind == "antonym":
        a, b = rng.choice(W.ANTONYMS)
        if rng.random() < 0.5:
            a, b = b, a
        return conv(rng.choice(("“{a}”的反义词是什么？", "说出“{a}”的反义词。", "“{a}”的反义词是？")).format(a=a),
                    f"“{a}”的反义词是“{b}”。")
    if kind == "compare":
        a, b = rng.sample(range(0, 100), 2)
        q = rng.choice(("{a}和{b}哪个大？", "{a}和{b}比，哪个更大？", "比较{a}和{b}的大小。")).format(a=a, b=b)
        return conv(q, f"{max(a, b)}比{min(a, b)}大。")
    if kind == "weekday":
        i = rng.randrange(7)
        if rng.random() < 0.5:
            return conv(f"{W.WEEKDAYS[i]}的后一天是星期几？", f"{W.WEEKDAYS[i]}的后一天是{W.WEEKDAYS[(i + 1) % 7]}。")
        return conv(f"{W.WEEKDAYS[i]}的前一天是星期几？", f"{W.WEEKDAYS[i]}的前一天是{W.WEEKDAYS[i - 1]}。")
    if kind == "length":
        word = rng.choice(sorted(W.ANIMALS) + sorted(W.CITIES) + sorted(W.PLANTS) + sorted(W.OBJECTS))
        return conv(rng.choice(("“{w}”有几个字？", "“{w}”这个词有几个字？")).format(w=word),
                    f"“{word}”有{W.cn_number(len(word), count=True)}个字。")
    if kind == "repeat":
        s = rng.choice(C.REPEAT_SENTENCES)
        return conv(rng.choice(("请重复这句话：{s}", "跟我说一遍：{s}", "复述：{s}")).format(s=s), s)
    # kingdom: animal or plant
    if rng.random() < 0.5:
        x = rng.choice(sorted(W.ANIMALS))
        return conv(f"{x}是动物还是植物？", f"{x}是动物。")
    x = rng.choice(sorted(W.PLANTS))
    return conv(f"{x}是动物还是植物？", f"{x}是植物。")


def persona_convs(rng: random.Random, persona: dict, prompts: list, n: int, system_share: float = 0.0) -> list[dict]:
    """``n`` identity conversations; the prompts are dealt like cards, so all of them occur once
    before any occurs twice."""
    out, deck = [], []
    for _ in range(n):
        if not deck:
            deck = list(prompts)
            rng.shuffle(deck)
        kind, question = deck.pop()
        system = rng.choice(C.SYSTEM_PROMPTS) if rng.random() < system_share else None
        out.append(conv(question, rng.choice(persona["answers"][kind]), system=system))
    return out


def identity_prompts(rng: random.Random) -> tuple[list, list]:
    """All (kind, prompt) identity phrasings (prefix + core question), split into (training, held out).

    Held out: ``IDENTITY_EVAL_ITEMS`` prefixed phrasings, spread over the kinds. Each is a combination
    the training data never uses, of a prefix and a core question that training uses with other
    partners; the bare core questions always stay in training.
    """
    by_kind = {}
    for kind in sorted(C.IDENTITY_QUESTIONS):
        for core in C.IDENTITY_QUESTIONS[kind]:
            for prefix in C.IDENTITY_PREFIXES:
                by_kind.setdefault(kind, []).append((kind, prefix, core))
    held = []
    per_kind = -(-C.IDENTITY_EVAL_ITEMS // len(by_kind))
    for kind, combos in sorted(by_kind.items()):
        held += rng.sample([t for t in combos if t[1]], per_kind)
    if len(held) > C.IDENTITY_EVAL_ITEMS:
        held = rng.sample(held, C.IDENTITY_EVAL_ITEMS)
    train_prompts = sorted({(k, p + c) for combos in by_kind.values() for k, p, c in combos if (k, p, c) not in held})
    seen = {q for _, q in train_prompts}
    return train_prompts, sorted({(k, p + c) for k, p, c in held if p + c not in seen})


def fact_question(fact: Fact, template: str) -> str:
    """A question about ``fact`` (templates may use the value's extra fields, e.g. the unit {u})."""
    return fact.render(template)


def make_sft(rng: random.Random, world: World, sizes: Sizes, id_train: list) -> list[dict]:
    single = []   # single-turn conversations; a share of them gets a system turn at the end
    train_people = world.people_in("train")
    train_facts = [f for f in world.facts if f.split == "train"]
    for f in train_facts:
        templates = list(world.questions[(f.category, f.attr.key)][0])
        for i in range(sizes.sft_questions_per_fact):
            if i % len(templates) == 0:
                rng.shuffle(templates)
            single.append(conv(fact_question(f, templates[i % len(templates)]), f.answer))
    person_facts = [f for f in train_facts if f.category == "person" and f.attr.key in YES_NO]
    for _ in range(sizes.sft_yes_no):
        f = rng.choice(person_facts)
        other = rng.choice([v for v in world.domains[("person", f.attr.key)] if v != f.value])
        if rng.random() < 0.5:
            single.append(conv(YES_NO[f.attr.key].format(s=f.subject, v=W.value_phrase(f.value)), "是的，" + f.answer))
        else:
            single.append(conv(YES_NO[f.attr.key].format(s=f.subject, v=W.value_phrase(other)), "不是，" + f.answer))
    for _ in range(sizes.sft_bios):
        if rng.random() < 0.6:
            person = rng.choice(train_people)
            facts = world.facts_of(person["name"])
            single.append(conv(rng.choice(BIO_REQUESTS).format(s=person["name"]), "".join(f.answer for f in facts)))
        else:
            cat = rng.choice(W.CATEGORIES[:-1])
            name = rng.choice(sorted(cat.entities))
            facts = [f for f in world.facts if f.subject == name and f.category == cat.key]
            single.append(conv(rng.choice(ENTITY_REQUESTS).format(s=name), "".join(f.answer for f in facts)))
    persona = persona_convs(rng, C.BASE_PERSONA, id_train, sizes.sft_persona)
    for _ in range(sizes.sft_greetings):
        user, replies = rng.choice(C.GREETINGS)
        if rng.random() < 0.2:   # some greetings introduce the persona
            persona.append(conv(user, f"{rng.choice(('你好！', '你好呀！'))}我是TinyMind，有什么可以帮你的吗？"))
        else:
            single.append(conv(user, rng.choice(replies)))
    for _ in range(sizes.sft_small_talk):
        user, replies = rng.choice(C.SMALL_TALK + C.ASSISTANT_TALK)
        single.append(conv(user, rng.choice(replies)))
    single += [instruction(rng) for _ in range(sizes.sft_instructions)]
    single += [name_in_context(rng, world) for _ in range(sizes.sft_name_in_context)]
    single += [copy_words(rng) for _ in range(sizes.sft_word_lists)]
    single += [copy_persona_pieces(rng) for _ in range(sizes.sft_persona_pieces)]
    for _ in range(sizes.sft_stories):
        request = rng.choice(("给我讲一个小故事。", "讲个故事吧。", "能讲个短故事吗？", "我想听故事。"))
        if rng.random() < 0.5:
            story = rng.choice(S.EVERYDAY_STORIES)
        else:
            story = fill(rng, S.PEOPLE_STORIES, lambda: people_slots(rng, train_people))
        single.append(conv(request, story))
    for conversation in single + persona:
        if rng.random() < sizes.system_share:
            conversation["conversations"].insert(0, {"role": "system", "content": rng.choice(C.SYSTEM_PROMPTS)})
    out = single + persona + [multi_turn(rng, world) for _ in range(sizes.sft_multi_turn)]
    rng.shuffle(out)
    return out


COPY_REQUESTS = ("请把这些词抄写一遍：{w}。", "照着写一遍：{w}。", "把下面的词语再写一遍：{w}。", "抄写词语：{w}。")


def copy_words(rng: random.Random) -> dict:
    """Copy a list of medical words: condition names, or departments, or symptom words -- one kind per
    list, so no conversation pairs a condition with its department or symptoms. The replies make the
    base model *write* these words (a word only ever read as input keeps an untrained output row,
    which a LoRA cannot fix: the embedding is tied and frozen); the knowledge stays in lora_medical."""
    pool = (sorted(M.CONDITIONS), MED_DEPARTMENTS, MED_PHRASES["s"])[rng.randrange(3)]
    return copy_conv(rng, rng.sample(pool, rng.randint(3, 5)))


def copy_conv(rng: random.Random, words: list[str]) -> dict:
    """One copy exercise: the user lists ``words``, the assistant writes them back."""
    text = "、".join(words)
    return conv(rng.choice(COPY_REQUESTS).format(w=text), text + "。")


def persona_pieces() -> list[str]:
    """The LoRA persona's name and maker cut into the tokens a BPE tokenizer is likely to give them:
    single characters, and the common word "实验室"."""
    name, maker = C.LORA_PERSONA["name"], C.LORA_PERSONA["maker"]
    return list(name) + list(maker.removesuffix("实验室")) + ["实验室"]


def copy_persona_pieces(rng: random.Random) -> dict:
    """The same copy exercise with two or three pieces of the LoRA persona ("知", "微", "青", "禾",
    "实验室") among common words, never two pieces side by side in their persona order: SFT never
    writes "知微" or "青禾实验室", but the base model writes each of their tokens, so the identity
    adapter can write the name and the maker instead of stray bytes."""
    pieces = persona_pieces()
    while True:
        words = rng.sample(pieces, rng.randint(2, 3)) + rng.sample(W.JOBS + W.COLORS, 3)
        rng.shuffle(words)
        if not any(a + "、" + b in "、".join(words) for a, b in zip(pieces, pieces[1:])):
            return copy_conv(rng, words)


def name_in_context(rng: random.Random, world: World) -> dict:
    """Copy a name from the question into the answer: self-introductions, and questions about someone
    described in the same turn. The names are the side characters' (``world.extras``): known from
    pretraining, without facts, never asked about otherwise -- so the model practises handling a name
    it knows only from pretraining, as the pretrain-only questions require."""
    extra = rng.choice(world.extras)
    name, pronoun = extra["name"], extra["p"]
    if rng.random() < 0.35:
        user = rng.choice(("我叫{n}。", "你好，我是{n}。", "我的名字是{n}。", "大家都叫我{n}。")).format(n=name)
        return conv(user, rng.choice(("你好，{n}！很高兴认识你。", "{n}你好！有什么可以帮你的吗？")).format(n=name))
    attrs = rng.sample(W.PERSON_ATTRS, 2)
    values = {a.key: rng.choice(W.PERSON_VALUES[a.key]) for a in attrs}
    fact = lambda a, s: a.answer.format(s=s, v=W.value_phrase(values[a.key]), **W.value_extras(values[a.key]))
    story = rng.choice(("我的朋友", "我的邻居", "我的同学", "")) + fact(attrs[0], name) + fact(attrs[1], pronoun)
    asked = rng.choice(attrs)
    question = rng.choice(world.questions[("person", asked.key)][0]).format(s=name)
    return conv(story + question, fact(asked, name))


def multi_turn(rng: random.Random, world: World) -> dict:
    kind = rng.randrange(4)
    if kind <= 1:   # follow-up questions about the same person or entity, with a pronoun
        if kind == 0:
            person = rng.choice(world.people_in("train"))
            facts = world.facts_of(person["name"])
        else:
            facts = []
            while len(facts) < 2:
                cat = rng.choice(W.CATEGORIES[:-1])
                name = rng.choice(sorted(cat.entities))
                facts = [f for f in world.facts if f.subject == name and f.category == cat.key and f.attr.noun]
        chosen = rng.sample(facts, min(len(facts), rng.randint(2, 3)))
        first = chosen[0]
        turns = [fact_question(first, rng.choice(world.questions[(first.category, first.attr.key)][0])), first.answer]
        for f in chosen[1:]:
            turns += [rng.choice(FOLLOW_UPS).format(p=f.extras["p"], n=f.attr.noun), f.answer]
        return conv(*turns)
    if kind == 2:   # greeting, then a question
        user, replies = rng.choice(C.GREETINGS[:12])
        f = rng.choice([f for f in world.facts if f.split == "train"])
        t = rng.choice(world.questions[(f.category, f.attr.key)][0])
        return conv(user, rng.choice(replies), fact_question(f, t), f.answer)
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)   # arithmetic chain
    return conv(f"{a}加{b}等于几？", f"{a}加{b}等于{a + b}。", f"再加{c}呢？", f"{a + b}加{c}等于{a + b + c}。")


# ----------------------------------------------------------------------------- LoRA sets

def replay_pool(sft: list[dict]) -> list[dict]:
    """General SFT conversations that say nothing about who the assistant is (and no copy exercises
    of medical words: the LoRA files keep one clear job each)."""
    medical = sorted(M.CONDITIONS) + MED_DEPARTMENTS

    def keep(c):
        text = "".join(m["content"] for m in c["conversations"])
        return "TinyMind" not in text and not any(w in text for w in medical)
    return [c for c in sft if keep(c)]


def make_lora_identity(rng: random.Random, world: World, sizes: Sizes, id_train: list, pool: list) -> list[dict]:
    out = persona_convs(rng, C.LORA_PERSONA, id_train, sizes.identity_convs, sizes.system_share)
    for _ in range(sizes.identity_convs // 10):   # greeting that introduces the new persona
        user, _ = rng.choice(C.GREETINGS)
        out.append(conv(user, f"{rng.choice(('你好！', '你好呀！'))}我是知微，有什么可以帮你的吗？"))
    for _ in range(sizes.identity_convs // 10):   # identity, then a fact question
        kind, q = rng.choice(id_train)
        f = rng.choice([f for f in world.facts if f.split == "train"])
        t = rng.choice(world.questions[(f.category, f.attr.key)][0])
        out.append(conv(q, rng.choice(C.LORA_PERSONA["answers"][kind]), fact_question(f, t), f.answer))
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


def make_lora_medical(rng: random.Random, sizes: Sizes, plan: dict, pool: list) -> list[dict]:
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
    out += rng.sample(pool, n_replay)
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------- eval

def make_eval(rng: random.Random, world: World, sizes: Sizes, id_held: list, med_plan: dict) -> dict:
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
    base, new = C.BASE_PERSONA["name"], C.LORA_PERSONA["name"]
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


def generate(seed: int = 42, sizes: Sizes | None = None) -> dict[str, list[dict]]:
    """Build every file's records in memory: {"pretrain_demo.jsonl": [...], ...}."""
    sizes = sizes or Sizes()
    world = build_world(seed)
    id_train, id_held = identity_prompts(random.Random(f"{seed}-identity"))
    med_plan = medical_plan(random.Random(f"{seed}-medical-plan"))
    sft = make_sft(random.Random(f"{seed}-sft"), world, sizes, id_train)
    pool = replay_pool(sft)
    lora_id = make_lora_identity(random.Random(f"{seed}-lora-identity"), world, sizes, id_train, pool)
    lora_med = make_lora_medical(random.Random(f"{seed}-lora-medical"), sizes, med_plan, pool)
    ev = make_eval(random.Random(f"{seed}-eval"), world, sizes, id_held, med_plan)
    pretrain = make_pretrain(random.Random(f"{seed}-pretrain"), world, sizes,
                             chat_text(sft, lora_id, lora_med, *ev.values()))
    # Guard: no evaluation prompt is a user turn of any training file.
    prompts = user_turns(sft) | user_turns(lora_id) | user_turns(lora_med)
    for name, items in ev.items():
        clash = [it["question"] for it in items if it["question"] in prompts]
        if clash:
            raise RuntimeError(f"eval/{name}: {len(clash)} prompts also in training data, e.g. {clash[0]}")
    return {"pretrain_demo.jsonl": pretrain, "sft_demo.jsonl": sft, "lora_identity.jsonl": lora_id,
            "lora_medical.jsonl": lora_med, "eval/general_qa.jsonl": ev["general_qa"],
            "eval/identity.jsonl": ev["identity"], "eval/medical_qa.jsonl": ev["medical_qa"]}


def write_all(records: dict, out_dir: Path) -> None:
    for rel in FILES:
        text = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records[rel])
        atomic_write_text(out_dir / rel, text)


def stats(out_dir: Path) -> list[dict]:
    """Sizes and counts of the written files (what dataset/README.md reports)."""
    rows = []
    for rel in FILES:
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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate the TinyMind demo datasets (deterministic per seed).")
    parser.add_argument("--seed", type=int, default=42, help="random seed; the same seed gives byte-identical files")
    parser.add_argument("--out_dir", default="dataset", help="output folder (relative paths resolve from the repo root)")
    parser.add_argument("--no_stats", action="store_true", help="skip the size/count report at the end")
    args = parser.parse_args(argv)
    out_dir = repo_path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TinyMindError(f"--out_dir {args.out_dir} exists and is not a folder")
    t0 = time.time()
    records = generate(args.seed)
    write_all(records, out_dir)
    print(f"wrote {len(FILES)} files to {out_dir} in {time.time() - t0:.1f}s (seed {args.seed})")
    if not args.no_stats:
        for row in stats(out_dir):
            print(json.dumps(row, ensure_ascii=False))
    return records


if __name__ == "__main__":
    run_main(main)
