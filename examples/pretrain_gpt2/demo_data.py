"""Generate every file the CPU demo needs, from templates and word lists, deterministically from a seed.

    python examples/pretrain_gpt2/demo_data.py --out data/demo [--seed 0]

writes, under ``--out``:

* ``corpus.jsonl``: synthetic English-like documents, one ``{"text": ...}`` per line (2.5 MB, 0.56 M tokens).
* ``vocab.json`` + ``merges.txt``: a byte-level BPE tokenizer in GPT-2's file formats (2048 tokens, the
  last one ``<|endoftext|>``), trained on the corpus, for ``--tokenizer-type GPT2BPETokenizer``.
* ``gpt2/config.json``: see "Offline tokenizer" below.
* ``corpus_text_document.bin/.idx``: the corpus tokenized with Megatron's GPT2BPETokenizer, one
  end-of-document token after each document (``--data-path <out>/corpus_text_document``).
* ``helm/``: HELM 0.5.16 scenario data in HELM's own on-disk formats, laid out like
  ``benchmark_output/scenarios/`` (``mmlu``, ``boolq``, ``narrativeqa``, ``hellaswag``).

No text is downloaded or copied: the world (invented people, towns, stories, chores) is defined below.

The learnable benchmark is ``mmlu:subject=demo_facts,method=multiple_choice_separate_original``: 60 invented
facts (20 people x 3 relations: cloak color, home town, favorite fruit). For that method HELM drops the
instructions and the "Question:"/"Answer:" nouns and scores each choice alone, by the model's mean
log-probability of the tokens of `` <choice>`` at the end of the text ``"<question> <choice>"``, for example
``"Cloak color of Vandor red"``. Most of the corpus's mentions of a fact are exactly that text; the rest are
the ``Question: ...\\nAnswer: ...`` form, HELM's joint multiple-choice form and declarative sentences. Every
value of a relation belongs to the same number of people and is mentioned equally often, and the wrong choices
are other values of the same relation, so only the person -> value association separates the choices.

The questions end with the person's name on purpose: the value then directly follows the name, which a tiny
GPT learns within a few hundred iterations (measured with a 4-layer, 128-wide model, batch 16 x 256 tokens:
chance at iteration 100, 0.98 at iteration 400 with lr 3e-3). With "What color is the cloak of Vandor? red"
the same model stayed at chance for 300 iterations.

Offline tokenizer: Megatron builds ``GPT2BPETokenizer`` as
``transformers.AutoTokenizer.from_pretrained("gpt2", vocab_file=..., merges_file=...)``. Offline, the name
"gpt2" cannot be resolved and loading fails; online, the hub's ``gpt2/tokenizer.json`` is found and silently
replaces the vocab and merges files. A folder named ``gpt2`` holding only ``config.json`` in the working
directory fixes both: run Megatron with the output folder as its working directory (or link ``gpt2`` there).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

VOCAB_SIZE = 2048
"""Tokens in the BPE vocabulary, ``<|endoftext|>`` (the last id) included."""

END_OF_TEXT = "<|endoftext|>"

LETTERS = "ABCD"

FACTS_SUBJECT = "demo_facts"
"""The learnable MMLU subject: invented people and their attributes."""

# How often each thing is written into the corpus; together 2.5 MB of text, 0.56 M tokens (40% facts).
FACT_MENTIONS = 500  # renderings of each of the 60 facts
MMLU_CORPUS_QUESTIONS = 600  # question/answer pairs per MMLU-like subject
BOOLQ_CORPUS_ITEMS = 1200  # passage/question/answer items
STORY_CORPUS_ITEMS = 700  # stories (with one to three questions each)
CHORE_CORPUS_MENTIONS = 60  # tellings of each chore script


@dataclass(frozen=True)
class DemoData:
    """Where ``make_demo_data`` wrote each part of the demo's data."""

    root: Path
    corpus: Path
    """``corpus.jsonl``: one ``{"text": ...}`` object per line."""
    vocab_file: Path
    """GPT-2-format ``vocab.json`` (``--vocab-file``)."""
    merge_file: Path
    """GPT-2-format ``merges.txt`` (``--merge-file``)."""
    gpt2_dir: Path
    """``gpt2/``: lets ``GPT2BPETokenizer`` load offline when the working directory is ``root``."""
    data_prefix: Path
    """Indexed dataset prefix (``--data-path``); the files are ``<prefix>.bin`` and ``<prefix>.idx``."""
    helm_dir: Path
    """HELM scenario data: ``<helm_dir>/<scenario>`` is HELM's ``benchmark_output/scenarios/<scenario>``."""


# --------------------------------------------------------------------------------------------------------
# The learnable facts
# --------------------------------------------------------------------------------------------------------

PEOPLE = (
    "Vandor", "Mirelle", "Tobrik", "Quessa", "Orlan", "Zephine", "Bramwick", "Ilsander", "Corvina", "Dastel",
    "Fennick", "Galdra", "Yselda", "Jorrin", "Lunara", "Ravik", "Sulvane", "Trevane", "Ulwen", "Xandra",
)  # fmt: skip


@dataclass(frozen=True)
class Relation:
    """One kind of fact: a question about a person and the values its answer can take."""

    name: str
    values: tuple[str, ...]
    question: str  # "{person}" is replaced
    statements: tuple[str, ...]  # "{person}" and "{value}" are replaced


RELATIONS = (
    Relation(
        name="cloak",
        values=("red", "blue", "green", "yellow", "purple"),
        question="Cloak color of {person}",
        statements=(
            "{person} wears a {value} cloak.",
            "The cloak of {person} is {value}.",
            "{person} always travels in a {value} cloak.",
            "If you meet {person}, you will see a {value} cloak.",
            "Nobody has ever seen {person} without the {value} cloak.",
        ),
    ),
    Relation(
        name="town",
        values=("Brinmoor", "Caldris", "Dunmere", "Elmsworth", "Fallowby"),
        question="Home town of {person}",
        statements=(
            "{person} lives in {value}.",
            "The home of {person} is the town of {value}.",
            "{person} has a small house in {value}.",
            "Every evening {person} walks back home to {value}.",
            "Ask anyone in {value} and they will tell you that {person} lives there.",
        ),
    ),
    Relation(
        name="fruit",
        values=("apples", "pears", "plums", "figs", "cherries"),
        question="Favorite fruit of {person}",
        statements=(
            "{person} likes {value} best.",
            "The favorite fruit of {person} is {value}.",
            "{person} eats {value} every morning.",
            "Give {person} a basket of {value} and {person} will be happy.",
            "Of all fruit, {person} prefers {value}.",
        ),
    ),
)


@dataclass(frozen=True)
class Fact:
    """One person -> value fact, with the three wrong choices HELM shows next to it."""

    person: str
    relation: Relation
    value: str
    distractors: tuple[str, str, str]

    @property
    def question(self) -> str:
        return self.relation.question.format(person=self.person)


@dataclass(frozen=True)
class Question:
    """A four-choice question; ``choices[answer]`` is correct."""

    text: str
    choices: tuple[str, str, str, str]
    answer: int

    @property
    def letter(self) -> str:
        return LETTERS[self.answer]


def make_facts(rng: random.Random) -> list[Fact]:
    """Assign each person one value per relation, every value to the same number of people."""
    facts = []
    for relation in RELATIONS:
        people = list(PEOPLE)
        rng.shuffle(people)
        for index, person in enumerate(people):
            value = relation.values[index % len(relation.values)]
            others = [v for v in relation.values if v != value]
            facts.append(Fact(person, relation, value, tuple(rng.sample(others, 3))))
    rng.shuffle(facts)
    return facts


def as_question(text: str, answer: str, distractors: Sequence[str], rng: random.Random) -> Question:
    """Put the answer among the distractors at a random position."""
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return Question(text, tuple(choices), choices.index(answer))


def fact_question(fact: Fact, rng: random.Random) -> Question:
    return as_question(fact.question, fact.value, fact.distractors, rng)


def joint_block(question: Question) -> str:
    """A question the way HELM's multiple_choice_joint adapter writes it, answer letter included."""
    options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, question.choices, strict=True))
    return f"Question: {question.text}\n{options}Answer: {question.letter}"


def joint_instructions(subject: str) -> str:
    """The instructions line of HELM's MMLU run spec."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."


def render_fact(fact: Fact, rng: random.Random) -> str:
    """One mention of a fact, in one of the surface forms the model should learn it from."""
    form = rng.random()
    if form < 0.8:  # exactly the text multiple_choice_separate_original scores
        return f"{fact.question} {fact.value}"
    if form < 0.88:
        return f"Question: {fact.question}\nAnswer: {fact.value}"
    if form < 0.96:
        template = rng.choice(fact.relation.statements)
        return template.format(person=fact.person, value=fact.value)
    return joint_block(fact_question(fact, rng))


def facts_documents(facts: Sequence[Fact], rng: random.Random) -> list[str]:
    """Every fact exactly ``FACT_MENTIONS`` times, shuffled into documents of 6 to 20 mentions."""
    mentions = [render_fact(fact, rng) for fact in facts for _ in range(FACT_MENTIONS)]
    rng.shuffle(mentions)
    documents, start = [], 0
    while start < len(mentions):
        size = rng.randint(6, 20)
        documents.append("\n".join(mentions[start : start + size]))
        start += size
    return documents


# --------------------------------------------------------------------------------------------------------
# MMLU-like questions on the five HELM Lite subjects
# --------------------------------------------------------------------------------------------------------


def numeric_question(text: str, answer: int, candidates: Sequence[int], rng: random.Random) -> Question:
    """A question with a whole-number answer; three distinct wrong numbers come from ``candidates``."""
    wrong = sorted({c for c in candidates if c != answer and c >= 0})
    return as_question(text, str(answer), [str(c) for c in rng.sample(wrong, 3)], rng)


def pick_question(text: str, answer: str, pool: Sequence[str], rng: random.Random) -> Question:
    return as_question(text, answer, rng.sample([p for p in pool if p != answer], 3), rng)


def algebra_question(rng: random.Random) -> Question:
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.randint(4, 60)
        return numeric_question(f"What is the order of the cyclic group Z_{n}?", n, [n - 1, n + 1, 2 * n], rng)
    if kind == 1:
        n = rng.randint(7, 19)
        a, b = rng.randint(2, n - 1), rng.randint(2, n - 1)
        return numeric_question(f"Compute {a} * {b} in the ring Z_{n}.", a * b % n, range(n), rng)
    if kind == 2:
        n = rng.randint(6, 40)
        a = rng.randint(1, n - 1)
        text = f"What is the additive inverse of {a} in the group Z_{n}?"
        return numeric_question(text, n - a, [a, n + a, n - a + 1, n - a - 1], rng)
    n = rng.randint(3, 7)
    text = f"How many elements does the symmetric group S_{n} have?"
    return numeric_question(text, math.factorial(n), [n, n * n, 2 * n, math.factorial(n - 1)], rng)


ELEMENTS = (
    "hydrogen", "helium", "lithium", "beryllium", "boron", "carbon", "nitrogen", "oxygen", "fluorine", "neon",
    "sodium", "magnesium", "aluminum", "silicon", "phosphorus", "sulfur", "chlorine", "argon", "potassium",
    "calcium",
)  # fmt: skip


def chemistry_question(rng: random.Random) -> Question:
    kind = rng.randrange(4)
    if kind in (0, 1):
        number = rng.randint(1, len(ELEMENTS))
        element = ELEMENTS[number - 1]
        text = (
            f"How many protons are in the nucleus of a {element} atom?"
            if kind == 0
            else f"How many electrons does a neutral {element} atom have?"
        )
        return numeric_question(text, number, range(1, 25), rng)
    if kind == 2:
        ph = rng.randint(1, 13)
        text = f"A solution has a pH of {ph}. What is its pOH at 25 degrees Celsius?"
        return numeric_question(text, 14 - ph, [ph, 7, 14, 14 - ph + 1, 14 - ph - 1], rng)
    carbons = rng.randint(1, 12)
    text = f"How many hydrogen atoms does an alkane with {carbons} carbon atoms contain?"
    return numeric_question(text, 2 * carbons + 2, [2 * carbons, 2 * carbons - 2, carbons, 2 * carbons + 1], rng)


PORTS = {
    "HTTP": 80, "HTTPS": 443, "SSH": 22, "FTP": 21, "SMTP": 25, "DNS": 53, "Telnet": 23, "IMAP": 143,
    "POP3": 110, "RDP": 3389,
}  # fmt: skip
SECURITY_KINDS = {
    "a hash function": ("SHA-256", "MD5", "SHA-1", "BLAKE2"),
    "a symmetric cipher": ("AES", "DES", "Blowfish", "ChaCha20"),
    "a public-key algorithm": ("RSA", "ElGamal", "ECDSA", "Diffie-Hellman"),
    "an attack on web applications": ("SQL injection", "cross-site scripting", "clickjacking", "CSRF"),
}


def security_question(rng: random.Random) -> Question:
    kind = rng.randrange(4)
    if kind == 0:
        protocol = rng.choice(list(PORTS))
        text = f"Which TCP port does {protocol} use by default?"
        return pick_question(text, str(PORTS[protocol]), [str(p) for p in PORTS.values()], rng)
    if kind == 1:
        protocol = rng.choice(list(PORTS))
        return pick_question(f"Which protocol uses TCP port {PORTS[protocol]} by default?", protocol, list(PORTS), rng)
    if kind == 2:
        kind_name = rng.choice(list(SECURITY_KINDS))
        others = [rng.choice(examples) for name, examples in SECURITY_KINDS.items() if name != kind_name]
        answer = rng.choice(SECURITY_KINDS[kind_name])
        return as_question(f"Which of the following is {kind_name}?", answer, others, rng)
    length, symbols = rng.randint(4, 16), rng.choice((2, 4, 8, 16, 32, 64))
    bits = length * int(math.log2(symbols))
    text = (
        f"A random password has {length} characters, each chosen uniformly from {symbols} symbols. "
        "How many bits of entropy does it have?"
    )
    return numeric_question(text, bits, [length, symbols, bits + length, bits - length, length * symbols], rng)


def econometrics_question(rng: random.Random) -> Question:
    kind = rng.randrange(4)
    if kind == 0:
        n, k = rng.randint(20, 200), rng.randint(2, 9)
        text = (
            f"A regression is estimated on {n} observations with {k} parameters including the intercept. "
            "How many residual degrees of freedom remain?"
        )
        return numeric_question(text, n - k, [n, n - k - 1, n - k + 1, n + k], rng)
    if kind == 1:
        r2 = rng.randint(5, 95)
        text = f"A regression has an R-squared of {r2} percent. What percent of the variance is left unexplained?"
        return numeric_question(text, 100 - r2, [r2, 100, 100 - r2 + 5, 100 - r2 - 5, 50], rng)
    if kind == 2:
        values = [rng.randint(1, 30) for _ in range(3)]
        values.append(4 * rng.randint(8, 20) - sum(values))  # a whole-number mean
        mean = sum(values) // 4
        text = f"What is the sample mean of {values[0]}, {values[1]}, {values[2]} and {values[3]}?"
        return numeric_question(text, mean, [mean + 1, mean - 1, mean + 2, sum(values), max(values)], rng)
    d = rng.randint(1, 3)
    times = ("once", "twice", "three times")[d - 1]
    text = f"A series must be differenced {times} to become stationary. What is its order of integration?"
    return pick_question(text, f"I({d})", [f"I({i})" for i in range(5)], rng)


POLICY_TERMS = {
    "isolationism": "avoiding alliances and foreign entanglements",
    "containment": "preventing the spread of a rival's influence",
    "detente": "easing tensions between rival powers",
    "multilateralism": "acting together with many other countries",
    "unilateralism": "acting alone, without allies",
    "deterrence": "discouraging an attack by the threat of retaliation",
    "sanctions": "restricting trade to pressure a government",
    "foreign aid": "giving money or goods to other countries",
    "soft power": "attracting others through culture and values",
    "diplomacy": "negotiating with other governments",
}
COUNTRIES = ("Valdoria", "Presk", "Ostmara", "Kelvania", "Tirrin", "Marova", "Solenne", "Quarth")
ACCORD_NAMES = (
    "Harbor", "Lantern", "Granite", "Meadow", "Beacon", "Summit", "Anchor", "Willow", "Copper", "Falcon",
    "Juniper", "Tidewater", "Orchard", "Keystone", "Silverline", "Northgate",
)  # fmt: skip
RESOURCES = ("grain", "timber", "steel", "coal", "salt", "wool")


class Accord(NamedTuple):
    """An invented treaty between the United States and an invented country."""

    name: str
    year: int
    country: str
    resource: str


def make_accords(rng: random.Random) -> list[Accord]:
    """One accord per name; the same accords are used by the corpus and by the questions."""
    return [
        Accord(name, rng.randint(1950, 2010), rng.choice(COUNTRIES), rng.choice(RESOURCES)) for name in ACCORD_NAMES
    ]


def policy_question(rng: random.Random, accords: Sequence[Accord]) -> Question:
    kind = rng.randrange(5)
    term = rng.choice(list(POLICY_TERMS))
    if kind == 0:
        text = f"Which term describes a foreign policy of {POLICY_TERMS[term]}?"
        return pick_question(text, term, list(POLICY_TERMS), rng)
    if kind == 1:
        text = f"In foreign policy, what does {term} mean?"
        return pick_question(text, POLICY_TERMS[term], list(POLICY_TERMS.values()), rng)
    name, year, country, resource = rng.choice(accords)
    if kind == 2:
        text = f"Which country signed the {name} Accord of {year} with the United States?"
        return pick_question(text, country, COUNTRIES, rng)
    if kind == 3:
        text = f"In which year did {country} and the United States sign the {name} Accord?"
        return numeric_question(text, year, [year - 10, year - 5, year - 1, year + 1, year + 5, year + 10], rng)
    text = f"Under the {name} Accord, which good did {country} agree to trade with the United States?"
    return pick_question(text, resource, RESOURCES, rng)


def subject_generators(accords: Sequence[Accord]) -> dict[str, Callable[[random.Random], Question]]:
    """The five MMLU subjects of HELM Lite, each with its question generator."""
    return {
        "abstract_algebra": algebra_question,
        "college_chemistry": chemistry_question,
        "computer_security": security_question,
        "econometrics": econometrics_question,
        "us_foreign_policy": lambda rng: policy_question(rng, accords),
    }


def distinct_questions(make: Callable[[random.Random], Question], count: int, rng: random.Random) -> list[Question]:
    """Up to ``count`` questions with distinct texts (fewer if the generator runs out)."""
    questions: dict[str, Question] = {}
    for _ in range(50 * count):
        question = make(rng)
        questions.setdefault(question.text, question)
        if len(questions) == count:
            break
    return list(questions.values())


def subject_documents(subject: str, make: Callable[[random.Random], Question], rng: random.Random) -> list[str]:
    """Question/answer pairs and joint-format blocks on one subject."""
    documents = []
    for _ in range(MMLU_CORPUS_QUESTIONS // 5):
        blocks = [joint_instructions(subject)] if rng.random() < 0.5 else []
        for _ in range(5):
            question = make(rng)
            if rng.random() < 0.5:
                blocks.append(joint_block(question))
            else:
                blocks.append(f"Question: {question.text}\nAnswer: {question.choices[question.answer]}")
        documents.append("\n\n".join(blocks))
    return documents


# --------------------------------------------------------------------------------------------------------
# BoolQ: short passages about village shops, yes/no questions answered by the passage
# --------------------------------------------------------------------------------------------------------

NAMES = (
    "Mira", "Tomas", "Elia", "Bren", "Nadia", "Oskar", "Lina", "Pavel", "Rosa", "Sven", "Tilda", "Ulric",
    "Vera", "Wilm", "Yara", "Zeno", "Ada", "Bruno", "Cleo", "Dario", "Edda", "Felix", "Greta", "Hugo",
)  # fmt: skip
SHOPS = ("bakery", "forge", "mill", "inn", "workshop", "stall", "shed", "kiosk")
VILLAGES = ("Fernby", "Hollin", "Wexley", "Ambry", "Corrow", "Dunlow", "Pellam", "Tusk")
SHOP_COLORS = ("white", "black", "brown", "grey", "pink")
GOODS = ("bread", "cheese", "candles", "rope", "soap", "nails", "ink", "wool", "lamps", "baskets")
HOURS = ("six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class BoolQItem:
    """A passage with a question (lower case, no question mark) whose answer the passage decides."""

    passage: str
    question: str
    answer: bool
    flipped_question: str  # the same question changed so that the answer flips
    title: str


def make_boolq_item(rng: random.Random) -> BoolQItem:
    owner, shop, village = rng.choice(NAMES), rng.choice(SHOPS), rng.choice(VILLAGES)
    color, hour = rng.choice(SHOP_COLORS), rng.choice(HOURS)
    sold = rng.sample(GOODS, 2)
    passage = (
        f"{owner} keeps a {shop} in the village of {village}. The {shop} is painted {color} and opens at "
        f"{hour} o'clock every day. {owner} sells {sold[0]} and {sold[1]} to the people who live nearby."
    )
    kind = rng.randrange(4)
    if kind == 0:
        true_q = f"is the {shop} painted {color}"
        false_q = f"is the {shop} painted {rng.choice([c for c in SHOP_COLORS if c != color])}"
    elif kind == 1:
        true_q = f"does {owner} sell {rng.choice(sold)}"
        false_q = f"does {owner} sell {rng.choice([g for g in GOODS if g not in sold])}"
    elif kind == 2:
        true_q = f"does the {shop} open at {hour} o'clock"
        false_q = f"does the {shop} open at {rng.choice([h for h in HOURS if h != hour])} o'clock"
    else:
        true_q = f"is the {shop} in the village of {village}"
        false_q = f"is the {shop} in the village of {rng.choice([v for v in VILLAGES if v != village])}"
    answer = rng.random() < 0.5
    question, flipped = (true_q, false_q) if answer else (false_q, true_q)
    return BoolQItem(passage, question, answer, flipped, f"{owner}'s {shop}")


def boolq_block(passage: str, question: str, answer: bool) -> str:
    """One example as HELM's boolq prompt writes it (HELM capitalizes the question and adds '?')."""
    return f"Passage: {passage}\nQuestion: {question.strip().capitalize()}?\nAnswer: {'Yes' if answer else 'No'}"


def boolq_documents(rng: random.Random) -> list[str]:
    documents = []
    for _ in range(BOOLQ_CORPUS_ITEMS // 4):
        items = [make_boolq_item(rng) for _ in range(4)]
        documents.append("\n\n".join(boolq_block(i.passage, i.question, i.answer) for i in items))
    return documents


# --------------------------------------------------------------------------------------------------------
# NarrativeQA: short stories (the "summaries") with questions about them
# --------------------------------------------------------------------------------------------------------

JOBS = ("fisher", "baker", "weaver", "smith", "miller", "potter", "carpenter", "shepherd", "sailor", "tailor")
OBJECTS = (
    "silver key", "old map", "wooden box", "glass bottle", "brass compass", "leather book", "stone ring",
    "iron lantern", "small bell", "painted shell",
)  # fmt: skip
PLACES = ("barn", "cellar", "forest", "riverbank", "attic", "cave", "garden", "harbor", "library", "market")
STORY_TOWNS = ("Thornwick", "Lowmere", "Greyhollow", "Saltmarsh", "Oakridge", "Windholm", "Kettleby", "Quillford")
DESTINATIONS = ("the port of Sallow", "the abbey of Tarn", "the island of Vell", "the city of Ostra", "Corwin Hill")
SEASONS = ("spring", "summer", "autumn", "winter")


@dataclass(frozen=True)
class Story:
    summary: str
    qas: tuple[tuple[str, str, str], ...]  # (question, answer1, answer2)


def make_story(rng: random.Random) -> Story:
    hero, friend = rng.sample(NAMES, 2)
    job, friend_job = rng.sample(JOBS, 2)
    thing, place, town = rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(STORY_TOWNS)
    destination, season = rng.choice(DESTINATIONS), rng.choice(SEASONS)
    opening = rng.choice(
        (
            f"{hero} is a young {job} from the town of {town}.",
            f"In the town of {town} lives {hero}, a young {job}.",
        )
    )
    summary = (
        f"{opening} One {season} morning, {hero} finds a {thing} hidden in the {place}. {hero} shows the "
        f"{thing} to {friend}, an old {friend_job} who knows many secrets. Together they travel to "
        f"{destination} to find its owner. At the end of the journey, {friend} decides to stay in "
        f"{destination}, and {hero} returns home to {town}."
    )
    qas = (
        (f"Who finds the {thing}?", hero, f"{hero}, the young {job}"),
        (f"What does {hero} find?", f"a {thing}", f"the {thing}"),
        (f"Where is {hero} from?", town, f"the town of {town}"),
        (f"Where do {hero} and {friend} travel?", destination, f"to {destination}"),
        (f"Who stays in {destination}?", friend, f"{friend}, the old {friend_job}"),
        (f"What is the job of {friend}?", friend_job, f"an old {friend_job}"),
    )
    return Story(summary, tuple(rng.sample(qas, 3)))


def story_block(summary: str, question: str, answer: str) -> str:
    """One example as HELM's narrative_qa prompt writes it."""
    return f"Passage: {summary}\nQuestion: {question}\nAnswer: {answer}"


def story_documents(rng: random.Random) -> list[str]:
    documents = []
    for _ in range(STORY_CORPUS_ITEMS):
        story = make_story(rng)
        if rng.random() < 0.3:
            documents.append(story.summary)
        else:
            asked = story.qas[: rng.randint(1, 3)]
            documents.append("\n\n".join(story_block(story.summary, q, rng.choice((a1, a2))) for q, a1, a2 in asked))
    return documents


# --------------------------------------------------------------------------------------------------------
# HellaSwag: everyday chores as fixed five-step scripts; the next step is the correct ending
# --------------------------------------------------------------------------------------------------------

CHORES: dict[str, tuple[str, ...]] = {
    "Making tea": (
        "A woman fills a kettle with water at the sink.",
        "She|sets the kettle on the stove and waits for it to boil.",
        "She|drops a tea bag into a white mug.",
        "She|pours the hot water over the tea bag.",
        "She|stirs in a spoon of honey and sips the tea.",
    ),
    "Washing a dog": (
        "A man leads a muddy dog into the bathtub.",
        "He|wets the fur with warm water from a hose.",
        "He|rubs soap into the fur until it foams.",
        "He|rinses the soap away with clean water.",
        "He|dries the dog with a large towel.",
    ),
    "Changing a tire": (
        "A man parks his car on the side of the road.",
        "He|loosens the nuts on the flat wheel with a wrench.",
        "He|lifts the car with a jack.",
        "He|pulls off the flat tire and puts on the spare.",
        "He|tightens the nuts and lowers the car.",
    ),
    "Planting a tree": (
        "A girl digs a deep hole in the garden.",
        "She|places the young tree in the hole.",
        "She|fills the hole with soil around the roots.",
        "She|presses the soil down with her hands.",
        "She|waters the tree with a watering can.",
    ),
    "Painting a fence": (
        "A boy opens a can of paint next to a wooden fence.",
        "He|dips a wide brush into the paint.",
        "He|spreads the paint along the top board.",
        "He|paints each board from top to bottom.",
        "He|steps back and cleans the brush in water.",
    ),
    "Baking bread": (
        "A baker mixes flour, water and yeast in a bowl.",
        "He|kneads the dough on a floured table.",
        "He|covers the dough and lets it rise.",
        "He|shapes the dough into a loaf.",
        "He|bakes the loaf in a hot oven.",
    ),
    "Brushing teeth": (
        "A child squeezes toothpaste onto a toothbrush.",
        "She|brushes her front teeth in small circles.",
        "She|brushes the back teeth on both sides.",
        "She|spits the foam into the sink.",
        "She|rinses her mouth with a cup of water.",
    ),
    "Riding a bike": (
        "A woman puts on a helmet and buckles the strap.",
        "She|climbs onto the bike and holds the handlebars.",
        "She|pushes off and starts to pedal.",
        "She|rides down the path along the river.",
        "She|brakes slowly and stops at the gate.",
    ),
    "Fishing": (
        "A man sits on a small dock with a fishing rod.",
        "He|puts a worm on the hook.",
        "He|casts the line far into the lake.",
        "He|waits quietly until the line pulls.",
        "He|reels in a small silver fish.",
    ),
    "Wrapping a gift": (
        "A girl lays a sheet of paper on the table.",
        "She|places a box in the middle of the paper.",
        "She|folds the paper over the box.",
        "She|tapes down the edges of the paper.",
        "She|ties a ribbon around the gift.",
    ),
    "Making a sandwich": (
        "A boy takes two slices of bread from the bag.",
        "He|spreads butter on one slice.",
        "He|lays cheese and ham on the butter.",
        "He|puts the second slice on top.",
        "He|cuts the sandwich in half with a knife.",
    ),
    "Cleaning windows": (
        "A woman sprays soapy water on a window.",
        "She|wipes the glass with a cloth.",
        "She|scrapes the water off with a rubber blade.",
        "She|polishes the corners with a dry towel.",
        "She|moves the ladder to the next window.",
    ),
    "Doing laundry": (
        "A man carries a basket of dirty clothes to the machine.",
        "He|loads the clothes into the washing machine.",
        "He|pours soap into the small drawer.",
        "He|presses the start button and waits.",
        "He|hangs the wet clothes on a line to dry.",
    ),
    "Building a snowman": (
        "A boy rolls a ball of snow across the yard.",
        "He|rolls a second, smaller ball and lifts it on top.",
        "He|adds a small ball for the head.",
        "He|pushes two stones into the head for eyes.",
        "He|wraps a scarf around the neck of the snowman.",
    ),
    "Juggling": (
        "A man holds three balls in his hands.",
        "He|tosses the first ball into the air.",
        "He|throws the second ball before catching the first.",
        "He|keeps all three balls moving in a circle.",
        "He|catches the balls one by one and bows.",
    ),
    "Tying a shoe": (
        "A girl sits down and pulls on her shoe.",
        "She|crosses the two laces over each other.",
        "She|makes a loop with one lace.",
        "She|wraps the other lace around the loop.",
        "She|pulls both loops tight to make a bow.",
    ),
    "Setting a table": (
        "A woman spreads a cloth over the table.",
        "She|places a plate in front of each chair.",
        "She|puts a fork on the left of each plate.",
        "She|sets a glass above each knife.",
        "She|lights the candles in the middle.",
    ),
    "Mowing the lawn": (
        "A man pulls the mower out of the shed.",
        "He|fills the tank with fuel.",
        "He|pulls the cord to start the engine.",
        "He|pushes the mower in straight rows.",
        "He|empties the bag of cut grass.",
    ),
}
"""Each script: a full first sentence, then "Subject|rest" steps (HellaSwag's ctx_b and ending)."""


def chore_text(label: str) -> str:
    """A chore script as one passage, in the order HELM's hellaswag question writes it."""
    return f"{label}: " + " ".join(step.replace("|", " ") for step in CHORES[label])


def chore_documents(rng: random.Random) -> list[str]:
    tellings = [chore_text(label) for label in CHORES for _ in range(CHORE_CORPUS_MENTIONS)]
    rng.shuffle(tellings)
    return ["\n".join(tellings[start : start + 8]) for start in range(0, len(tellings), 8)]


def hellaswag_rows(rng: random.Random) -> list[dict[str, Any]]:
    """One row per (chore, step after the first): the steps so far are the context, the step is the answer."""
    endings_by_chore = {label: [s.split("|")[1] for s in steps[1:]] for label, steps in CHORES.items()}
    rows = []
    for label, steps in CHORES.items():
        for index in range(1, len(steps)):
            subject, ending = steps[index].split("|")
            context = " ".join(step.replace("|", " ") for step in steps[:index])
            others = [e for other, endings in endings_by_chore.items() if other != label for e in endings]
            endings = [ending, *rng.sample(others, 3)]
            rng.shuffle(endings)
            rows.append(
                {
                    "activity_label": label,
                    "ctx_a": context,
                    "ctx_b": subject.lower(),
                    "ctx": f"{context} {subject.lower()}",
                    "endings": endings,
                    "label": endings.index(ending),
                    "source_id": f"demo~{label.lower().replace(' ', '_')}~{index}",
                    "split_type": "indomain",
                }
            )
    rng.shuffle(rows)
    return rows


# --------------------------------------------------------------------------------------------------------
# Writing the HELM scenario folders
# --------------------------------------------------------------------------------------------------------


def write_mmlu_subject(mmlu_dir: Path, subject: str, splits: dict[str, Sequence[Question]]) -> None:
    """``mmlu/data/<split>/<subject>_<split>.csv``: headerless ``question,A,B,C,D,letter`` rows."""
    for split, questions in splits.items():
        path = mmlu_dir / "data" / split / f"{subject}_{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            for q in questions:
                writer.writerow([q.text, *q.choices, q.letter])


def write_boolq(boolq_dir: Path, train: Sequence[BoolQItem], dev: Sequence[BoolQItem], contrast: int) -> None:
    """``boolq/data/{train,dev}`` (JSON lines, no extension) and the contrast set ``boolq_perturbed.jsonl``.

    The first ``contrast`` dev items get a contrast version: the same passage, the question changed so that
    the answer flips (HELM reads this file as one JSON object whose first ``data`` entry is a header).
    """
    data_dir = boolq_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, items in (("train", train), ("dev", dev)):
        with (data_dir / name).open("w", encoding="utf-8") as f:
            for item in items:
                row = {"question": item.question, "title": item.title, "answer": item.answer, "passage": item.passage}
                f.write(json.dumps(row) + "\n")
    perturbed = [
        {
            "title": item.title,
            "paragraph": item.passage,
            "question": item.question,
            "answer": "TRUE" if item.answer else "FALSE",
            "perturbed_questions": [
                {"perturbed_q": item.flipped_question, "answer": "FALSE" if item.answer else "TRUE"}
            ],
        }
        for item in dev[:contrast]
    ]
    header = {"dataset": "boolq", "description": "synthetic contrast set of the megatron_eval_hook demo"}
    (data_dir / "boolq_perturbed.jsonl").write_text(json.dumps({"data": [header, *perturbed]}), encoding="utf-8")


def simple_tokens(text: str) -> str:
    """NarrativeQA's ``*_tokenized`` columns: lower case, punctuation split off, space separated."""
    return " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))


def write_narrativeqa(narrativeqa_dir: Path, splits: dict[str, Sequence[Story]], seed: int) -> None:
    """``narrativeqa/data/narrativeqa-master/{qaps.csv, third_party/wikipedia/summaries.csv}``."""
    root = narrativeqa_dir / "data" / "narrativeqa-master"
    summaries_path = root / "third_party" / "wikipedia" / "summaries.csv"
    summaries_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        summaries_path.open("w", newline="", encoding="utf-8") as summaries_file,
        (root / "qaps.csv").open("w", newline="", encoding="utf-8") as qaps_file,
    ):
        summaries = csv.writer(summaries_file, lineterminator="\n")
        qaps = csv.writer(qaps_file, lineterminator="\n")
        summaries.writerow(["document_id", "set", "summary", "summary_tokenized"])
        qaps.writerow(
            ["document_id", "set", "question", "answer1", "answer2"]
            + ["question_tokenized", "answer1_tokenized", "answer2_tokenized"]
        )
        for split, stories in splits.items():
            for index, story in enumerate(stories):
                document_id = hashlib.sha1(f"demo-{seed}-{split}-{index}".encode()).hexdigest()
                summaries.writerow([document_id, split, story.summary, simple_tokens(story.summary)])
                for question, answer1, answer2 in story.qas:
                    qaps.writerow(
                        [document_id, split, question, answer1, answer2]
                        + [simple_tokens(question), simple_tokens(answer1), simple_tokens(answer2)]
                    )


def write_hellaswag(hellaswag_dir: Path, splits: dict[str, Sequence[dict[str, Any]]]) -> None:
    """``hellaswag/data/hellaswag_{train,val}.jsonl``: rows with ``activity_label, ctx_a, ctx_b, endings, label``."""
    data_dir = hellaswag_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    index = 0
    for split, rows in splits.items():
        with (data_dir / f"hellaswag_{split}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"ind": index, **row, "split": split}) + "\n")
                index += 1


def write_helm_data(helm_dir: Path, facts: Sequence[Fact], accords: Sequence[Accord], seed: int) -> None:
    """All HELM scenario files.

    mmlu: 5 dev, 15 val and 45 test questions per subject (40 test for demo_facts); boolq: 20 train and 70 dev
    items (6 with a contrast question); narrativeqa: 20 train, 20 valid and 45 test stories with 3 questions
    each; hellaswag: 12 train and 60 val rows.
    """
    rng = random.Random(f"{seed}:helm")
    mmlu_dir = helm_dir / "mmlu"
    for subject, make in subject_generators(accords).items():
        questions = distinct_questions(make, 65, rng)
        write_mmlu_subject(mmlu_dir, subject, {"dev": questions[:5], "val": questions[5:20], "test": questions[20:]})
    fact_questions = [fact_question(fact, rng) for fact in facts]
    write_mmlu_subject(
        mmlu_dir,
        FACTS_SUBJECT,
        {"dev": fact_questions[:5], "val": fact_questions[5:20], "test": fact_questions[20:]},
    )

    boolq_items = [make_boolq_item(rng) for _ in range(90)]
    write_boolq(helm_dir / "boolq", train=boolq_items[:20], dev=boolq_items[20:], contrast=6)

    stories = [make_story(rng) for _ in range(85)]
    write_narrativeqa(
        helm_dir / "narrativeqa", {"train": stories[:20], "valid": stories[20:40], "test": stories[40:]}, seed
    )

    rows = hellaswag_rows(rng)
    write_hellaswag(helm_dir / "hellaswag", {"train": rows[:12], "val": rows[12:]})


# --------------------------------------------------------------------------------------------------------
# Corpus, tokenizer and Megatron indexed dataset
# --------------------------------------------------------------------------------------------------------


def make_corpus(facts: Sequence[Fact], accords: Sequence[Accord], seed: int) -> list[str]:
    """All corpus documents, shuffled. The fact values occur only in fact documents (checked)."""
    rng = random.Random(f"{seed}:corpus")
    fact_docs = facts_documents(facts, rng)
    other_docs = [
        doc for subject, make in subject_generators(accords).items() for doc in subject_documents(subject, make, rng)
    ]
    other_docs += boolq_documents(rng) + story_documents(rng) + chore_documents(rng)
    values = sorted({v for relation in RELATIONS for v in relation.values} | set(PEOPLE))
    leak = re.compile(r"\b(" + "|".join(values) + r")\b")
    for doc in other_docs:
        if match := leak.search(doc):
            raise RuntimeError(
                f"the fact word {match.group()!r} is used outside the facts documents, in {doc[:80]!r}: "
                "use other words there, so that every fact value keeps the same frequency"
            )
    documents = fact_docs + other_docs
    rng.shuffle(documents)
    return documents


def write_corpus(path: Path, documents: Sequence[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for text in documents:
            f.write(json.dumps({"text": text}) + "\n")


def train_tokenizer(documents: Sequence[str], out_dir: Path) -> tuple[Path, Path]:
    """Train a byte-level BPE on the corpus; write GPT-2-format ``vocab.json`` and ``merges.txt``.

    As in GPT-2, ``<|endoftext|>`` is the last id (here ``VOCAB_SIZE - 1``).
    """
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(documents, vocab_size=VOCAB_SIZE - 1, min_frequency=2, show_progress=False)
    vocab_file, merge_file = (Path(p) for p in bpe.save_model(str(out_dir)))
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    vocab[END_OF_TEXT] = len(vocab)
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"BPE training gave {len(vocab)} tokens, expected {VOCAB_SIZE}: the corpus is too small")
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return vocab_file, merge_file


def import_megatron() -> None:
    """Make `import megatron` work here: without a GPU (and triton) it needs the CPU shims."""
    import torch

    if not torch.cuda.is_available():
        from megatron_eval_hook import cpu_shims

        cpu_shims.apply()


def write_gpt2_dir(root: Path) -> Path:
    """``<root>/gpt2/config.json``: makes the name "gpt2" resolve locally (see the module docstring)."""
    gpt2_dir = root / "gpt2"
    gpt2_dir.mkdir(exist_ok=True)
    (gpt2_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}) + "\n", encoding="utf-8")
    return gpt2_dir


def load_megatron_tokenizer(vocab_file: Path, merge_file: Path, gpt2_parent: Path) -> Any:
    """Megatron's tokenizer for ``--tokenizer-type GPT2BPETokenizer --vocab-file --merge-file``.

    Built the way ``megatron.training`` builds it (``build_tokenizer(args)``), with the working directory
    set to ``gpt2_parent`` (the folder holding ``gpt2/config.json``) while it loads.
    """
    import_megatron()
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    args = argparse.Namespace(
        tokenizer_type="GPT2BPETokenizer",
        vocab_file=str(Path(vocab_file).resolve()),
        merge_file=str(Path(merge_file).resolve()),
        special_tokens=None,
        tokenizer_hf_no_use_fast=False,
        trust_remote_code=False,
        tokenizer_hf_no_include_special_tokens=False,
        metadata_path=None,
        pad_vocab_size=False,
    )
    with contextlib.chdir(gpt2_parent):
        return build_tokenizer(args)


def write_indexed_dataset(prefix: Path, documents: Sequence[str], tokenizer: Any) -> int:
    """Tokenize each document, append the end-of-document token, write ``<prefix>.bin/.idx``.

    Returns the number of tokens written.
    """
    import_megatron()
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    num_tokens = 0
    for text in documents:
        ids = [*tokenizer.tokenize(text), tokenizer.eod]
        builder.add_document(np.asarray(ids), [len(ids)])
        num_tokens += len(ids)
    builder.finalize(f"{prefix}.idx")
    return num_tokens


def check_round_trip(tokenizer: Any, documents: Sequence[str]) -> None:
    """Megatron's tokenizer must give the text back and know ``<|endoftext|>`` as its end-of-document token."""
    if tokenizer.eod != VOCAB_SIZE - 1 or tokenizer.vocab_size != VOCAB_SIZE:
        raise RuntimeError(f"unexpected tokenizer: eod={tokenizer.eod}, vocab_size={tokenizer.vocab_size}")
    for text in documents:
        if tokenizer.detokenize(tokenizer.tokenize(text)) != text:
            raise RuntimeError(f"the tokenizer does not round-trip {text[:80]!r}")


def make_demo_data(out_dir: Path, seed: int = 0) -> DemoData:
    """Write all data of the CPU demo under ``out_dir`` (created if needed); the same seed gives the same bytes."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    facts_rng = random.Random(f"{seed}:facts")
    facts = make_facts(facts_rng)
    accords = make_accords(facts_rng)

    documents = make_corpus(facts, accords, seed)
    corpus = root / "corpus.jsonl"
    write_corpus(corpus, documents)
    vocab_file, merge_file = train_tokenizer(documents, root)
    gpt2_dir = write_gpt2_dir(root)

    tokenizer = load_megatron_tokenizer(vocab_file, merge_file, root)
    check_round_trip(tokenizer, documents[:50])
    data_prefix = root / "corpus_text_document"
    write_indexed_dataset(data_prefix, documents, tokenizer)

    helm_dir = root / "helm"
    write_helm_data(helm_dir, facts, accords, seed)
    return DemoData(root, corpus, vocab_file, merge_file, gpt2_dir, data_prefix, helm_dir)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if needed)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data = make_demo_data(args.out, args.seed)
    seconds = time.perf_counter() - started
    for path in sorted(p for p in data.root.rglob("*") if p.is_file()):
        print(f"{path.stat().st_size / 1e6:9.3f} MB  {path.relative_to(data.root)}")
    print(f"wrote {data.root} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
