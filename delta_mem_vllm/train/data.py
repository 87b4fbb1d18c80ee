"""Recall conversations: facts told in earlier turns and asked about later, with small talk between.

Every fact value comes from a pool split once into a training part and a held-out part, so held-out
conversations never mention a value the adapter was trained on. Names, places and words come from
Faker's word lists (the `train` extra), hundreds per kind, so values cannot be learnt by heart.
Rows are chat `messages` whose last message is the assistant's answer (the training target), plus
what the recall benchmark scores: `answer` (the value), `gap` (user turns between telling and
asking) and `kind`.

`load_locomo` reads LoCoMo-format files (`locomo10.json`) into the same row shape.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

def _faker_pools() -> dict[str, tuple[str, ...]]:
    """Large value pools from Faker's word lists (first names, GeoNames places, common English
    words): far more values than a training run sees twice, so the adapter cannot learn to guess a
    value and has to read it from the state."""
    try:
        from faker.providers.geo.en_US import Provider as Geo
        from faker.providers.lorem.en_US import Provider as Lorem
        from faker.providers.person.en_US import Provider as Person
    except ImportError:       # reading and training on your own data does not need it
        return {}

    def plain(words, lo: int, hi: int) -> tuple[str, ...]:
        return tuple(sorted({w for w in words if w.isalpha() and lo <= len(w) <= hi}))

    return {"name": plain(Person.first_names, 3, 9),
            "city": plain((c[2] for c in Geo.land_coords), 4, 9),
            "word": plain((w for w in Lorem.word_list if w.islower()), 6, 10)}


_FAKER = _faker_pools()
NAMES = _FAKER.get("name", ())
CITIES = _FAKER.get("city", ())
WORDS = _FAKER.get("word", ())
FOODS = ("ramen pizza tacos sushi paella lasagna curry falafel dumplings risotto pancakes burritos gnocchi "
         "moussaka pho bibimbap goulash pierogi couscous ceviche empanadas biryani shakshuka tagine waffles "
         "omelette chowder kebab noodles porridge quiche brisket meatballs gumbo jambalaya hummus tempura "
         "lobster oysters salmon tofu polenta fondue crepes pretzels bagels cheesecake tiramisu baklava").split()
JOBS = ("nurse baker pilot teacher plumber architect dentist chemist librarian carpenter journalist farmer "
        "electrician translator florist mechanic surveyor pharmacist geologist tailor lawyer surgeon banker "
        "painter sculptor firefighter detective astronomer biologist economist engineer jeweller locksmith "
        "photographer programmer physicist veterinarian waiter welder zoologist butcher").split()
PETS = ("Biscuit Pepper Mochi Noodle Waffle Pickle Ziggy Clover Bean Maple Nacho Olive Pumpkin Rocket Sprout "
        "Tofu Velvet Whiskers Button Cricket").split() + [n for n in NAMES if len(n) <= 6]
SPECIES = ("dog", "cat", "rabbit", "parrot", "hamster", "turtle")
COLOURS = ("teal crimson amber lavender olive maroon turquoise ochre indigo coral mint charcoal saffron "
           "magenta ivory beige scarlet violet emerald navy silver golden bronze cobalt cyan fuchsia khaki "
           "lilac mauve peach plum rust salmon tan taupe aqua azure orchid sepia burgundy").split()

SMALL_TALK = [
    ("What's a good way to start the morning?", "A glass of water and a few minutes of stretching work well."),
    ("Can you suggest a short book?", "Try a novella; many classics are under a hundred pages."),
    ("Any tips for sleeping better?", "Keep a regular bedtime and avoid screens late at night."),
    ("How do I keep plants alive?", "Water them when the soil is dry and give them enough light."),
    ("What should I cook tonight?", "A simple stir-fry with vegetables is quick and healthy."),
    ("Is it going to be a busy week?", "It might be; planning the big tasks early helps."),
    ("Tell me something interesting.", "Octopuses have three hearts and blue blood."),
    ("How can I learn a new language?", "A little practice every day beats long rare sessions."),
    ("What's a nice weekend activity?", "A walk in a park or a visit to a local market."),
    ("Do you like music?", "I enjoy talking about it; what do you listen to?"),
    ("How do I stay focused?", "Work in short blocks with small breaks in between."),
    ("Any advice for a long flight?", "Drink water, stretch your legs and bring a good book."),
]


@dataclass(frozen=True)
class FactKind:
    kind: str
    tell: tuple[str, ...]          # user sentences ({v}; {s} = species)
    ack: tuple[str, ...]           # assistant replies
    ask: tuple[str, ...]           # user questions
    answer: str                    # assistant answer


KINDS = {
    "name": FactKind("name", ("My name is {v}.", "Hi, I'm {v}.", "You can call me {v}."),
                     ("Nice to meet you, {v}!", "Hello {v}, how can I help?"),
                     ("What is my name?", "Do you remember my name?"), "Your name is {v}."),
    "city": FactKind("city", ("I live in {v}.", "My home is in {v}.", "I've been living in {v} for years."),
                     ("{v} sounds lovely.", "Good to know you live in {v}."),
                     ("Where do I live?", "Which city do I live in?"), "You live in {v}."),
    "food": FactKind("food", ("My favourite food is {v}.", "I love eating {v}."),
                     ("{v} is a great choice!", "Yum, {v}."),
                     ("What is my favourite food?", "What food do I love?"), "Your favourite food is {v}."),
    "job": FactKind("job", ("I work as a {v}.", "I'm a {v} by profession."),
                    ("Being a {v} must be interesting.", "A {v}, nice."),
                    ("What do I do for a living?", "What is my job?"), "You work as a {v}."),
    "pet": FactKind("pet", ("I have a {s} called {v}.", "My {s} is named {v}."),
                    ("{v} is a cute name for a {s}.", "Say hi to {v} for me."),
                    ("What is my {s}'s name?", "What did I name my {s}?"), "Your {s} is called {v}."),
    "number": FactKind("number", ("My lucky number is {v}.", "Remember this number for me: {v}."),
                       ("Noted: {v}.", "Got it, {v}."),
                       ("What is my lucky number?", "Which number did I ask you to remember?"),
                       "The number is {v}."),
    "word": FactKind("word", ("The secret word is {v}.", "Please remember the password: {v}."),
                     ("I'll remember it.", "Okay, the password is {v}."),
                     ("What is the secret word?", "What was the password?"), "The secret word is {v}."),
    "colour": FactKind("colour", ("My favourite colour is {v}.", "I really like the colour {v}."),
                       ("{v} is a beautiful colour.", "Nice, {v}."),
                       ("What is my favourite colour?", "Which colour do I like?"), "Your favourite colour is {v}."),
}
_TEMPLATE_WORDS = {w.lower() for text in [*(t for pair in SMALL_TALK for t in pair),
                                           *(t for k in KINDS.values() for t in (*k.tell, *k.ack, *k.ask, k.answer))]
                   for w in re.findall(r"[a-zA-Z]+", text)}
POOLS = {"name": NAMES, "city": CITIES, "food": tuple(dict.fromkeys(FOODS)), "job": tuple(dict.fromkeys(JOBS)),
         "pet": tuple(dict.fromkeys(PETS)), "colour": COLOURS,
         "word": tuple(w for w in WORDS if w not in _TEMPLATE_WORDS),
         "number": tuple(str(n) for n in range(10, 1000))}
# Closed sets: eight values per kind, most of them one token in common vocabularies. A memory then
# only has to carry which of eight it heard (chance 1/8), the task a small backbone can learn where
# copying an unseen value is out of its reach; train and held-out share the values and differ in the
# conversations (seeds), so a closed-set score is not a score on unseen values.
_CLOSED = {"name": "Tom Anna Sam Lucy Max Emma Jack Sarah", "city": "Paris London Tokyo Berlin Rome Madrid Boston Sydney",
           "food": "pizza pasta sushi rice soup cake bread cheese", "job": "nurse teacher pilot doctor farmer lawyer baker chef",
           "pet": "Buddy Luna Charlie Bella Rocky Daisy Milo Coco", "word": "apple river stone cloud tiger piano candle garden",
           "number": "2 3 4 5 6 7 8 9", "colour": "red blue green yellow purple orange pink black"}
CLOSED_POOLS = {k: tuple(v.split()) for k, v in _CLOSED.items()}
UPDATE = {"city": "Actually, I just moved to {v}.", "job": "I changed jobs: now I work as a {v}.",
          "number": "Forget the old number, my lucky number is now {v}."}


def _held_out(value: str) -> bool:
    """A fixed fifth of every pool, chosen by hash (stable across runs and machines)."""
    return int(hashlib.sha256(value.encode()).hexdigest(), 16) % 5 == 0


def pool(kind: str, split: str, values: str = "open") -> list[str]:
    """A kind's values for a split: `open` pools are split (held-out values never trained on), `closed` ones shared."""
    if values == "closed":
        return list(CLOSED_POOLS[kind])
    return [v for v in POOLS[kind] if _held_out(v) == (split == "heldout")]


def conversation(rng: random.Random, split: str, min_gap: int = 1, max_turns: int = 8,
                 allow_update: bool = True, values: str = "open", max_facts: int = 3) -> dict[str, Any]:
    """One conversation: 1–`max_facts` facts told, small talk, sometimes an update that overwrites a
    fact, then one question about a fact whose latest value was told at least `min_gap` user turns
    before it."""
    kinds = rng.sample(sorted(KINDS), rng.randint(1, max_facts))
    facts = {k: rng.choice(pool(k, split, values)) for k in kinds}
    species = rng.choice(SPECIES)
    turns: list[tuple[str, str, str | None, str]] = []     # (user, assistant, kind told, value)
    for k in kinds:
        turns.append((rng.choice(KINDS[k].tell), rng.choice(KINDS[k].ack), k, facts[k]))
    for _ in range(rng.randint(0, max(0, max_turns - len(turns) - 1))):
        turns.insert(rng.randint(1, len(turns)), (*rng.choice(SMALL_TALK), None, ""))
    updated = None
    cands = [k for k in kinds if k in UPDATE]
    if allow_update and cands and rng.random() < 0.25:
        updated = rng.choice(cands)
        facts[updated] = rng.choice([v for v in pool(updated, split, values) if v != facts[updated]])
        turns.append((UPDATE[updated], "Thanks for the update.", updated, facts[updated]))
    target = updated or rng.choice(kinds)
    told = max(i for i, t in enumerate(turns) if t[2] == target)
    while len(turns) - told < min_gap:
        turns.append((*rng.choice(SMALL_TALK), None, ""))

    def fill(text: str, v: str) -> str:
        return text.replace("{v}", v).replace("{s}", species)

    messages: list[dict[str, str]] = []
    for user, assistant, _, value in turns:
        messages += [{"role": "user", "content": fill(user, value)},
                     {"role": "assistant", "content": fill(assistant, value)}]
    f, value = KINDS[target], facts[target]
    messages += [{"role": "user", "content": fill(rng.choice(f.ask), value)},
                 {"role": "assistant", "content": fill(f.answer, value)}]
    return {"messages": messages, "answer": value, "kind": target, "gap": len(turns) - told,
            "updated": updated == target, "split": split, "values": values}


def conversations(n: int, split: str, seed: int, **kw: Any) -> Iterator[dict[str, Any]]:
    """`n` conversations, generated lazily; raises at once (not at the first item) without Faker."""
    if not _FAKER and kw.get("values", "open") == "open":
        raise RuntimeError("recall conversations draw values from Faker: pip install 'delta-mem-vllm[train]'")
    rng = random.Random(f"{seed}:{split}")
    return (conversation(rng, split, **kw) for _ in range(n))


def write_jsonl(rows: Iterator[dict[str, Any]] | list[dict[str, Any]], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_locomo(path: Path) -> list[dict[str, Any]]:
    """LoCoMo (`locomo10.json`): per sample, its sessions as alternating user/assistant turns (the
    two speakers, in order, with the session date), then one row per QA pair (categories 1–4)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = []
    for sample in data:
        conv = sample["conversation"]
        a = conv.get("speaker_a")
        history: list[dict[str, str]] = []
        sessions = sorted((k for k in conv if k.startswith("session_") and not k.endswith("date_time")),
                          key=lambda k: int(k.split("_")[1]))
        for key in sessions:
            date = conv.get(f"{key}_date_time", "")
            for i, turn in enumerate(conv[key]):
                role = "user" if turn["speaker"] == a else "assistant"
                text = f"[{date}] {turn['text']}" if i == 0 and date else turn["text"]
                if history and history[-1]["role"] == role:       # chat templates want alternation
                    history[-1]["content"] += "\n" + text
                else:
                    history.append({"role": role, "content": text})
        if history and history[0]["role"] != "user":
            history.insert(0, {"role": "user", "content": "Let's talk."})
        if history and history[-1]["role"] == "user":
            history.append({"role": "assistant", "content": "I see."})
        for qa in sample.get("qa", []):
            if qa.get("category") not in (1, 2, 3, 4) or "answer" not in qa:
                continue
            answer = str(qa["answer"])
            rows.append({"messages": history + [{"role": "user", "content": qa["question"]},
                                                {"role": "assistant", "content": answer}],
                         "answer": answer, "kind": f"locomo-{qa['category']}", "gap": None, "split": "locomo"})
    return rows
