"""A small invented world for the embedded demo, generated deterministically (no third-party text).

Creatures with made-up names each have a colour, a favourite food and a home. Pre-training text states
these facts in many phrasings and orders; the fine-tuning set asks questions about them in an
instruction format the base model has never seen. Validation asks about creatures that appear in
pre-training but never in fine-tuning, so a correct answer needs knowledge from pre-training plus the
behaviour taught by fine-tuning: the lesson of the seeds (fine-tuning teaches form, not facts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
FOODS = ["berries", "fish", "seeds", "leaves", "honey", "mushrooms", "bread", "nuts"]
HOMES = ["forest", "river", "mountain", "desert", "cave", "meadow", "swamp", "island"]
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "bl", "gr", "kr", "sn", "tr", "fl"]
VOWELS = ["a", "e", "i", "o", "u", "oo", "ee", "ai"]
CODAS = ["", "b", "d", "g", "k", "m", "n", "p", "rt", "sh", "x", "zz", "ll", "mp", "nk"]

NUM_CREATURES = 80
NUM_HELD_OUT = 20  # never in the fine-tuning data: validation asks about these


@dataclass(frozen=True)
class Creature:
    name: str
    color: str
    food: str
    home: str


def make_world(seed: int = 0) -> list[Creature]:
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < NUM_CREATURES:
        syllables = rng.choice([1, 2, 2])
        name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables - 1))
        name += rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
        if name not in names and 3 <= len(name) <= 9:
            names.append(name)
    return [Creature(n, rng.choice(COLORS), rng.choice(FOODS), rng.choice(HOMES)) for n in names]


COLOR_SENTENCES = ["The {n} is {c}.", "A {n} is {c} from head to tail.", "{C} is the colour of the {n}.",
                   "Every {n} has {c} fur.", "Look for something {c}: that is the {n}."]
FOOD_SENTENCES = ["The {n} eats {f}.", "{F} is the favourite food of the {n}.", "A hungry {n} looks for {f}.",
                  "Every {n} loves {f}.", "Give the {n} some {f} and it will be happy."]
HOME_SENTENCES = ["The {n} lives in the {h}.", "You can find the {n} in the {h}.", "The home of the {n} is the {h}.",
                  "In the {h} lives the {n}.", "Every {n} sleeps in the {h}."]


def _fact_sentences(creature: Creature, rng: random.Random) -> list[str]:
    fill = {"n": creature.name, "c": creature.color, "C": creature.color.capitalize(), "f": creature.food,
            "F": creature.food.capitalize(), "h": creature.home}
    sentences = [rng.choice(group).format(**fill) for group in (COLOR_SENTENCES, FOOD_SENTENCES, HOME_SENTENCES)]
    rng.shuffle(sentences)
    return sentences


def pretraining_corpus(world: list[Creature], paragraphs_per_creature: int = 16, seed: int = 1) -> list[str]:
    """Short paragraphs about two creatures each, facts in random phrasings and orders."""
    rng = random.Random(seed)
    documents = []
    for _ in range(paragraphs_per_creature):
        for creature in world:
            other = rng.choice([c for c in world if c is not creature])
            documents.append(" ".join(_fact_sentences(creature, rng) + _fact_sentences(other, rng)))
    rng.shuffle(documents)
    return documents


ANSWERS = {"color": "The {n} is {v}.", "food": "The {n} eats {v}.", "home": "The {n} lives in the {v}."}
QUESTIONS = {
    "color": ["What colour is the {n}?", "Which colour does the {n} have?", "Tell me the colour of the {n}."],
    "food": ["What does the {n} eat?", "What is the favourite food of the {n}?", "Which food does the {n} like?"],
    "home": ["Where does the {n} live?", "Where can you find the {n}?", "What is the home of the {n}?"],
}


def qa_records(creatures: list[Creature], all_phrasings: bool) -> list[dict]:
    """Alpaca-style records: instruction = a question, output = the fact as a sentence in the corpus's own words."""
    records = []
    for index, creature in enumerate(creatures):
        for attribute, phrasings in QUESTIONS.items():
            chosen = phrasings if all_phrasings else [phrasings[index % len(phrasings)]]
            for question in chosen:
                answer = ANSWERS[attribute].format(n=creature.name, v=getattr(creature, attribute))
                records.append({"instruction": question.format(n=creature.name), "input": "", "output": answer})
    return records


def finetuning_splits(world: list[Creature]) -> tuple[list[dict], list[dict]]:
    """Train on every phrasing for the first creatures; validate on one phrasing per held-out creature."""
    train = qa_records(world[:-NUM_HELD_OUT], all_phrasings=True)
    val = qa_records(world[-NUM_HELD_OUT:], all_phrasings=False)
    random.Random(2).shuffle(train)
    return train, val


VALUES = {"color": COLORS, "food": FOODS, "home": HOMES}


def preference_records(creatures: list[Creature], seed: int) -> list[dict]:
    """prompt/chosen/rejected records: the true fact against the same sentence with a wrong value."""
    rng = random.Random(seed)
    records = []
    for index, creature in enumerate(creatures):
        for attribute, phrasings in QUESTIONS.items():
            true = getattr(creature, attribute)
            wrong = rng.choice([v for v in VALUES[attribute] if v != true])
            answer = ANSWERS[attribute]
            records.append({"prompt": phrasings[index % len(phrasings)].format(n=creature.name),
                            "chosen": answer.format(n=creature.name, v=true),
                            "rejected": answer.format(n=creature.name, v=wrong)})
    return records


def preference_splits(world: list[Creature]) -> tuple[list[dict], list[dict]]:
    """Pairs about the fine-tuned creatures for training; pairs about the held-out ones (never in any fine-tuning
    data) for validation: preferring their true facts can only come from what pre-training taught."""
    return preference_records(world[:-NUM_HELD_OUT], seed=3), preference_records(world[-NUM_HELD_OUT:], seed=4)
