"""Pretraining text of the demo data (pretrain_demo.jsonl); called by dataset/demo/make_demo_data.py.

What this module implements (``make_pretrain`` puts it together and shuffles it):

- biographies (shuffled sentence order, several phrasings per fact) and person cards;
- encyclopedia entries of real-world entities and list documents that read facts the other way round;
- stories with cause and effect, dialogues (people of the world and side characters), small talk,
  classroom scenes, paragraphs about computers and AI, number facts;
- ``hospital_docs``: hospital vocabulary lists (departments, symptom words, self-care and warning
  phrases) that never name a condition;
- ``condition_docs``: plain descriptions of the condition names (body part, kind of illness), never a
  department or a symptom;
- ``literacy_docs``: a literacy section ("识字") that makes sure every character used by the chat
  files also occurs in pretraining.

Which medical words may stand together in one document is checked by
tests/test_demo_data.py::test_lora_knowledge_absent_before_lora.
"""
from __future__ import annotations

import random
from collections import Counter

from dataset.demo import demo_world as W
from dataset.demo import world_chat as C
from dataset.demo import world_medical as M
from dataset.demo import world_stories as S
from dataset.demo.sft_chat import instruction
from dataset.demo.world import (MED_DEPARTMENTS, MED_PHRASES, Fact, Sizes, World, fill, join_cn,
                                people_slots)

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

