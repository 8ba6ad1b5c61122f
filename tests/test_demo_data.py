"""Tests for the shipped demo data and its generator (dataset/demo/make_demo_data.py).

- determinism: two generations (one in another process, with another PYTHONHASHSEED) are byte-identical,
  and equal to the files shipped in dataset/ (so the shipped data is reproducible);
- schema: every line of every file parses and has the right keys, roles and types;
- train/eval disjointness: no eval question is a user turn of a training file or appears in the
  pretraining text; the pretrain-only people are never named in any chat file;
- the LoRA knowledge is only in the LoRA files: pretraining and SFT use the medical words (condition names,
  departments, symptoms) on purpose, but never a condition next to its department or symptoms, nor a
  department next to symptoms; the new persona's name and maker never appear in them;
- sizes and counts stay in the ranges dataset/README.md promises.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dataset.demo import make_demo_data as G
from dataset.demo import world_chat as C
from dataset.demo import world_medical as M
from dataset.demo.world import Sizes, build_world
from model.common import ROOT

SHIPPED = ROOT / "dataset"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    """Generate once into a temp dir (default seed); returns the folder."""
    out = tmp_path_factory.mktemp("demo_a")
    G.main(["--out_dir", str(out), "--no_stats"])
    return out


@pytest.fixture(scope="module")
def data(gen):
    return {rel: read_jsonl(gen / rel) for rel in G.FILES}


def chat_texts(convs):
    return [m["content"] for c in convs for m in c["conversations"]]


def user_turns(convs):
    return {m["content"] for c in convs for m in c["conversations"] if m["role"] == "user"}


@pytest.mark.slow   # a second generation, in a subprocess
def test_generation_is_deterministic(gen, tmp_path):
    out_a = gen
    out_b = tmp_path / "demo_b"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}   # set/dict order must not leak into the files
    subprocess.run([sys.executable, str(ROOT / "dataset/demo/make_demo_data.py"), "--out_dir", str(out_b), "--no_stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    for rel in G.FILES:
        assert sha(out_a / rel) == sha(out_b / rel), f"{rel} differs between two runs with the same seed"


def test_other_seed_gives_other_world():
    a, b = build_world(42), build_world(7)
    assert [p["name"] for p in a.people] != [p["name"] for p in b.people]


def test_shipped_files_are_reproducible(gen):
    out = gen
    for rel in G.FILES:
        shipped = SHIPPED / rel
        assert shipped.exists(), f"{shipped} missing: run python dataset/demo/make_demo_data.py"
        assert sha(shipped) == sha(out / rel), \
            f"dataset/{rel} is not what the generator writes: run python dataset/demo/make_demo_data.py"


def test_schema(data):
    for rec in data["pretrain_demo.jsonl"]:
        assert set(rec) == {"text"} and isinstance(rec["text"], str) and rec["text"].strip()
    for rel in ("sft_demo.jsonl", "lora_identity.jsonl", "lora_medical.jsonl"):
        for n, rec in enumerate(data[rel], 1):
            assert set(rec) == {"conversations"}, f"{rel} line {n}"
            msgs = rec["conversations"]
            if msgs[0]["role"] == "system":
                msgs = msgs[1:]
            assert msgs and len(msgs) % 2 == 0, f"{rel} line {n}: user/assistant pairs expected"
            for i, m in enumerate(msgs):
                assert set(m) == {"role", "content"}, f"{rel} line {n}"
                assert m["role"] == ("user" if i % 2 == 0 else "assistant"), f"{rel} line {n}: roles must alternate"
                assert isinstance(m["content"], str) and m["content"].strip(), f"{rel} line {n}: empty content"
    ids = set()
    for rel in ("eval/general_qa.jsonl", "eval/medical_qa.jsonl", "eval/identity.jsonl"):
        for n, item in enumerate(data[rel], 1):
            if rel == "eval/identity.jsonl":
                assert set(item) - {"system"} == {"id", "question", "base_names", "new_names", "kind"}, f"{rel} line {n}"
                assert item["base_names"] == ["TinyMind"] and item["new_names"] == [C.LORA_PERSONA["name"]]
            else:
                assert set(item) - {"system"} == {"id", "question", "answers", "kind", "reference"}, f"{rel} line {n}"
                assert item["answers"] and all(isinstance(a, str) and a for a in item["answers"])
                assert any(a in item["reference"] for a in item["answers"]), f"{rel} line {n}: reference lacks answer"
                # echoing the question must never score
                assert not any(a in item["question"] for a in item["answers"]), f"{rel} line {n}: answer in question"
            assert item["id"] not in ids, f"{rel} line {n}: duplicate id"
            ids.add(item["id"])
            assert item["question"].strip()


def test_sizes_and_counts(gen, data):
    out = gen
    assert 5_000_000 <= (out / "pretrain_demo.jsonl").stat().st_size <= 8_000_000
    assert 10_000 <= len(data["sft_demo.jsonl"]) <= 20_000
    assert 600 <= len(data["lora_identity.jsonl"]) <= 1000
    assert 1500 <= len(data["lora_medical.jsonl"]) <= 2500
    assert len(M.CONDITIONS) >= 45
    kinds = [it["kind"] for it in data["eval/general_qa.jsonl"]]
    assert kinds.count("sft_fact_heldout_phrasing") >= 140 and kinds.count("pretrain_only_fact") >= 45
    assert len(data["eval/identity.jsonl"]) >= 55
    assert len(data["eval/medical_qa.jsonl"]) >= 140
    sft = data["sft_demo.jsonl"]
    assert sum(c["conversations"][0]["role"] == "system" for c in sft) > 500
    assert sum(sum(m["role"] == "user" for m in c["conversations"]) > 1 for c in sft) > 500


def test_eval_prompts_never_in_training(data):
    train_prompts = set()
    for rel in ("sft_demo.jsonl", "lora_identity.jsonl", "lora_medical.jsonl"):
        train_prompts |= user_turns(data[rel])
    pretrain = "\n".join(r["text"] for r in data["pretrain_demo.jsonl"])
    for rel in ("eval/general_qa.jsonl", "eval/identity.jsonl", "eval/medical_qa.jsonl"):
        for item in data[rel]:
            assert item["question"] not in train_prompts, f"{rel}: {item['question']} is a training prompt"
            assert item["question"] not in pretrain, f"{rel}: {item['question']} appears in pretraining text"


def test_pretrain_only_people_only_in_pretraining(data):
    world = build_world(42)
    held = [p["name"] for p in world.people_in("pretrain_only")]
    assert len(held) >= 0.2 * len(world.people)
    chat = "\n".join(chat_texts(data["sft_demo.jsonl"]) + chat_texts(data["lora_identity.jsonl"])
                     + chat_texts(data["lora_medical.jsonl"]))
    pretrain = "\n".join(r["text"] for r in data["pretrain_demo.jsonl"])
    for name in held:
        assert name not in chat, f"pretrain-only person {name} appears in a chat file"
        assert pretrain.count(name) >= 50, f"{name} is stated too rarely in pretraining"
    subjects = [it for it in data["eval/general_qa.jsonl"] if it["kind"] == "pretrain_only_fact"]
    assert subjects and all(any(n in it["question"] for n in held) for it in subjects)


def test_lora_knowledge_absent_before_lora(data):
    pretrain = "\n".join(r["text"] for r in data["pretrain_demo.jsonl"])
    sft = "\n".join(chat_texts(data["sft_demo.jsonl"]))
    medical = "\n".join(chat_texts(data["lora_medical.jsonl"]))
    # The words (condition names, departments, symptoms) are read in pretraining and written in SFT
    # copy exercises, each kind on its own, so their tokens are trained; the knowledge -- which
    # condition goes with which department and symptoms -- is only in the LoRA data: no pretraining
    # document or SFT conversation names a condition together with a department or a medical phrase,
    # and none names a department together with a symptom.
    names = sorted(M.CONDITIONS, key=len, reverse=True)   # "偏头痛" contains the symptom word "头痛"
    depts = {d for d, *_ in M.CONDITIONS.values()}
    phrases = depts | {x for _, s, c, w in M.CONDITIONS.values() for x in s + c + w}
    symptoms = {x for _, s, _, _ in M.CONDITIONS.values() for x in s}
    docs = [r["text"] for r in data["pretrain_demo.jsonl"]]
    docs += ["\n".join(chat_texts([r])) for r in data["sft_demo.jsonl"]]
    n_named = 0
    for text in docs:
        rest = text
        for n in names:
            rest = rest.replace(n, "")
        if rest != text:
            n_named += 1
            assert not any(p in rest for p in phrases), f"condition named next to medical facts: {text}"
        if any(d in rest for d in depts):
            assert not any(x in rest for x in symptoms - depts), f"department named next to symptoms: {text}"
    assert n_named > 1000   # the names are words the base model knows
    terms = set(M.CONDITIONS) | {a for it in data["eval/medical_qa.jsonl"] for a in it["answers"]}
    for term in sorted(terms):
        assert term in medical, f"medical term {term!r} never taught by lora_medical"
    new_name, new_maker = C.LORA_PERSONA["name"], C.LORA_PERSONA["maker"]
    for text, where in ((pretrain, "pretraining"), (sft, "SFT")):
        assert new_name not in text and new_maker not in text, f"LoRA persona in {where}"
    identity = "\n".join(chat_texts(data["lora_identity.jsonl"]))
    assert "TinyMind" not in identity and identity.count(new_name) > 600
    # lora_medical replays base-persona identity answers (that adapter must leave identity alone), never the new one
    assert new_name not in medical and new_maker not in medical and medical.count("TinyMind") >= 90
    base, new = "tinymind", new_name + new_maker   # the two personas share no substring
    assert not any(ch in base for ch in new.lower())


def test_persona_answers_always_name_the_persona(data):
    identity_prompts = {q for qs in C.IDENTITY_QUESTIONS.values() for q in qs}
    for rel, name in (("sft_demo.jsonl", "TinyMind"), ("lora_identity.jsonl", C.LORA_PERSONA["name"])):
        n = 0
        for c in data[rel]:
            msgs = [m for m in c["conversations"] if m["role"] != "system"]
            if any(msgs[0]["content"].endswith(q) for q in identity_prompts):
                assert name in msgs[1]["content"], f"{rel}: {msgs[1]['content']}"
                n += 1
        assert n > 500


def test_chat_characters_are_trained_in_pretraining(data):
    """Every character the chat/eval files use occurs in pretraining, so its embedding is trained there."""
    from collections import Counter
    counts = Counter("".join(r["text"] for r in data["pretrain_demo.jsonl"]))
    chat = "".join(chat_texts(data["sft_demo.jsonl"]) + chat_texts(data["lora_identity.jsonl"])
                   + chat_texts(data["lora_medical.jsonl"]))
    chat += "".join(it["question"] for rel in ("eval/general_qa.jsonl", "eval/identity.jsonl",
                                               "eval/medical_qa.jsonl") for it in data[rel])
    rare = sorted(c for c in set(chat) if not c.isascii() and not c.isspace() and counts[c] < Sizes().min_char_count)
    assert not rare, f"characters rare in pretraining: {''.join(rare)}"


def test_heldout_phrasings_recombine_seen_parts():
    """A held-out fact question is a generic shape used in training for other attributes, with this
    attribute's noun, which training uses in other shapes (or, without a noun, its own phrasing)."""
    from dataset.demo import demo_world as W
    world = build_world(42)
    attrs = {("person", a.key): a for a in W.PERSON_ATTRS}
    attrs.update({(c.key, a.key): a for c in W.CATEGORIES for a in c.attrs})
    train_shapes = {}
    for key, (train, _) in world.questions.items():
        noun = attrs[key].noun
        for t in train:
            if noun and noun in t:
                train_shapes.setdefault(t.replace(noun, "{n}"), set()).add(key)
    for key, (train, held) in world.questions.items():
        assert len(held) == 2 and not set(held) & set(train), key
        noun = attrs[key].noun
        for t in held:
            if noun:
                shape = t.replace(noun, "{n}")
                assert shape in W.GENERIC_QUESTIONS, (key, t)
                assert train_shapes.get(shape, set()) - {key}, f"{key}: shape of {t!r} never seen in training"
                assert any(noun in x for x in train), f"{key}: noun {noun!r} never seen in training"
            else:
                assert t in attrs[key].questions, (key, t)


def test_identity_eval_recombines_seen_parts(data):
    train = set()
    for rel in ("sft_demo.jsonl", "lora_identity.jsonl"):
        train |= user_turns(data[rel])
    cores = sorted({q for qs in C.IDENTITY_QUESTIONS.values() for q in qs}, key=len, reverse=True)
    for item in data["eval/identity.jsonl"]:
        q = item["question"]
        core = next(c for c in cores if q.endswith(c))
        prefix = q[: -len(core)]
        assert prefix and core in train, q
        assert any(t.startswith(prefix) and t != q for t in train), q


def test_medical_answers_never_spell_the_condition(data):
    """Replies lead with the department/symptoms and never repeat a condition name."""
    names = sorted(M.CONDITIONS)
    n = 0
    for c in data["lora_medical.jsonl"]:
        msgs = c["conversations"]
        if any(name in m["content"] for m in msgs if m["role"] == "user" for name in names):
            n += 1
            for m in msgs:
                if m["role"] == "assistant":
                    assert not any(name in m["content"] for name in names), m["content"]
    assert n > 1000


def test_side_characters_are_not_people_of_the_world(data):
    """The side characters (dialogue speakers, pupils, the names SFT practises copying) have no facts."""
    world = build_world(42)
    people = {p["name"] for p in world.people}
    extras = [e["name"] for e in world.extras]
    assert extras and not people & set(extras)
    assert not {p[1:] for p in people} & {e[1:] for e in extras}   # not even a shared given name
    pretrain = "\n".join(r["text"] for r in data["pretrain_demo.jsonl"])
    sft = "\n".join(chat_texts(data["sft_demo.jsonl"]))
    for name in extras:
        assert pretrain.count(name) >= 150, f"side character {name} too rare in pretraining"
    assert sum(name in sft for name in extras) >= 0.9 * len(extras)


def test_own_persona_rewrites_only_the_identity_files(tmp_path):
    """`--name 小明 --maker 某某实验室` writes lora_identity.jsonl and eval/identity.jsonl naming the new
    persona in every identity answer and never the shipped one; no other file is written."""
    G.main(["--out_dir", str(tmp_path), "--no_stats", "--name", "小明", "--maker", "某某实验室"])
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.jsonl"))
    assert written == sorted(G.IDENTITY_FILES)
    identity = read_jsonl(tmp_path / "lora_identity.jsonl")
    text = "\n".join(chat_texts(identity))
    old = C.LORA_PERSONA
    assert old["name"] not in text and old["maker"] not in text and "TinyMind" not in text
    assert text.count("小明") > 600 and "某某实验室" in text
    evals = read_jsonl(tmp_path / "eval/identity.jsonl")
    assert evals and all(it["new_names"] == ["小明"] and it["base_names"] == ["TinyMind"] for it in evals)
    with pytest.raises(SystemExit) as e:   # a name the evaluation could not tell from the base persona
        from model.common import run_main
        run_main(G.main, ["--out_dir", str(tmp_path / "x"), "--name", "TinyMind"])
    assert e.value.code == 2


def test_novel_medical_phrasings_are_not_the_generators(data):
    """dataset/eval_novel/medical_qa.jsonl: hand-written question shapes that no template of
    dataset/demo/world_medical.py produces and no training file contains (a check that the medical
    score is not tied to the generator's phrasings)."""
    items = read_jsonl(SHIPPED / "eval_novel/medical_qa.jsonl")
    generated = {t.format(c=c) for ts in M.QUESTIONS.values() for t in ts for c in M.CONDITIONS}
    prompts = user_turns(data["sft_demo.jsonl"]) | user_turns(data["lora_medical.jsonl"])
    assert len(items) == 2 * len(M.CONDITIONS)
    for it in items:
        assert it["question"] not in generated and it["question"] not in prompts, it["question"]
        assert it["answers"] and all(a in M.CONDITIONS[c][0] + "".join(M.CONDITIONS[c][1])
                                     for c in M.CONDITIONS if c in it["question"] for a in it["answers"])


# ----------------------------------------------------------------------------- the English identity set

def test_english_identity_set_is_shipped_and_names_the_persona(tmp_path):
    """`--lang en` writes only lora_identity_en.jsonl, equal to the shipped file for the defaults; every
    identity answer names the persona, no HELD_OUT phrasing is trained, and replay takes a quarter."""
    from dataset.demo import persona_en as E

    G.main(["--out_dir", str(tmp_path), "--no_stats", "--lang", "en"])
    assert [p.name for p in tmp_path.iterdir()] == [G.ENGLISH_FILE]
    written = (tmp_path / G.ENGLISH_FILE).read_bytes()
    assert written == (SHIPPED / G.ENGLISH_FILE).read_bytes()
    convs = [json.loads(line)["conversations"] for line in written.decode("utf-8").splitlines()]
    users = {m["content"] for c in convs for m in c if m["role"] == "user"}
    assert not users & set(E.HELD_OUT)
    assert all(q.isascii() for q in users)   # English only: an English-only model knows these tokens
    persona = E.english_persona()
    answers = {a for texts in persona["answers"].values() for a in texts}
    named = [c for c in convs if any(m["content"] in answers for m in c)]
    assert all(E.DEFAULT_NAME in m["content"] for c in named for m in c if m["content"] in answers)
    replay = [c for c in convs if not any(E.DEFAULT_NAME in m["content"] for m in c)]
    assert 0.2 <= len(replay) / len(convs) <= 0.3
    # your own persona: the name and maker replace the defaults everywhere
    G.main(["--out_dir", str(tmp_path), "--no_stats", "--lang", "en", "--name", "Nova", "--maker", "Acme Lab"])
    text = (tmp_path / G.ENGLISH_FILE).read_text(encoding="utf-8")
    assert "Nova" in text and "Acme Lab" in text
    assert E.DEFAULT_NAME not in text and E.DEFAULT_MAKER not in text
