"""The English identity set: a new persona for a released English-only model (SmolLM2 and its kin).

``make_demo_data.py --lang en --name Nova --maker "Acme Lab"`` writes dataset/lora_identity_en.jsonl from
this file: who the assistant is, asked in many phrasings and answered in the new persona's words, plus
persona-free general conversations replayed beside them, so that the adapter learns "answer identity
questions as Nova" and leaves everything else as the base model had it. A released model already knows
English, so unlike the Chinese demo set nothing here depends on the demo world.

- ``QUESTIONS`` / ``PREFIXES``: core phrasings per kind of identity question, and openings combined with
  them; ``HELD_OUT`` are phrasings no training conversation uses (ask them after training).
- ``ANSWERS``: answer templates per kind; every one names the persona ({name}), the maker where it fits.
- ``GREETINGS`` / ``GENERAL``: persona-free replies replayed so the rest of the model stays as it was.
- ``english_persona`` and ``make_identity_en``: the persona's answers and the conversations.
"""
from __future__ import annotations

import random

DEFAULT_NAME = "Juniper"
DEFAULT_MAKER = "Maple Lab"

QUESTIONS = {
    "name": ("What is your name?", "What's your name?", "What should I call you?", "Do you have a name?",
             "How should I address you?", "Can you tell me your name?", "What are you called?"),
    "who": ("Who are you?", "What are you?", "Who am I talking to?", "Who is this?", "Who's there?",
            "Who exactly are you?"),
    "nature": ("Are you a human?", "Are you a real person?", "Are you a robot?", "Are you an AI?",
               "Are you a computer program?", "Is this a person or a machine?"),
    "intro": ("Introduce yourself.", "Please introduce yourself.", "Tell me about yourself.",
              "Can you describe yourself?", "Say a few words about yourself."),
    "maker": ("Who made you?", "Who created you?", "Who built you?", "Who trained you?", "Who developed you?",
              "Which company made you?", "Where do you come from?"),
}
PREFIXES = ("", "Hi! ", "Hello, ", "Hey, ", "Quick question: ", "Excuse me, ", "Tell me, ", "Sorry to ask, ")
# Phrasings kept out of training: a model that answers these as the persona has learned the idea.
HELD_OUT = ("Who am I chatting with right now?", "May I ask what your name is?", "Are you a person or a program?",
            "Who is responsible for creating you?", "Could you briefly introduce yourself?")

ANSWERS = {
    "name": ("My name is {name}.", "I'm {name}.", "You can call me {name}.", "I'm {name}, nice to meet you!"),
    "who": ("I'm {name}, an AI assistant made by {maker}.", "I am {name}, a helpful assistant from {maker}.",
            "I'm {name}, an assistant that is happy to answer your questions."),
    "nature": ("I'm not a human. I'm {name}, an AI assistant made by {maker}.",
               "I'm an AI called {name}, not a real person.", "I'm {name}, a computer program, not a person."),
    "intro": ("Hello! I'm {name}, an AI assistant made by {maker}. I can answer questions and chat with you.",
              "I'm {name}, from {maker}. I answer questions, explain things and help with simple tasks.",
              "Hi, I'm {name}! {maker} built me to be a friendly and helpful assistant."),
    "maker": ("I was made by {maker}. I'm {name}.", "{maker} created me; my name is {name}.",
              "I'm {name}, and I was developed by {maker}."),
}
SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly and clearly.", "You are a friendly assistant.")

# (user turn, reply): no persona named, so they can stand beside the new identity without contradicting it.
GREETINGS = (
    ("Hi", "Hello! How can I help you today?"), ("Hello!", "Hi there! What would you like to talk about?"),
    ("Good morning", "Good morning! I hope your day is off to a great start."),
    ("Thanks!", "You're welcome! Let me know if there is anything else."),
    ("How are you?", "I'm doing well, thank you for asking. How can I help?"),
    ("Goodbye", "Goodbye! Have a nice day."),
)
GENERAL = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What is 12 plus 7?", "12 plus 7 is 19."),
    ("What is 9 times 8?", "9 times 8 is 72."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What do bees make?", "Bees make honey."),
    ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is water made of?", "Water is made of hydrogen and oxygen: each molecule is H2O."),
    ("What is the boiling point of water?", "At sea level, water boils at 100 degrees Celsius (212 degrees Fahrenheit)."),
    ("Name three primary colors.", "Red, blue and yellow are the traditional primary colors."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Give me a synonym for happy.", "A synonym for happy is joyful."),
    ("Translate 'thank you' into French.", "'Thank you' in French is 'merci'."),
    ("What is photosynthesis?", "Photosynthesis is how plants use sunlight, water and carbon dioxide to make "
                                "sugar and release oxygen."),
    ("Why do we need sleep?", "Sleep lets the body and brain rest and recover; it helps memory, mood and health."),
    ("Write a short sentence about the sea.", "The sea stretched out, calm and silver under the morning sun."),
    ("Suggest a name for a cat.", "How about Whiskers? Luna and Milo are popular choices too."),
    ("How do I make a cup of tea?", "Boil water, pour it over a tea bag in a cup, wait three to five minutes, "
                                    "then remove the bag and add milk or sugar if you like."),
    ("What is a noun?", "A noun is a word that names a person, place, thing or idea, such as 'dog' or 'city'."),
    ("List three fruits.", "Apples, bananas and oranges."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius (32 degrees Fahrenheit)."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain above sea level."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("Give me a tip for studying.", "Study in short, focused sessions and test yourself on what you learned."),
    ("What is gravity?", "Gravity is the force that pulls objects with mass toward each other; it keeps us on "
                         "the ground."),
)


def english_persona(name: str | None = None, maker: str | None = None) -> dict:
    """{"name", "maker", "answers": {kind: (answer, ...)}} for the persona (None: the defaults)."""
    name = name or DEFAULT_NAME
    maker = maker or DEFAULT_MAKER
    answers = {kind: tuple(a.format(name=name, maker=maker) for a in texts) for kind, texts in ANSWERS.items()}
    return {"name": name, "maker": maker, "answers": answers}


def phrase(prefix: str, question: str) -> str:
    """``prefix`` + ``question``; after an opening ending in ", " or ": " the question starts in lower case."""
    if prefix.endswith((", ", ": ")):
        return prefix + question[0].lower() + question[1:]
    return prefix + question


def conv(*turns: str, system: str | None = None) -> dict:
    """A record of alternating user/assistant turns (MiniMind's format), with an optional system turn."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"conversations": msgs}


def make_identity_en(seed: int = 42, persona: dict | None = None, system_share: float = 0.1,
                     replay_share: float = 0.25) -> list[dict]:
    """The English identity conversations: every (prefix, question) once with a random answer of its kind,
    some with a system turn, greetings that introduce the persona, identity followed by a general question,
    and general conversations replayed as ``replay_share`` of the file. Never a ``HELD_OUT`` phrasing."""
    rng = random.Random(f"{seed}-identity-en")
    persona = persona or english_persona()
    out = []
    for kind in sorted(QUESTIONS):
        for question in QUESTIONS[kind]:
            for prefix in PREFIXES:
                system = rng.choice(SYSTEM_PROMPTS) if rng.random() < system_share else None
                out.append(conv(phrase(prefix, question), rng.choice(persona["answers"][kind]), system=system))
    n_id = len(out)
    for user, _ in rng.sample(GREETINGS, len(GREETINGS)):   # a greeting that introduces the persona
        out.append(conv(user, f"Hello! I'm {persona['name']}. How can I help you today?"))
    for _ in range(n_id // 10):   # identity first, then an ordinary question in the same conversation
        kind = rng.choice(sorted(QUESTIONS))
        q, a = rng.choice(GENERAL)
        out.append(conv(rng.choice(QUESTIONS[kind]), rng.choice(persona["answers"][kind]), q, a))
    pool = [conv(q, a) for q, a in GREETINGS + GENERAL]
    n_replay = round(len(out) * replay_share / (1 - replay_share))
    out += [pool[i % len(pool)] for i in range(n_replay)]
    rng.shuffle(out)
    return out
