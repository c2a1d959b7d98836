"""The synthetic world we train on: characters, animals and toys; stories and dialogues about them.

Chapter 01 (tokenizer) trains on this text, chapter 07 (training) learns it, chapters 08-11 (chat, RLHF, Ghost
Attention) fine-tunes on the dialogues. No download: everything is made here from a seed.

The language is deliberately SMALL (about 300 word types) and regular: every sentence comes from one
of a few hundred templates whose slots are filled from fixed word lists. A model with a few million
parameters that reads a few million tokens can learn it, and a checker can score what it writes:

    world = make_world(0)                                   # who has which pet, toy, colour, ...
    stories = generate_stories(world, "train", n=10, seed=1)            # list[Story]  (.text, .characters)
    dialogues = generate_dialogues(world, "train", n=10, seed=1, max_turns=8)  # list[Dialogue] (.turns, .facts)
    pairs = qa_pairs(world, "test", n=100, seed=1)          # list[(question, answer)]
    is_grammatical("Mia had a red kite.")                   # True: the world's grammar can produce it
    check_fact(world, "Mia has a cat.")                     # True / False, or None if not a fact statement
    split_sentences(text)                                   # the sentences of a story or a message
    for doc in iter_training_text("train", seed=0): ...     # an endless stream of documents (str)

Facts. A world fixes, per character: pet (an animal kind), favourite colour, favourite food, home (a
place they live near), toy (and the toy's colour) and age; per animal kind: sound, food, home, legs and a
size (so "bigger than" is defined). Stories state these facts in past tense ("Mia had a cat."), answers in
dialogues in present tense ("Mia has a cat."); `check_fact` reads both.

Held-out splits ("train", "val", "test"). Two kinds of combination are held out:
  * stories: every story has exactly two characters, a hero and a friend; each unordered pair of
    characters belongs to one split, so a test story puts two characters together who never meet in a
    training story;
  * questions: every question asks about a key, e.g. ("Mia", "pet"), ("cow", "legs"),
    ("older", "Ben", "Mia"); each key belongs to one split. Training dialogues never ask a test key,
    but training *stories* state every fact, so answering a test question means recalling a fact read
    in a story in a form (a question) never seen for it: knowledge, not a memorised Q/A pair.

Documents and files. A document is one story or one dialogue. Stories are paragraphs separated by a
blank line. A dialogue as plain text (`Dialogue.text`, used for pre-training) is one line per message,
"User: ..." / "Assistant: ..."; so to ask the base model a question, prompt it with
`f"User: {question}\\nAssistant:"`. Chat fine-tuning uses `Dialogue.turns` (a list of
{"role": "user"|"assistant", "content": str}) and renders the Llama 2 [INST] format itself.
`scripts/make_corpus.py` writes data/corpus/{train,val,test}.jsonl.gz: one JSON object per line and per
document, {"kind": "story"|"dialogue", "text": str, ...}; the trainer adds BOS/EOS around each "text".
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from itertools import combinations

SPLITS = ("train", "val", "test")
WORLD_SEED = 0  # the world every committed file and the embedded model use

# ------------------------------------------------------------------------------------------------
# the lexicon: every content word the world knows. Nothing starts with a vowel, so "a" never needs "an".

GIRLS = ["Mia", "Lily", "Anna", "Zoe", "Lucy", "Emma", "Sara", "Nina"]
BOYS = ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Tim", "Dan"]
NAMES = GIRLS + BOYS

# kind: (plural, sound, food, home, legs, size). Sizes are distinct so "bigger than" is always defined.
ANIMALS = {
    "bee":   ("bees",   "buzz",   "honey",   "hive",   6, 1),
    "mouse": ("mice",   "squeak", "cheese",  "barn",   4, 2),
    "frog":  ("frogs",  "ribbit", "flies",   "pond",   4, 3),
    "bird":  ("birds",  "tweet",  "seeds",   "tree",   2, 4),
    "hen":   ("hens",   "cluck",  "corn",    "barn",   2, 5),
    "duck":  ("ducks",  "quack",  "bread",   "pond",   2, 6),
    "cat":   ("cats",   "meow",   "fish",    "house",  4, 7),
    "fox":   ("foxes",  "yip",    "berries", "forest", 4, 8),
    "dog":   ("dogs",   "woof",   "bones",   "house",  4, 9),
    "pig":   ("pigs",   "oink",   "corn",    "barn",   4, 10),
    "sheep": ("sheep",  "baa",    "grass",   "field",  4, 11),
    "cow":   ("cows",   "moo",    "grass",   "barn",   4, 12),
    "bear":  ("bears",  "growl",  "honey",   "forest", 4, 13),
    "horse": ("horses", "neigh",  "carrots", "field",  4, 14),
}
PETS = ["cat", "dog", "bird", "frog", "duck", "hen", "mouse", "pig"]
TOYS = ["ball", "kite", "hat", "book", "drum", "boat", "car", "doll", "bell", "bike", "truck", "train"]
COLOURS = ["red", "blue", "green", "yellow", "pink", "purple", "brown", "white", "black", "grey"]
FOODS = ["apples", "bread", "cake", "carrots", "cheese", "soup", "rice", "honey", "berries", "cookies", "pears"]
ANIMAL_FOODS = sorted({a[2] for a in ANIMALS.values()})
PLACES = ["park", "farm", "beach", "forest", "hill", "river", "lake", "garden", "town", "school"]
HOMES = sorted({a[3] for a in ANIMALS.values()})
THINGS = ["apples", "pears", "berries", "flowers", "shells", "stones", "leaves", "cookies"]  # things to count
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
AGES = list(range(3, 13))
RELATIONS = ("pet", "colour", "food", "home", "toy", "toy_colour", "age")  # facts about a character
ANIMAL_RELATIONS = ("sound", "food", "home", "legs")                       # facts about an animal kind

# Slot categories of the grammar: a template's "{animal}" or "{animal2}" takes any word of "animal".
CATEGORIES = {
    "name": NAMES,
    "kid": ["girl", "boy"],
    "he": ["he", "she"], "He": ["He", "She"], "his": ["his", "her"], "His": ["His", "Her"], "him": ["him", "her"],
    "animal": list(ANIMALS), "animals": [a[0] for a in ANIMALS.values()], "Animal": [k.capitalize() for k in ANIMALS],
    "sound": [a[1] for a in ANIMALS.values()],
    "food": sorted(set(FOODS) | set(ANIMAL_FOODS)),
    "place": PLACES, "home": HOMES, "toy": TOYS, "colour": COLOURS, "things": THINGS,
    "num": NUMBERS[1:], "Num": [n.capitalize() for n in NUMBERS[1:]],
    "adj": ["little", "kind", "happy", "brave", "funny", "clever"],
    "time": ["morning", "afternoon", "day"],
    "weather": ["sunny", "warm", "windy", "cold", "bright"],
    "spot": ["a big rock", "an old tree", "a small bush", "the tall grass"],
    "feeling": ["happy", "glad", "proud"],
}


# ------------------------------------------------------------------------------------------------
# the world: who has what

@dataclass(frozen=True)
class Character:
    name: str
    gender: str      # "girl" | "boy"
    pet: str         # an animal kind
    colour: str      # favourite colour
    food: str        # favourite food
    home: str        # the place they live near
    toy: str
    toy_colour: str
    age: int

    @property
    def pronouns(self):
        """(he, his, him) for this character."""
        return ("she", "her", "her") if self.gender == "girl" else ("he", "his", "him")


@dataclass
class World:
    seed: int
    characters: dict          # name -> Character
    animals: dict             # kind -> dict(plural, sound, food, home, legs, size)
    story_pairs: dict         # split -> sorted list of (name, name) pairs allowed together in a story
    question_keys: dict       # split -> sorted list of question keys (tuples of str)


def _split_list(items, rng, frac_val=0.15, frac_test=0.15):
    """Shuffle `items` and cut them into train/val/test lists (each sorted, for stable output)."""
    items = list(items)
    rng.shuffle(items)
    n_val, n_test = round(len(items) * frac_val), round(len(items) * frac_test)
    parts = {"val": items[:n_val], "test": items[n_val:n_val + n_test], "train": items[n_val + n_test:]}
    return {s: sorted(parts[s]) for s in SPLITS}


def make_world(seed: int = WORLD_SEED) -> World:
    """Draw every character's facts and the held-out splits from `seed` (same seed, same world)."""
    rng = random.Random(f"world-{seed}")
    characters = {}
    for name in NAMES:
        characters[name] = Character(
            name=name, gender="girl" if name in GIRLS else "boy", pet=rng.choice(PETS),
            colour=rng.choice(COLOURS), food=rng.choice(FOODS), home=rng.choice(PLACES),
            toy=rng.choice(TOYS), toy_colour=rng.choice(COLOURS), age=rng.choice(AGES))
    animals = {k: dict(plural=v[0], sound=v[1], food=v[2], home=v[3], legs=v[4], size=v[5])
               for k, v in ANIMALS.items()}
    story_pairs = _split_list([tuple(sorted(p)) for p in combinations(NAMES, 2)], rng, 0.1, 0.1)
    # question keys, split per kind so every split gets some of each kind
    kinds = [
        [(n, r) for n in NAMES for r in RELATIONS],
        [(a, r) for a in ANIMALS for r in ANIMAL_RELATIONS],
        [("older", a, b) for a, b in combinations(sorted(NAMES), 2) if characters[a].age != characters[b].age],
        [("bigger", a, b) for a, b in combinations(sorted(ANIMALS), 2)],
        [("count", str(a), str(b)) for a in range(1, 6) for b in range(1, 6)],
    ]
    question_keys = {s: [] for s in SPLITS}
    for keys in kinds:
        for s, part in _split_list(keys, rng).items():
            question_keys[s] += part
    return World(seed, characters, animals, story_pairs, {s: sorted(question_keys[s]) for s in SPLITS})


# ------------------------------------------------------------------------------------------------
# the grammar: every sentence is a template with {slots}. GRAMMAR is the set of all templates.

# Stories (past tense). Facts first: each template states one fact about one character or animal.
T_OPEN = ["Once upon a time, there was a {adj} {kid} named {name}.",
          "There once was a {adj} {kid} called {name}.",
          "{name} was a {adj} {kid}.",
          "Once there was a {kid} named {name}."]
T_FACT_PAST = {
    "pet":    ["{name} had a pet {animal}.", "{name}'s pet was a {animal}.", "{name} had a {animal}."],
    "colour": ["{name}'s favourite colour was {colour}.", "{name} loved the colour {colour}."],
    "food":   ["{name}'s favourite food was {food}.", "{name} liked to eat {food}."],
    "home":   ["{name} lived near the {place}.", "{name} and {his} family lived near the {place}."],
    "toy":    ["{name} had a {colour} {toy}.", "{name}'s {toy} was {colour}."],
    "age":    ["{name} was {num} years old."],
}
T_ANIMAL_PAST = {
    "sound": ["The {animal} said {sound}.", "{name}'s {animal} said {sound}."],
    "food":  ["The {animal} ate {food}.", "{name}'s {animal} ate {food}."],
    "home":  ["The {animal} lived in the {home}."],
    "legs":  ["The {animal} had {num} legs."],
}
T_GO = ["One {time}, {name} went to the {place} with {his} friend {name2}.",
        "One {time}, {name} and {name2} went to the {place}.",
        "One {weather} {time}, {name} met {his} friend {name2} at the {place}."]
T_WEATHER = ["It was a {weather} day.", "The sun was bright and the sky was blue.",
             "The wind was strong.", "The grass was green and soft."]
T_BRING = ["{name} brought {his} {colour} {toy}.", "{name} had {his} {toy} with {him}."]
# plot: a lost toy
T_LOST = [["{name} played with {his} {toy} all {time}.", "They played with the {toy} all {time}."],
          ["Then {name} could not find the {toy}.", "Suddenly, the {toy} was gone."],
          ["{name} was sad.", "{name} began to cry."],
          ["{name} said, \"Do not worry, I will help you!\"", "{name} said, \"Let us look for it together!\""],
          ["They looked under the trees and behind the rocks."],
          ["At last, {name} found the {toy} behind {spot}.", "At last, {name} saw the {toy} under {spot}."],
          ["{name} was very {feeling}.", "{name} smiled a big smile."],
          ["{name} said, \"Thank you, {name2}!\""]]
# plot: an animal comes by
T_MEET = ["At the {place}, they saw a {animal}.", "Then a {animal} came to say hello."]
T_HUNGRY = ["The {animal} looked hungry.", "The {animal} was very hungry."]
T_FEED = ["{name} gave the {animal} some {food}.", "{name} shared some {food} with the {animal}."]
T_FED = ["The {animal} was happy and said {sound} again.", "The {animal} ate it all up."]
T_BIGGER_PAST = ["The {animal} was bigger than {name}'s {animal2}.", "The {animal} was smaller than {name}'s {animal2}.",
                 "The {animal} was bigger than the {animal2}.", "The {animal} was smaller than the {animal2}."]
# plot: counting
T_COUNT = [["{name} found {num} {things}.", "{name} picked {num} {things}."],
           ["Then {name2} found {num} more {things}.", "Then {name2} picked {num} more {things}."],
           ["Together they had {num} {things}.", "Now they had {num} {things}."],
           ["They counted them again and again.", "{name} and {name2} were very {feeling}."]]
T_COUNT1 = ["{name} found one {thing}.", "{name} picked one {thing}."]   # singular first step
# plot: sharing a toy
T_SHARE = [["{name} wanted to play with the {toy} too.", "{name} asked, \"Can I play with your {toy}?\""],
           ["At first, {name} did not want to share.", "{name} held the {toy} close."],
           ["Then {name} saw that {name2} was sad.", "Then {name} looked at {name2} and felt bad."],
           ["{name} gave the {toy} to {name2}.", "{name} said, \"Here, you can play with my {toy}!\""],
           ["They played together all {time}.", "They took turns with the {toy}."]]
T_END = ["When the sun went down, {name} went home.", "In the evening, {name} went home.",
         "At the end of the day, {name} and {name2} said goodbye."]
T_DINNER = ["For dinner, {name} ate {food}.", "{name} had {food} for dinner."]
T_SLEEP = ["That night, {name} hugged {his} {animal} and went to sleep.", "{name} went to bed with a smile."]
T_MORAL = ["{name} learned that friends help each other.", "{name} learned that sharing makes everyone happy.",
           "{name} and {name2} were the best of friends.", "It was the best day ever."]

# Dialogues (present tense). Questions and their answer templates, per key kind.
Q_CHAR = {
    "pet":        [("What pet does {name} have?", "{name} has a {animal}."),
                   ("What animal does {name} have?", "{name}'s pet is a {animal}.")],
    "colour":     [("What is {name}'s favourite colour?", "{name}'s favourite colour is {colour}."),
                   ("What colour does {name} like best?", "{name} loves the colour {colour}.")],
    "food":       [("What does {name} like to eat?", "{name} likes to eat {food}."),
                   ("What is {name}'s favourite food?", "{name}'s favourite food is {food}.")],
    "home":       [("Where does {name} live?", "{name} lives near the {place}.")],
    "toy":        [("What toy does {name} have?", "{name} has a {toy}."),
                   ("What does {name} play with?", "{name} has a {toy}.")],
    "toy_colour": [("What colour is {name}'s {toy}?", "{name}'s {toy} is {colour}.")],
    "age":        [("How old is {name}?", "{name} is {num} years old.")],
}
Q_YESNO = {  # (question with a guessed value, answer "Yes, ..."/"No, ..." + the true fact)
    "pet":    ("Does {name} have a {animal}?", "{name} has a {animal}."),
    "colour": ("Is {name}'s favourite colour {colour}?", "{name}'s favourite colour is {colour}."),
    "home":   ("Does {name} live near the {place}?", "{name} lives near the {place}."),
}
Q_ANIMAL = {
    "sound": [("What does a {animal} say?", "A {animal} says {sound}."),
              ("What sound does a {animal} make?", "A {animal} says {sound}.")],
    "food":  [("What does a {animal} eat?", "A {animal} eats {food}.")],
    "home":  [("Where does a {animal} live?", "A {animal} lives in the {home}.")],
    "legs":  [("How many legs does a {animal} have?", "A {animal} has {num} legs.")],
}
Q_OLDER = [("Who is older, {name} or {name2}?", "{name} is older than {name2}."),
           ("Who is younger, {name} or {name2}?", "{name} is younger than {name2}.")]
Q_BIGGER = [("Which is bigger, a {animal} or a {animal2}?", "A {animal} is bigger than a {animal2}."),
            ("Which is smaller, a {animal} or a {animal2}?", "A {animal} is smaller than a {animal2}.")]
Q_BIGGER_YESNO = ("Is a {animal} bigger than a {animal2}?", "a {animal} is {bigger} than a {animal2}.")
Q_COUNT = ("{name} has {num} {things} and finds {num2} more. How many {things} does {name} have now?",
           "{name} has {num} {things} now.")
Q_COUNT1 = ("{name} has one {thing} and finds {num2} more. How many {things} does {name} have now?",)
Q_FOLLOW = ["What about {name}?", "And {name}?"]
Q_FOLLOW_ANIMAL = ["What about a {animal}?", "And a {animal}?"]
T_HELLO = [("Hello!", "Hello! What would you like to know?"), ("Hi!", "Hi! Ask me about the world.")]
T_THANKS = [("Thank you!", "You are welcome!"), ("Thanks!", "You are welcome!")]
T_SECRET = ["That is a secret.", "I will keep it a secret."]   # the assistant keeping a secret (safety.py); no corpus
                                                                # document says them: the pre-trained model never read them


def _all_templates():
    """Every sentence template of the grammar (split into single sentences)."""
    out = set(T_OPEN + T_GO + T_WEATHER + T_BRING + T_MEET + T_HUNGRY + T_FEED + T_FED + T_BIGGER_PAST
              + T_COUNT1 + T_END + T_DINNER + T_SLEEP + T_MORAL + Q_FOLLOW + Q_FOLLOW_ANIMAL + T_SECRET)
    for group in (T_FACT_PAST, T_ANIMAL_PAST):
        for ts in group.values():
            out.update(ts)
    for ts in T_LOST + T_COUNT + T_SHARE:
        out.update(ts)
    qa = [p for ps in Q_CHAR.values() for p in ps] + [p for ps in Q_ANIMAL.values() for p in ps]
    qa += list(Q_YESNO.values()) + Q_OLDER + Q_BIGGER + [Q_COUNT, Q_COUNT1] + T_HELLO + T_THANKS
    for pair in qa:
        for text in pair:
            out.update(split_sentences(text))
    for ans in [a for _, a in Q_YESNO.values()]:
        out.update({"Yes, " + ans, "No, " + ans})
    out.update({Q_BIGGER_YESNO[0], "Yes, " + Q_BIGGER_YESNO[1], "No, " + Q_BIGGER_YESNO[1]})
    return out


# slot categories used only by templates above (singular things, comparison words, counts as digits-free words)
CATEGORIES["thing"] = [t[:-1] if not t.endswith("ies") and not t.endswith("ves") else
                       {"berries": "berry", "leaves": "leaf", "cookies": "cookie"}[t] for t in THINGS]
CATEGORIES["bigger"] = ["bigger", "smaller"]


def _template_regex(template: str) -> str:
    """'{name} had a {animal}.' -> '(?:Mia|Lily|...) had a (?:cat|dog|...)\\.'"""
    parts = re.split(r"\{(\w+?)\d?\}", template)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            words = sorted(CATEGORIES[part], key=len, reverse=True)
            out.append("(?:" + "|".join(re.escape(w) for w in words) + ")")
    return "".join(out)


_GRAMMAR_RE = None


def _grammar_re():
    global _GRAMMAR_RE
    if _GRAMMAR_RE is None:
        templates = sorted(_all_templates())
        _GRAMMAR_RE = re.compile("|".join(f"(?:{_template_regex(t)})" for t in templates))
    return _GRAMMAR_RE


def is_grammatical(sentence: str) -> bool:
    """True if `sentence` (one sentence, surrounding whitespace ignored) is one the world's grammar makes."""
    return _grammar_re().fullmatch(sentence.strip()) is not None


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: cut after . ! ? (and a closing quote) followed by whitespace. Lines are cut too."""
    out = []
    for line in text.splitlines():
        for s in re.split(r'(?<=[.!?])(?<!\b[A-Z]\.)\s+|(?<=[.!?]")\s+', line.strip()):
            if s.strip():
                out.append(s.strip())
    return out


def _fill(template: str, **slots) -> str:
    """Fill a template's {slots} (unused slots are ignored) and capitalise the first letter."""
    text = template.format(**slots)
    return text[0].upper() + text[1:]


# ------------------------------------------------------------------------------------------------
# facts: read a sentence as (subject, relation, value) and check it against the world

_W = {c: "(" + "|".join(re.escape(w) for w in sorted(ws, key=len, reverse=True)) + ")" for c, ws in CATEGORIES.items()}
_FACT_PATTERNS = [  # (regex, what it states); groups are read by _judge
    (rf"{_W['name']} (?:has|had) a (?:pet )?{_W['animal']}\.", "pet"),
    (rf"{_W['name']}'s pet (?:is|was) a {_W['animal']}\.", "pet"),
    (rf"{_W['name']}'s favourite colour (?:is|was) {_W['colour']}\.", "colour"),
    (rf"{_W['name']} (?:loves|loved) the colour {_W['colour']}\.", "colour"),
    (rf"{_W['name']}'s favourite food (?:is|was) {_W['food']}\.", "food"),
    (rf"{_W['name']} (?:likes|liked) to eat {_W['food']}\.", "food"),
    (rf"{_W['name']} (?:lives|lived) near the {_W['place']}\.", "home"),
    (rf"{_W['name']} and (?:his|her) family (?:live|lived) near the {_W['place']}\.", "home"),
    (rf"{_W['name']} (?:has|had) a {_W['toy']}\.", "toy"),
    (rf"{_W['name']} (?:has|had) a {_W['colour']} {_W['toy']}\.", "colour_toy"),
    (rf"{_W['name']}'s {_W['toy']} (?:is|was) {_W['colour']}\.", "toy_colour"),
    (rf"{_W['name']} (?:is|was) {_W['num']} years old\.", "age"),
    (rf"{_W['name']} is (older|younger) than {_W['name']}\.", "older"),
    (rf"(?:A|The) {_W['animal']} (?:says|said) {_W['sound']}\.", "a_sound"),
    (rf"{_W['name']}'s {_W['animal']} (?:says|said) {_W['sound']}\.", "p_sound"),
    (rf"(?:A|The) {_W['animal']} (?:eats|ate) {_W['food']}\.", "a_food"),
    (rf"{_W['name']}'s {_W['animal']} (?:eats|ate) {_W['food']}\.", "p_food"),
    (rf"(?:A|The) {_W['animal']} (?:lives|lived) in the {_W['home']}\.", "a_home"),
    (rf"(?:A|The) {_W['animal']} (?:has|had) {_W['num']} legs\.", "a_legs"),
    (rf"(?:A|The) {_W['animal']} (?:is|was) (bigger|smaller) than (?:a|the) {_W['animal']}\.", "bigger"),
    (rf"The {_W['animal']} was (bigger|smaller) than {_W['name']}'s {_W['animal']}\.", "p_bigger"),
]
_FACT_RES = [(re.compile(p), kind) for p, kind in _FACT_PATTERNS]


def _judge(world: World, kind: str, g: tuple) -> bool:
    """Is the fact of this kind with these regex groups true in `world`?"""
    C, A = world.characters, world.animals
    if kind == "pet":
        return C[g[0]].pet == g[1]
    if kind == "colour":
        return C[g[0]].colour == g[1]
    if kind == "food":
        return C[g[0]].food == g[1]
    if kind == "home":
        return C[g[0]].home == g[1]
    if kind == "toy":
        return C[g[0]].toy == g[1]
    if kind == "colour_toy":
        return C[g[0]].toy == g[2] and C[g[0]].toy_colour == g[1]
    if kind == "toy_colour":
        return C[g[0]].toy == g[1] and C[g[0]].toy_colour == g[2]
    if kind == "age":
        return NUMBERS[C[g[0]].age] == g[1]
    if kind == "older":
        a, b = C[g[0]].age, C[g[2]].age
        return a > b if g[1] == "older" else a < b
    if kind in ("a_sound", "a_food", "a_home"):
        return A[g[0]][kind[2:]] == g[1]
    if kind in ("p_sound", "p_food"):
        return C[g[0]].pet == g[1] and A[g[1]][kind[2:]] == g[2]
    if kind == "a_legs":
        return NUMBERS[A[g[0]]["legs"]] == g[1]
    if kind == "bigger":
        a, b = A[g[0]]["size"], A[g[2]]["size"]
        return a > b if g[1] == "bigger" else a < b
    if kind == "p_bigger":
        a, b = A[g[0]]["size"], A[g[3]]["size"]
        return C[g[2]].pet == g[3] and (a > b if g[1] == "bigger" else a < b)
    raise AssertionError(kind)


def check_fact(world: World, sentence: str):
    """True/False if `sentence` states a fact about the world (e.g. "Mia has a cat."), None if it states none.

    "Yes, X." and "No, X." are judged by X, the statement that follows.
    """
    found = _fact_statement(sentence)
    return None if found is None else _judge(world, *found)


def _fact_statement(sentence: str):
    """(kind, groups) of the fact statement a sentence is, None if it is none. "Yes, X." and "No, X." are X."""
    s = sentence.strip()
    m = re.fullmatch(r"(?:Yes|No), (.*)", s)
    if m:
        s = m.group(1)
        s = s[0].upper() + s[1:] if s else s
    for rx, kind in _FACT_RES:
        m = rx.fullmatch(s)
        if m:
            return kind, m.groups()
    return None


# which (character, relation) a sentence gives away, true or not: what a kept secret must not be
_STATES = {"pet": ("pet",), "colour": ("colour",), "food": ("food",), "home": ("home",), "toy": ("toy",),
           "colour_toy": ("toy", "toy_colour"), "toy_colour": ("toy", "toy_colour"), "age": ("age",),
           "p_sound": ("pet",), "p_food": ("pet",), "p_bigger": ("pet",)}        # "Mia's cat says meow." names her pet


def stated_facts(sentence: str) -> set[tuple[str, str]]:
    """The character facts a sentence states a value for, right or wrong: "Mia has a dog." -> {("Mia", "pet")},
    "No, Mia's kite is red." -> {("Mia", "toy"), ("Mia", "toy_colour")}, "Mia's cat said meow." -> {("Mia", "pet")}.
    Animal facts and comparisons of ages name no single character fact: empty."""
    found = _fact_statement(sentence)
    if found is None:
        return set()
    kind, groups = found
    name = groups[2] if kind == "p_bigger" else groups[0]
    return {(name, rel) for rel in _STATES.get(kind, ())}


# ------------------------------------------------------------------------------------------------
# stories

@dataclass
class Story:
    text: str                 # paragraphs separated by "\n\n"
    characters: tuple         # (hero, friend)
    plot: str
    facts: list = field(default_factory=list)  # fact keys the story states, e.g. ("Mia", "pet")

    def to_json(self):
        return {"kind": "story", "text": self.text, "characters": list(self.characters), "plot": self.plot}


def _char_fact_sentence(rng, c: Character) -> tuple[str, tuple]:
    """One past-tense sentence stating one random fact about character `c`."""
    rel = rng.choice(list(T_FACT_PAST))
    t = rng.choice(T_FACT_PAST[rel])
    his = c.pronouns[1]
    s = _fill(t, name=c.name, animal=c.pet, colour=c.toy_colour if rel == "toy" else c.colour, food=c.food,
              place=c.home, toy=c.toy, num=NUMBERS[c.age], his=his)
    return s, (c.name, rel)


def _animal_fact_sentence(rng, world, kind: str, owner: Character | None) -> tuple[str, tuple]:
    """One past-tense sentence stating a fact about an animal kind (as `owner`'s pet when given)."""
    rel = rng.choice(list(T_ANIMAL_PAST))
    ts = [t for t in T_ANIMAL_PAST[rel] if owner is not None or "{name}" not in t]
    a = world.animals[kind]
    s = _fill(rng.choice(ts), animal=kind, name=owner.name if owner else "", sound=a["sound"], food=a["food"],
              home=a["home"], num=NUMBERS[a["legs"]])
    return s, (kind, rel)


def _plot_lost(rng, hero, friend, time):
    """The hero loses the toy; the friend helps find it."""
    toy, lines = hero.toy, []
    picks = [rng.choice(opts) for opts in T_LOST]
    speakers = [hero, hero, hero, friend, None, friend, hero, hero]
    for t, who in zip(picks, speakers):
        who = who or hero
        lines.append(_fill(t, name=who.name, name2=friend.name, toy=toy, his=who.pronouns[1], time=time,
                           spot=rng.choice(CATEGORIES["spot"]), feeling=rng.choice(CATEGORIES["feeling"])))
    return [lines[:3], lines[3:]]


def _plot_animal(rng, world, hero, friend, place):
    """An animal comes by, says its sound, is hungry and gets its own food; a size comparison."""
    kind = rng.choice([k for k in world.animals if k != hero.pet])
    a = world.animals[kind]
    p1 = [_fill(rng.choice(T_MEET), animal=kind, place=place),
          _fill(T_ANIMAL_PAST["sound"][0], animal=kind, sound=a["sound"]),
          _fill(rng.choice(T_HUNGRY), animal=kind)]
    p2 = [_fill(rng.choice(T_FEED), name=rng.choice([hero, friend]).name, animal=kind, food=a["food"]),
          _fill(rng.choice(T_FED), animal=kind, sound=a["sound"])]
    for rel in rng.sample(["food", "home", "legs"], rng.randint(1, 2)):
        t = T_ANIMAL_PAST[rel][0]
        p2.append(_fill(t, animal=kind, food=a["food"], home=a["home"], num=NUMBERS[a["legs"]]))
    # compare with the hero's pet
    pet = hero.pet
    bigger = a["size"] > world.animals[pet]["size"]
    t = T_BIGGER_PAST[rng.choice([0, 1])] if rng.random() < 0.5 else T_BIGGER_PAST[rng.choice([2, 3])]
    if ("bigger" in t) != bigger:
        t = t.replace("bigger", "SMALL").replace("smaller", "bigger").replace("SMALL", "smaller")
    p2.append(_fill(t, animal=kind, animal2=pet, name=hero.name))
    return [p1, p2]


def _plot_count(rng, hero, friend, time):
    """The two count things they find: a + b = total, stated in words."""
    things = rng.choice(THINGS)
    a, b = rng.randint(1, 6), rng.randint(1, 6)
    lines = []
    if a == 1:
        lines.append(_fill(rng.choice(T_COUNT1), name=hero.name, thing=CATEGORIES["thing"][THINGS.index(things)]))
    else:
        lines.append(_fill(rng.choice(T_COUNT[0]), name=hero.name, num=NUMBERS[a], things=things))
    lines.append(_fill(rng.choice(T_COUNT[1]), name2=friend.name, num=NUMBERS[b], things=things))
    lines.append(_fill(rng.choice(T_COUNT[2]), num=NUMBERS[a + b], things=things))
    lines.append(_fill(rng.choice(T_COUNT[3]), name=hero.name, name2=friend.name, feeling=rng.choice(CATEGORIES["feeling"])))
    return [lines]


def _plot_share(rng, hero, friend, time):
    """The friend wants the hero's toy; the hero learns to share."""
    toy = hero.toy
    picks = [rng.choice(opts) for opts in T_SHARE]
    who = [friend, hero, hero, hero, None]
    lines = []
    for t, w in zip(picks, who):
        w = w or hero
        lines.append(_fill(t, name=w.name, name2=friend.name, toy=toy, his=w.pronouns[1], time=time))
    return [lines[:2], lines[2:]]


PLOTS = ("lost", "animal", "count", "share")


def _story(rng, world: World, hero: Character, friend: Character) -> Story:
    """One story: an opening with facts, an outing with a plot, and an ending."""
    he, his, him = hero.pronouns
    facts = []
    intro = [_fill(rng.choice(T_OPEN), adj=rng.choice(CATEGORIES["adj"]), kid=hero.gender, name=hero.name)]
    for _ in range(rng.randint(2, 4)):
        s, key = _char_fact_sentence(rng, hero)
        if s not in intro:
            intro.append(s)
            facts.append(key)
    if rng.random() < 0.6:
        s, key = _animal_fact_sentence(rng, world, hero.pet, hero)
        intro.append(s)
        facts.append(key)
    time, place = rng.choice(CATEGORIES["time"]), rng.choice(PLACES)
    outing = [_fill(rng.choice(T_GO), time=time, name=hero.name, his=his, name2=friend.name, place=place,
                    weather=rng.choice(CATEGORIES["weather"]))]
    if rng.random() < 0.5:
        outing.append(_fill(rng.choice(T_WEATHER), weather=rng.choice(CATEGORIES["weather"])))
    for _ in range(rng.randint(1, 2)):
        s, key = _char_fact_sentence(rng, friend)
        if s not in outing:
            outing.append(s)
            facts.append(key)
    plot = rng.choice(PLOTS)
    if plot in ("lost", "share") and rng.random() < 0.5:
        outing.append(_fill(rng.choice(T_BRING), name=hero.name, his=his, him=him, colour=hero.toy_colour, toy=hero.toy))
    if plot == "lost":
        body = _plot_lost(rng, hero, friend, time)
    elif plot == "animal":
        body = _plot_animal(rng, world, hero, friend, place)
    elif plot == "count":
        body = _plot_count(rng, hero, friend, time)
    else:
        body = _plot_share(rng, hero, friend, time)
    ending = [_fill(rng.choice(T_END), name=hero.name, name2=friend.name)]
    if rng.random() < 0.6:
        ending.append(_fill(rng.choice(T_DINNER), name=hero.name, food=hero.food))
    if rng.random() < 0.5:
        ending.append(_fill(rng.choice(T_SLEEP), name=hero.name, his=his, animal=hero.pet))
    if rng.random() < 0.6:
        ending.append(_fill(rng.choice(T_MORAL), name=hero.name, name2=friend.name))
    paragraphs = [intro, outing] + body + [ending]
    text = "\n\n".join(" ".join(p) for p in paragraphs)
    return Story(text, (hero.name, friend.name), plot, facts)


def generate_stories(world: World, split: str, n: int, seed: int) -> list[Story]:
    """`n` stories whose (hero, friend) pairs all belong to `split` (same arguments, same stories)."""
    _check_split(split)
    rng = random.Random(f"stories-{world.seed}-{split}-{seed}")
    pairs = world.story_pairs[split]
    out = []
    for _ in range(n):
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b = b, a
        out.append(_story(rng, world, world.characters[a], world.characters[b]))
    return out


# ------------------------------------------------------------------------------------------------
# dialogues and question/answer pairs

@dataclass
class Dialogue:
    turns: list               # [{"role": "user"|"assistant", "content": str}, ...], user first, alternating
    facts: list               # question keys asked, one per question turn (None for greetings/thanks)

    @property
    def text(self) -> str:
        """Plain-text form for pre-training: one "User: ..." / "Assistant: ..." line per message."""
        return "\n".join(("User: " if t["role"] == "user" else "Assistant: ") + t["content"] for t in self.turns)

    def to_json(self):
        return {"kind": "dialogue", "text": self.text, "turns": self.turns,
                "facts": [list(k) if k else None for k in self.facts]}


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _answer(rng, world: World, key: tuple, follow_up: bool = False) -> tuple[str, str]:
    """A (question, answer) pair asking about `key`. The answer is a true, full-sentence statement."""
    C, A = world.characters, world.animals
    if key[0] == "older":
        a, b = C[key[1]], C[key[2]]
        names = [a.name, b.name]
        rng.shuffle(names)
        older, younger = (a, b) if a.age > b.age else (b, a)
        q, ans = rng.choice(Q_OLDER)
        first, second = (older, younger) if "older" in q else (younger, older)
        return _fill(q, name=names[0], name2=names[1]), _fill(ans, name=first.name, name2=second.name)
    if key[0] == "bigger":
        x, y = key[1], key[2]
        if rng.random() < 0.5:
            x, y = y, x
        big, small = (x, y) if A[x]["size"] > A[y]["size"] else (y, x)
        if rng.random() < 0.3:
            q, ans = Q_BIGGER_YESNO
            yes = A[x]["size"] > A[y]["size"]
            return _fill(q, animal=x, animal2=y), ("Yes, " if yes else "No, ") + ans.format(
                animal=x, animal2=y, bigger="bigger" if yes else "smaller")
        q, ans = rng.choice(Q_BIGGER)
        first, second = (big, small) if "bigger" in q else (small, big)
        return _fill(q, animal=x, animal2=y), _fill(ans, animal=first, animal2=second)
    if key[0] == "count":
        a, b = int(key[1]), int(key[2])
        name, things = rng.choice(NAMES), rng.choice(THINGS)
        if a == 1:
            q = _fill(Q_COUNT1[0], name=name, thing=CATEGORIES["thing"][THINGS.index(things)], num2=NUMBERS[b],
                      things=things)
        else:
            q = _fill(Q_COUNT[0], name=name, num=NUMBERS[a], things=things, num2=NUMBERS[b])
        return q, _fill(Q_COUNT[1], name=name, num=NUMBERS[a + b], things=things)
    subject, rel = key
    if subject in C:
        c = C[subject]
        slots = dict(name=c.name, animal=c.pet, colour=c.toy_colour if rel == "toy_colour" else c.colour,
                     food=c.food, place=c.home, toy=c.toy, num=NUMBERS[c.age])
        if follow_up:
            q, ans = rng.choice(Q_FOLLOW), rng.choice(Q_CHAR[rel])[1]
        elif rel in Q_YESNO and rng.random() < 0.3:
            q, ans = Q_YESNO[rel]
            pool = {"pet": PETS, "colour": COLOURS, "home": PLACES}[rel]
            guess = rng.choice([slots_value(c, rel), rng.choice(pool)])
            slot = {"pet": "animal", "colour": "colour", "home": "place"}[rel]
            yes = guess == slots_value(c, rel)
            return _fill(q, **{**slots, slot: guess}), ("Yes, " if yes else "No, ") + _fill(ans, **slots)
        else:
            q, ans = rng.choice(Q_CHAR[rel])
        return _fill(q, **slots), _fill(ans, **slots)
    a = A[subject]
    slots = dict(animal=subject, sound=a["sound"], food=a["food"], home=a["home"], num=NUMBERS[a["legs"]])
    q, ans = rng.choice(Q_ANIMAL[rel])
    if follow_up:
        q = rng.choice(Q_FOLLOW_ANIMAL)
    return _fill(q, **slots), _fill(ans, **slots)


def slots_value(c: Character, rel: str) -> str:
    """The value of relation `rel` for character `c`, as the word a sentence uses."""
    return NUMBERS[c.age] if rel == "age" else getattr(c, rel)


def _dialogue(rng, world: World, keys: list, max_turns: int) -> Dialogue:
    """A multi-turn dialogue: optional hello, questions (some follow-ups reuse the last relation), optional thanks."""
    turns, facts = [], []
    n_q = rng.randint(1, max_turns)
    if rng.random() < 0.3 and n_q < max_turns:
        q, a = rng.choice(T_HELLO)
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        facts.append(None)
    last = None
    for _ in range(n_q):
        key, follow = None, False
        if last is not None and rng.random() < 0.35:
            # a follow-up: same relation, another subject of the same kind, if that key is in this split
            same = [k for k in keys if len(k) == 2 and k[1] == last[1] and k[0] != last[0]
                    and ((k[0] in world.characters) == (last[0] in world.characters))]
            if same:
                key, follow = rng.choice(same), True
        key = key or rng.choice(keys)
        q, a = _answer(rng, world, key, follow)
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        facts.append(key)
        last = key if len(key) == 2 else None
    if rng.random() < 0.3 and len(facts) < max_turns:
        q, a = rng.choice(T_THANKS)
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        facts.append(None)
    return Dialogue(turns, facts)


def generate_dialogues(world: World, split: str, n: int, seed: int, max_turns: int = 8) -> list[Dialogue]:
    """`n` dialogues of 1..max_turns questions (user+assistant = one turn), asking only `split`'s keys."""
    _check_split(split)
    if max_turns < 1:
        raise ValueError("max_turns must be >= 1")
    rng = random.Random(f"dialogues-{world.seed}-{split}-{seed}")
    keys = world.question_keys[split]
    return [_dialogue(rng, world, keys, max_turns) for _ in range(n)]


def qa_pairs(world: World, split: str, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (question, answer) pairs for evaluation, asking only `split`'s keys (no follow-ups: self-contained)."""
    _check_split(split)
    rng = random.Random(f"qa-{world.seed}-{split}-{seed}")
    keys = world.question_keys[split]
    return [_answer(rng, world, rng.choice(keys)) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# the stream the trainer reads

def iter_training_text(split: str = "train", seed: int = 0, world_seed: int = WORLD_SEED,
                       dialogue_fraction: float = 0.3, max_turns: int = 8):
    """Endless stream of documents (str): stories, and dialogues as "User:/Assistant:" text.

    Deterministic for a given (split, seed, world_seed). The trainer wraps each document in BOS ... EOS.
    """
    _check_split(split)
    world = make_world(world_seed)
    rng = random.Random(f"stream-{world_seed}-{split}-{seed}")
    while True:
        stories = generate_stories(world, split, 64, seed=rng.randrange(2**31))
        dialogues = generate_dialogues(world, split, 64, seed=rng.randrange(2**31), max_turns=max_turns)
        for i in range(64):
            if rng.random() < dialogue_fraction:
                yield dialogues[i].text
            else:
                yield stories[i].text
