"""SFT conversations of the demo data (sft_demo.jsonl); called by dataset/demo/make_demo_data.py.

What this module implements (``make_sft`` puts it together):

- fact Q&A (training split, training phrasings), yes/no questions, short biographies;
- greetings and small talk, the base persona "TinyMind" (``persona_convs``, ``identity_prompts``);
- simple instructions (arithmetic, counting, lists, antonyms, repeat, ...): ``instruction``;
- copy exercises: names of side characters (``name_in_context``), medical words one kind per list
  (``copy_words``: condition names, or departments, or symptom words) and pieces of the LoRA persona
  (``copy_persona_pieces``), so the base model has *written* every token the LoRA sets need;
- multi-turn conversations and conversations with a system turn.

What SFT may and may not contain (medical words never paired, no LoRA persona) is checked by
tests/test_demo_data.py::test_lora_knowledge_absent_before_lora.
"""
from __future__ import annotations

import random

from dataset.demo import demo_world as W
from dataset.demo import world_chat as C
from dataset.demo import world_medical as M
from dataset.demo import world_stories as S
from dataset.demo.world import MED_DEPARTMENTS, MED_PHRASES, Fact, Sizes, World, conv, fill, people_slots

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

