"""The demo world and the helpers every part of the generator shares (dataset/demo/make_demo_data.py).

What this module implements:

- ``Sizes``: how much of each kind of text the generator writes.
- ``build_world``: draws the people of the demo world (name, gender, five attributes from small closed
  sets), splits them into a training split and a ``pretrain_only`` split whose facts are never asked in
  SFT, adds side characters without facts, and collects every (subject, attribute, value) fact of
  people and real-world entities as ``Fact`` objects in a ``World``.
- ``plan_questions``: 10 question phrasings per attribute, 2 of them held out for evaluation.
- ``is_ambiguous``: whether a wrong answer would still contain a scoring keyword (such facts are not
  evaluated).
- helpers: ``conv`` (turns -> a ChatML record), ``join_cn``, template slots for stories and dialogues
  (``person_slots``, ``people_slots``, ``fill``), and the medical vocabulary lists
  ``MED_DEPARTMENTS`` / ``MED_PHRASES`` shared by pretraining, SFT and the LoRA replay pool.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from dataset.demo import demo_world as W
from dataset.demo import world_medical as M

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
    medical_replay_share: float = 0.4   # new knowledge is learned at the cost of old: more replay, less forgetting
    medical_persona_replay: int = 90   # base-persona identity turns in lora_medical: that adapter leaves identity alone
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




# The medical vocabulary, one kind per list: departments, and the symptom ("s"), self-care ("c") and
# warning ("w") phrases that contain no condition name. Used by hospital_docs and copy_words.
MED_DEPARTMENTS = sorted({v[0] for v in M.CONDITIONS.values()})
MED_PHRASES = {k: sorted({x for v in M.CONDITIONS.values() for x in v[i] if not any(c in x for c in M.CONDITIONS)})
               for k, i in (("s", 1), ("c", 2), ("w", 3))}
