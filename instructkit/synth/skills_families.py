"""The task families of the skills curriculum: what each asks, its answer, its checker, its facts.

Every family is data, not a class hierarchy: a list of instruction phrasings (format strings over the
fields of a sampled instance) plus five small functions. Answers are computed, never written by
hand, so every one of them can be checked; a verifier accepts the canonical answer under tolerant
normalisation (see :func:`clean`) and rejects the realistic mistakes that :meth:`Family.wrong` makes.

Families are grouped by category so evaluation can report generalisation per kind of skill, and each
family can also state its facts as plain text (``state``) so that a corpus can teach a skill as
knowledge, without any instruction format.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

Data = dict


def canonical_key(family: str, data: Data) -> str:
    """A string that is equal for two instances exactly when family and inputs are equal."""
    return family + "|" + json.dumps(data, sort_keys=True, separators=(",", ":"))


# --- Normalisation and answer parsing -----------------------------------------------------------

# Tiny models often wrap a bare answer in a stock preamble; accepting it keeps the check about the
# skill, not about one exact surface form.
_PREAMBLE = re.compile(r"^(?:the\s+)?(?:final\s+)?(?:answer|result)\s*(?:is\b|:)\s*", re.I)


def clean(text: str) -> str:
    """Normalise a reply for comparison.

    Collapses whitespace, drops a leading "The answer is"/"Answer:", one trailing period, and quotes
    or backticks around the whole reply. Case is left alone: families where case matters (upper
    case, lower case) compare it, the others lower-case both sides.

    Args:
        text: A model's reply.

    Returns:
        The normalised reply ("" for an empty one).
    """
    s = _PREAMBLE.sub("", " ".join(text.split())).strip()
    for _ in range(2):  # a period may sit outside the quotes or inside them
        s = s.strip("`").strip()
        if s.endswith("."):
            s = s[:-1].rstrip()
        if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
            s = s[1:-1].strip()
    return s


def _int_of(text: str) -> int | None:
    s = clean(text)
    return int(s) if re.fullmatch(r"[-+]?\d+", s) else None


def _ints_of(text: str) -> list[int] | None:
    """A list of integers written with commas, spaces, "and" or brackets; None if anything else."""
    s = re.sub(r"\band\b", ",", clean(text).strip("[]() "))
    toks = [t for t in re.split(r"[,;\s]+", s) if t]
    if not toks or not all(re.fullmatch(r"[-+]?\d+", t) for t in toks):
        return None
    return [int(t) for t in toks]


def _words_of(text: str) -> list[str]:
    """Lower-cased words of a comma- or space-separated reply ([] for an empty one)."""
    s = clean(text).strip("[]() ")
    parts = re.split(r"\s*,\s*", s) if "," in s else s.split()
    return [p.strip("\"'").lower() for p in parts if p.strip("\"'")]


def _v_int(solve: Callable[[Data], str]) -> Callable[[Data, str], bool]:
    return lambda d, r: _int_of(r) == int(solve(d))


def _v_ints(solve: Callable[[Data], str]) -> Callable[[Data, str], bool]:
    return lambda d, r: _ints_of(r) == _ints_of(solve(d))


def _v_words(solve: Callable[[Data], str]) -> Callable[[Data, str], bool]:
    return lambda d, r: bool(_words_of(r)) and _words_of(r) == _words_of(solve(d))


def _v_text(solve: Callable[[Data], str], case: bool = False) -> Callable[[Data, str], bool]:
    def verify(d: Data, r: str) -> bool:
        got, want = clean(r), solve(d)
        return bool(got) and (got == want if case else got.lower() == want.lower())
    return verify


# --- Rendering helpers --------------------------------------------------------------------------

def _csv(xs) -> str:
    return ", ".join(map(str, xs))


def _and(xs) -> str:
    xs = [str(x) for x in xs]
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def _pick(data: Data, *forms: str) -> str:
    """One of several statement forms, fixed per instance so the corpus is reproducible."""
    return forms[zlib.crc32(json.dumps(data, sort_keys=True).encode()) % len(forms)]


def _fields(data: Data) -> dict:
    """Format fields of an instance: lists as "a, b, c"; a word list also as ``text`` ("a b c")."""
    out = {k: _csv(v) if isinstance(v, list) else str(v) for k, v in data.items()}
    if isinstance(data.get("words"), list):
        out["text"] = " ".join(data["words"])
    return out


# --- The family record --------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """One kind of task: its phrasings and the functions that sample, solve, check and state it.

    Attributes:
        name: Registry key, e.g. ``"add"``.
        category: The kind of skill, e.g. ``"arithmetic"``; used to pick held-out families.
        phrasings: Instruction templates; ``str.format`` fields come from :meth:`fields`.
        sample: ``sample(rng) -> data``: draws the structured inputs (JSON-native values only).
        solve: ``solve(data) -> str``: the canonical answer.
        verify: ``verify(data, response) -> bool``: accepts any normalised form of the answer.
        state: ``state(data) -> str``: the same fact as a plain sentence, with no instruction.
        wrong_candidates: ``(data, rng) -> list[str]``: realistic mistakes, best first.
        fields: ``fields(data) -> dict``: the format fields for the phrasings.
    """

    name: str
    category: str
    phrasings: list[str]
    sample: Callable[[random.Random], Data]
    solve: Callable[[Data], str]
    verify: Callable[[Data, str], bool]
    state: Callable[[Data], str]
    wrong_candidates: Callable[[Data, random.Random], list[str]]
    fields: Callable[[Data], dict] = _fields

    def render(self, data: Data, phrasing: int) -> str:
        """The prompt for ``data`` in phrasing number ``phrasing``."""
        return self.phrasings[phrasing].format(**self.fields(data))

    def wrong(self, data: Data, rng: random.Random) -> str:
        """A plausible wrong answer (off-by-one, wrong order, wrong item, wrong format, ...).

        Candidates that the verifier would accept are filtered out here, once, so every family's
        wrong answer is guaranteed to be wrong however its candidates were written.

        Raises:
            RuntimeError: When no candidate is wrong (a bug in the family).
        """
        right = self.solve(data)
        seen: list[str] = []
        for c in self.wrong_candidates(data, rng):
            if c and c != right and c not in seen and not self.verify(data, c):
                seen.append(c)
        if not seen:
            raise RuntimeError(f"family {self.name!r} produced no wrong answer for {data}")
        return rng.choice(seen)


FAMILIES: dict[str, Family] = {}


def _register(family: Family) -> None:
    assert family.name not in FAMILIES, family.name
    FAMILIES[family.name] = family


# --- Vocabulary ---------------------------------------------------------------------------------

NOUNS = ("apple banana cherry river mountain teacher garden window bottle planet candle rocket "
         "violin pencil harbor island lantern meadow tiger forest button dragon castle pillow ocean "
         "mirror ticket wallet jacket kettle ladder marble needle parrot pepper rabbit turtle wagon "
         "zebra cat dog sun map cup box hat pen key bus egg fox owl bee").split()
ADJECTIVES = "red blue green small tall old new round quiet wooden yellow heavy soft".split()
WORDS = NOUNS + ADJECTIVES
# Plural by adding "s", for sentences like "Ann bought 3 candles".
COUNTABLE = ("apple pencil ticket button candle bottle marble rabbit jacket ladder rocket window "
             "planet mirror turtle wagon parrot violin lantern pillow kettle needle tiger dragon "
             "castle wallet").split()
NAMES = ("Ann Ben Carla Dev Emma Farid Grace Hugo Ines Jack Kofi Lena Mia Noah Omar Priya Quinn "
         "Rosa Sam Tara Uma Victor Wen Yusuf Zoe").split()
MONTHS = ("January February March April May June July August September October November "
          "December").split()
# The whole sentiment "model": a sentence's label is decided by which list its adjectives come from.
POSITIVE = "good great happy lovely excellent wonderful nice amazing pleasant brilliant".split()
NEGATIVE = "bad awful terrible sad horrible poor boring ugly nasty dreadful".split()
# Words with repeated letters, so letter counts are not always 1.
SPELLING = ("banana strawberry bookkeeper committee balloon letter pepper coffee address success "
            "cherry teacher elephant umbrella parallel referee assessment tomorrow happiness giraffe "
            "cinnamon potato tattoo kangaroo volleyball engineer grammar necessary possess mississippi "
            "rabbit butterfloor blossom puzzle window paper dinner bottle garden").split()
_NUMBER_WORDS = {2: "two", 3: "three"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _nums(rng: random.Random, lo: int, hi: int, top: int = 99) -> list[int]:
    """``lo..hi`` numbers in 0..top with at least two distinct values (so order matters)."""
    while True:
        xs = [rng.randint(0, top) for _ in range(rng.randint(lo, hi))]
        if len(set(xs)) > 1:
            return xs


# --- Arithmetic ---------------------------------------------------------------------------------

def _add_solve(d: Data) -> str:
    return str(d["a"] + d["b"])


_register(Family(
    "add", "arithmetic",
    ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
     "Calculate the sum of {a} and {b}.", "What do you get when you add {b} to {a}?",
     "Find the total of {a} and {b}.", "{a} + {b} = ?", "Work out {a} plus {b}, please."],
    lambda rng: {"a": rng.randint(0, 99), "b": rng.randint(0, 99)},
    _add_solve, _v_int(_add_solve),
    lambda d: _pick(d, "{a} plus {b} is {s}.", "The sum of {a} and {b} is {s}.",
                    "Adding {a} and {b} gives {s}.").format(s=_add_solve(d), **d),
    lambda d, rng: [str(d["a"] + d["b"] + rng.choice((1, -1))), str(d["a"] + d["b"] + 10),
                    str(abs(d["a"] - d["b"]))],
))


def _sub_sample(rng: random.Random) -> Data:
    a = rng.randint(0, 99)
    return {"a": a, "b": rng.randint(0, a)}


_register(Family(
    "subtract", "arithmetic",
    ["What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
     "What is left when you take {b} away from {a}?", "Calculate the difference {a} minus {b}.",
     "How much is {a} less {b}?", "{a} - {b} = ?", "Work out {a} take away {b}, please."],
    _sub_sample, lambda d: str(d["a"] - d["b"]), _v_int(lambda d: str(d["a"] - d["b"])),
    lambda d: _pick(d, "{a} minus {b} is {r}.", "Taking {b} away from {a} leaves {r}.",
                    "The difference between {a} and {b} is {r}.").format(r=d["a"] - d["b"], **d),
    # Wrong order (b - a) is the classic subtraction slip; off-by-one the classic borrow slip.
    lambda d, rng: [str(d["b"] - d["a"]), str(d["a"] - d["b"] + rng.choice((1, -1))),
                    str(d["a"] + d["b"])],
))

_register(Family(
    "multiply", "arithmetic",
    ["What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}.",
     "What is the product of {a} and {b}?", "Calculate {a} multiplied by {b}.",
     "How much is {a} x {b}?", "{a} * {b} = ?", "Work out {b} lots of {a}, please."],
    lambda rng: {"a": rng.randint(0, 20), "b": rng.randint(0, 20)},
    lambda d: str(d["a"] * d["b"]), _v_int(lambda d: str(d["a"] * d["b"])),
    lambda d: _pick(d, "{a} times {b} is {p}.", "The product of {a} and {b} is {p}.",
                    "{a} multiplied by {b} equals {p}.").format(p=d["a"] * d["b"], **d),
    # One factor off by one, adding instead of multiplying, or a plain off-by-one.
    lambda d, rng: [str(d["a"] * (d["b"] + 1)), str(d["a"] + d["b"]), str(d["a"] * d["b"] + 1)],
))

# --- Comparison ---------------------------------------------------------------------------------


def _two(rng: random.Random) -> Data:
    a, b = rng.sample(range(100), 2)
    return {"a": a, "b": b}


_register(Family(
    "larger_of_two", "comparison",
    ["Which is larger, {a} or {b}?", "What is the larger of {a} and {b}?",
     "Give the bigger number: {a} or {b}.", "Of {a} and {b}, which number is greater?",
     "Pick the larger number out of {a} and {b}.", "Tell me which is bigger: {a} or {b}.",
     "Compare {a} and {b} and give the larger one.", "Which number is higher, {a} or {b}?"],
    _two, lambda d: str(max(d["a"], d["b"])), _v_int(lambda d: str(max(d["a"], d["b"]))),
    lambda d: _pick(d, "The larger of {a} and {b} is {m}.", "{m} is larger than {n}.",
                    "Between {a} and {b}, {m} is the bigger number.").format(
        m=max(d["a"], d["b"]), n=min(d["a"], d["b"]), **d),
    lambda d, rng: [str(min(d["a"], d["b"])), str(max(d["a"], d["b"]) + 1)],
))

_register(Family(
    "smaller_of_two", "comparison",
    ["Which is smaller, {a} or {b}?", "What is the smaller of {a} and {b}?",
     "Give the lower number: {a} or {b}.", "Of {a} and {b}, which number is less?",
     "Pick the smaller number out of {a} and {b}.", "Tell me which is less: {a} or {b}.",
     "Compare {a} and {b} and give the smaller one.", "Which number is lower, {a} or {b}?"],
    _two, lambda d: str(min(d["a"], d["b"])), _v_int(lambda d: str(min(d["a"], d["b"]))),
    lambda d: _pick(d, "The smaller of {a} and {b} is {m}.", "{m} is smaller than {n}.",
                    "Between {a} and {b}, {m} is the lower number.").format(
        m=min(d["a"], d["b"]), n=max(d["a"], d["b"]), **d),
    lambda d, rng: [str(max(d["a"], d["b"])), str(min(d["a"], d["b"]) - 1)],
))


def _extreme_wrong(pick: Callable) -> Callable[[Data, random.Random], list[str]]:
    """Wrong answers for max/min: the runner-up, the opposite extreme, or the last number seen."""
    def wrong(d: Data, rng: random.Random) -> list[str]:
        xs = d["nums"]
        rest = [x for x in xs if x != pick(xs)]
        other = min if pick is max else max
        return [str(pick(rest)), str(other(xs)), str(xs[-1])]
    return wrong


_register(Family(
    "max_list", "comparison",
    ["What is the largest number in this list: {nums}?", "Find the maximum of {nums}.",
     "Which is the biggest of these numbers: {nums}?", "Give the highest value among {nums}.",
     "Here are some numbers: {nums}. Which one is the largest?", "Return the max of the list {nums}.",
     "Tell me the greatest number out of {nums}.", "Numbers: {nums}. What is the maximum?"],
    lambda rng: {"nums": _nums(rng, 3, 7)}, lambda d: str(max(d["nums"])),
    _v_int(lambda d: str(max(d["nums"]))),
    lambda d: _pick(d, "The largest of {l} is {m}.", "Among {l}, the biggest number is {m}.",
                    "The maximum of the numbers {l} is {m}.").format(l=_and(d["nums"]), m=max(d["nums"])),
    _extreme_wrong(max),
))

_register(Family(
    "min_list", "comparison",
    ["What is the smallest number in this list: {nums}?", "Find the minimum of {nums}.",
     "Which is the lowest of these numbers: {nums}?", "Give the least value among {nums}.",
     "Here are some numbers: {nums}. Which one is the smallest?", "Return the min of the list {nums}.",
     "Tell me the tiniest number out of {nums}.", "Numbers: {nums}. What is the minimum?"],
    lambda rng: {"nums": _nums(rng, 3, 7)}, lambda d: str(min(d["nums"])),
    _v_int(lambda d: str(min(d["nums"]))),
    lambda d: _pick(d, "The smallest of {l} is {m}.", "Among {l}, the lowest number is {m}.",
                    "The minimum of the numbers {l} is {m}.").format(l=_and(d["nums"]), m=min(d["nums"])),
    _extreme_wrong(min),
))

# --- List operations ----------------------------------------------------------------------------


def _sort_wrong(reverse: bool) -> Callable[[Data, random.Random], list[str]]:
    """The opposite order, the input left as it was, or one adjacent pair left swapped."""
    def wrong(d: Data, rng: random.Random) -> list[str]:
        good = sorted(d["nums"], reverse=reverse)
        swapped = list(good)
        i = next(i for i in range(len(good) - 1) if good[i] != good[i + 1])
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        return [_csv(sorted(d["nums"], reverse=not reverse)), _csv(d["nums"]), _csv(swapped)]
    return wrong


_register(Family(
    "sort_ascending", "list",
    ["Sort these numbers in ascending order: {nums}", "Put {nums} in order from smallest to largest.",
     "Arrange the following numbers in increasing order: {nums}",
     "Order these from lowest to highest: {nums}", "Sort ascending: {nums}",
     "Can you sort {nums} from small to big?", "List the numbers {nums} in ascending order.",
     "Rearrange {nums} so that they go up."],
    lambda rng: {"nums": _nums(rng, 3, 7)}, lambda d: _csv(sorted(d["nums"])),
    _v_ints(lambda d: _csv(sorted(d["nums"]))),
    lambda d: _pick(d, "In ascending order, {x} becomes {y}.",
                    "The numbers {x} sorted from smallest to largest are {y}.").format(
        x=_csv(d["nums"]), y=_csv(sorted(d["nums"]))),
    _sort_wrong(False),
))

_register(Family(
    "sort_descending", "list",
    ["Sort these numbers in descending order: {nums}", "Put {nums} in order from largest to smallest.",
     "Arrange the following numbers in decreasing order: {nums}",
     "Order these from highest to lowest: {nums}", "Sort descending: {nums}",
     "Can you sort {nums} from big to small?", "List the numbers {nums} in descending order.",
     "Rearrange {nums} so that they go down."],
    lambda rng: {"nums": _nums(rng, 3, 7)}, lambda d: _csv(sorted(d["nums"], reverse=True)),
    _v_ints(lambda d: _csv(sorted(d["nums"], reverse=True))),
    lambda d: _pick(d, "In descending order, {x} becomes {y}.",
                    "The numbers {x} sorted from largest to smallest are {y}.").format(
        x=_csv(d["nums"]), y=_csv(sorted(d["nums"], reverse=True))),
    _sort_wrong(True),
))


def _items(rng: random.Random, lo: int = 3, hi: int = 6) -> Data:
    return {"items": rng.sample(NOUNS, rng.randint(lo, hi))}


_register(Family(
    "first_item", "list",
    ["What is the first item in this list: {items}?", "Give the first element of {items}.",
     "Which item comes first in the list {items}?", "List: {items}. What is the first entry?",
     "Name the item at the start of this list: {items}", "Return the first word of the list {items}.",
     "Tell me the opening item of: {items}", "Here is a list: {items}. Which item is first?"],
    _items, lambda d: d["items"][0], _v_text(lambda d: d["items"][0]),
    lambda d: _pick(d, "The first item of the list {l} is {x}.", "In the list {l}, {x} comes first.",
                    "{x} is the first element of {l}.").format(l=_csv(d["items"]), x=d["items"][0]),
    lambda d, rng: [d["items"][1], d["items"][-1]],
))

_register(Family(
    "last_item", "list",
    ["What is the last item in this list: {items}?", "Give the last element of {items}.",
     "Which item comes last in the list {items}?", "List: {items}. What is the final entry?",
     "Name the item at the end of this list: {items}", "Return the last word of the list {items}.",
     "Tell me the closing item of: {items}", "Here is a list: {items}. Which item is last?"],
    _items, lambda d: d["items"][-1], _v_text(lambda d: d["items"][-1]),
    lambda d: _pick(d, "The last item of the list {l} is {x}.", "In the list {l}, {x} comes last.",
                    "{x} is the final element of {l}.").format(l=_csv(d["items"]), x=d["items"][-1]),
    lambda d, rng: [d["items"][-2], d["items"][0]],
))

_register(Family(
    "count_items", "list",
    ["How many items are in this list: {items}?", "Count the items in {items}.",
     "What is the number of elements in {items}?", "List: {items}. How many entries does it have?",
     "Tell me how many things are listed here: {items}", "How long is the list {items}?",
     "Give the count of items in: {items}", "Here is a list: {items}. How many items is that?"],
    lambda rng: {"items": [rng.choice(NOUNS) for _ in range(rng.randint(2, 9))]},
    lambda d: str(len(d["items"])), _v_int(lambda d: str(len(d["items"]))),
    lambda d: _pick(d, "The list {l} has {n} items.", "There are {n} items in {l}.",
                    "Counting {l} gives {n} items.").format(l=_csv(d["items"]), n=len(d["items"])),
    lambda d, rng: [str(len(d["items"]) + rng.choice((1, -1))), str(len(set(d["items"])))],
))

_register(Family(
    "reverse_list", "list",
    ["Reverse this list: {items}", "Give the items of {items} in reverse order.",
     "Write the list {items} backwards.", "List: {items}. Reverse it.",
     "Return {items} from last to first.", "What is the list {items} reversed?",
     "Flip the order of the list {items}.", "Put these items in the opposite order: {items}"],
    _items, lambda d: _csv(d["items"][::-1]), _v_words(lambda d: _csv(d["items"][::-1])),
    lambda d: _pick(d, "The list {l} reversed is {r}.", "Backwards, {l} reads {r}.",
                    "From last to first, {l} is {r}.").format(l=_csv(d["items"]), r=_csv(d["items"][::-1])),
    lambda d, rng: [_csv(d["items"]), _csv(d["items"][-2::-1] + d["items"][-1:]),
                    _csv(d["items"][:0:-1])],
))

# --- String operations on words -----------------------------------------------------------------


def _phrase(rng: random.Random, lo: int = 2, hi: int = 5) -> Data:
    return {"words": rng.sample(WORDS, rng.randint(lo, hi))}


def _shouty(rng: random.Random) -> Data:
    """Words in upper or title case, at least one of them upper case, for the lower-case family."""
    while True:
        words = [w.upper() if rng.random() < 0.6 else w.capitalize() for w in _phrase(rng)["words"]]
        if any(w.isupper() and len(w) > 1 for w in words):
            return {"words": words}


def _text(d: Data) -> str:
    return " ".join(d["words"])


_register(Family(
    "upper_case", "string",
    ["Write this in upper case: {text}", "Convert to capital letters: {text}",
     "Make this all caps: {text}", "Rewrite \"{text}\" in uppercase.",
     "Change every letter of \"{text}\" to upper case.", "Uppercase the following: {text}",
     "Put {text} in capital letters.", "Shout this text in capitals: {text}"],
    _phrase, lambda d: _text(d).upper(), _v_text(lambda d: _text(d).upper(), case=True),
    lambda d: _pick(d, "\"{t}\" in upper case is \"{u}\".", "In capital letters, \"{t}\" is written \"{u}\".",
                    "The uppercase form of \"{t}\" is \"{u}\".").format(t=_text(d), u=_text(d).upper()),
    lambda d, rng: [_text(d), _text(d).title(), " ".join([d["words"][0].upper()] + d["words"][1:])],
))

_register(Family(
    "lower_case", "string",
    ["Write this in lower case: {text}", "Convert to small letters: {text}",
     "Make this all lowercase: {text}", "Rewrite \"{text}\" in lowercase.",
     "Change every letter of \"{text}\" to lower case.", "Lowercase the following: {text}",
     "Put {text} in small letters.", "Turn off the capitals in this text: {text}"],
    _shouty, lambda d: _text(d).lower(), _v_text(lambda d: _text(d).lower(), case=True),
    lambda d: _pick(d, "\"{t}\" in lower case is \"{u}\".", "In small letters, \"{t}\" is written \"{u}\".",
                    "The lowercase form of \"{t}\" is \"{u}\".").format(t=_text(d), u=_text(d).lower()),
    lambda d, rng: [_text(d), _text(d).lower().title(), _text(d).upper()],
))

_register(Family(
    "reverse_words", "string",
    ["Reverse the order of the words in: {text}", "Write these words backwards, last word first: {text}",
     "Put the words of \"{text}\" in reverse order.", "Flip the word order of this phrase: {text}",
     "Say \"{text}\" with the words in the opposite order.", "Reverse the word order: {text}",
     "Rewrite {text} starting from the last word.", "What is \"{text}\" with its words reversed?"],
    lambda rng: _phrase(rng, 3, 6), lambda d: " ".join(d["words"][::-1]),
    _v_text(lambda d: " ".join(d["words"][::-1])),
    lambda d: _pick(d, "\"{t}\" with the words in reverse order is \"{r}\".",
                    "Read backwards word by word, \"{t}\" becomes \"{r}\".",
                    "Reversing the words of \"{t}\" gives \"{r}\".").format(
        t=_text(d), r=" ".join(d["words"][::-1])),
    # Reversing the letters instead of the words is the typical confusion.
    lambda d, rng: [_text(d), _text(d)[::-1], " ".join(d["words"][-2::-1] + d["words"][-1:])],
))


def _letters_verify(d: Data, r: str) -> bool:
    got = re.sub(r"[\s,;\-]+", "", clean(r)).lower()
    return bool(got) and got == "".join(w[0] for w in d["words"]).lower()


_register(Family(
    "first_letters", "string",
    ["What is the first letter of each word in: {text}?",
     "Give the initial letter of every word in \"{text}\".",
     "List the first letters of the words in {text}.", "Take the first letter of each word: {text}",
     "Write down the starting letter of each word of \"{text}\".",
     "Which letters do the words in \"{text}\" begin with?",
     "For each word in {text}, give its first letter.", "Initials of the words in \"{text}\", please."],
    lambda rng: _phrase(rng, 3, 6), lambda d: _csv(w[0] for w in d["words"]), _letters_verify,
    lambda d: _pick(d, "The first letters of the words in \"{t}\" are {l}.",
                    "The words of \"{t}\" start with {a}.").format(
        t=_text(d), l=_csv(w[0] for w in d["words"]), a=_and([w[0] for w in d["words"]])),
    lambda d, rng: [_csv(w[-1] for w in d["words"]), _csv(w[0] for w in d["words"][:-1]),
                    _csv(w[:2] for w in d["words"])],
))

_register(Family(
    "word_count", "string",
    ["How many words are in this sentence: {text}?", "Count the words in \"{text}\".",
     "What is the word count of \"{text}\"?", "Tell me how many words this has: {text}",
     "Give the number of words in: {text}", "How long is \"{text}\" in words?",
     "Number of words in {text}?", "Count how many words appear here: {text}"],
    lambda rng: {"words": [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]},
    lambda d: str(len(d["words"])), _v_int(lambda d: str(len(d["words"]))),
    lambda d: _pick(d, "\"{t}\" has {n} words.", "The sentence \"{t}\" is {n} words long.",
                    "There are {n} words in \"{t}\".").format(t=_text(d), n=len(d["words"])),
    lambda d, rng: [str(len(d["words"]) + rng.choice((1, -1))), str(len(_text(d).replace(" ", "")))],
))


def _longest_sample(rng: random.Random) -> Data:
    while True:  # a unique longest word, so the answer is not a matter of tie-breaking
        words = rng.sample(WORDS, rng.randint(3, 6))
        lengths = sorted((len(w) for w in words), reverse=True)
        if lengths[0] > lengths[1]:
            return {"words": words}


def _longest(d: Data) -> str:
    return max(d["words"], key=len)


_register(Family(
    "longest_word", "string",
    ["What is the longest word in \"{text}\"?", "Find the longest word in this phrase: {text}",
     "Which word has the most letters: {words}?", "Give the longest of these words: {words}",
     "Out of {words}, which word is longest?", "Name the word with the most letters in \"{text}\".",
     "Words: {words}. Which is the longest?", "Return the longest word from: {text}"],
    _longest_sample, _longest, _v_text(_longest),
    lambda d: _pick(d, "The longest word in \"{t}\" is {w}.", "Of {a}, the longest word is {w}.",
                    "{w} has the most letters among {a}.").format(t=_text(d), a=_and(d["words"]),
                                                                   w=_longest(d)),
    lambda d, rng: [min(d["words"], key=len), sorted(d["words"], key=len)[-2], d["words"][0]],
))

# --- Extraction ---------------------------------------------------------------------------------

_NUMBER_FRAMES = ("{name} bought {n0} {p0} and {n1} {p1} at the market.",
                  "There were {n0} {p0} in room {n1} this morning.",
                  "On day {n0}, {name} saw {n1} {p0} and {n2} {p1}.",
                  "The shop sold {n0} {p0} for {n1} coins each.",
                  "{name} is {n0} years old and owns {n1} {p0}.",
                  "Bus {n0} carried {n1} people and {n2} {p0} into town.")


def _numbers_sample(rng: random.Random) -> Data:
    frame = rng.choice(_NUMBER_FRAMES)
    n = frame.count("{n")
    nums = [rng.randint(1, 999) for _ in range(n)]
    p0, p1 = (w + "s" for w in rng.sample(COUNTABLE, 2))
    sentence = frame.format(name=rng.choice(NAMES), p0=p0, p1=p1, **{f"n{i}": x for i, x in enumerate(nums)})
    return {"sentence": sentence, "numbers": nums}


_register(Family(
    "extract_numbers", "extraction",
    ["List the numbers that appear in this sentence: {sentence}", "Extract all numbers from: \"{sentence}\"",
     "Which numbers are mentioned in \"{sentence}\"?", "Pull out the numbers in this text: {sentence}",
     "Give every number found in: {sentence}", "Find the numbers in the sentence \"{sentence}\".",
     "Sentence: {sentence} What numbers does it contain?",
     "Write down the numbers from \"{sentence}\" in order."],
    _numbers_sample, lambda d: _csv(d["numbers"]), _v_ints(lambda d: _csv(d["numbers"])),
    lambda d: _pick(d, "The numbers in \"{s}\" are {a}.", "\"{s}\" mentions the numbers {a}.").format(
        s=d["sentence"], a=_and(d["numbers"])),
    lambda d, rng: [_csv(d["numbers"][:-1]), _csv(d["numbers"][::-1]), str(sum(d["numbers"]))],
))

_EMAIL_FRAMES = ("Send the report to {email} before {day}.", "You can reach {name} at {email} any time.",
                 "My email is {email}, so write soon.", "Contact {email} for the {noun} tickets.",
                 "Questions go to {email} or to the front desk.",
                 "{name} asked us to copy {email} on every message.")
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()


def _email_sample(rng: random.Random) -> Data:
    name = rng.choice(NAMES)
    user = name.lower() + rng.choice(["", ".", "_"]) + rng.choice(["", str(rng.randint(1, 99)),
                                                                   rng.choice(NOUNS)])
    email = f"{user.rstrip('._')}@{rng.choice(['mail', 'post', 'inbox', 'example', 'letters', 'home'])}." \
            f"{rng.choice(['com', 'org', 'net', 'io'])}"
    sentence = rng.choice(_EMAIL_FRAMES).format(email=email, name=rng.choice(NAMES),
                                                day=rng.choice(_DAYS), noun=rng.choice(NOUNS))
    return {"sentence": sentence, "email": email}


_register(Family(
    "extract_email", "extraction",
    ["What is the email address in this sentence: {sentence}", "Extract the email address from: \"{sentence}\"",
     "Find the email in \"{sentence}\".", "Which email address is mentioned here: {sentence}",
     "Pull out the email address: {sentence}", "Give the email contained in the text \"{sentence}\".",
     "Text: {sentence} What email address does it contain?",
     "Copy the email address out of this sentence: {sentence}"],
    _email_sample, lambda d: d["email"],
    lambda d, r: clean(r).strip("<>").lower() == d["email"],
    lambda d: _pick(d, "The email address in \"{s}\" is {e}.", "\"{s}\" contains the email address {e}.").format(
        s=d["sentence"], e=d["email"]),
    lambda d, rng: [d["email"].split("@")[0], d["email"].rsplit(".", 1)[0], "@" + d["email"].split("@")[1]],
))

_DATE_FRAMES = ("The meeting is on {date} in the small hall.", "{name} was born on {date} in a quiet town.",
                "The shop opens again on {date}.", "We moved house on {date}, just before the festival.",
                "The letter from {name} arrived on {date}.", "Tickets for the concert on {date} are sold out.")
_MONTH_NUMBER = {m.lower(): i for i, m in enumerate(MONTHS, 1)} | {m[:3].lower(): i for i, m in enumerate(MONTHS, 1)}


def _date_sample(rng: random.Random) -> Data:
    day, month, year = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1990, 2030)
    date = f"{day} {MONTHS[month - 1]} {year}"
    return {"sentence": rng.choice(_DATE_FRAMES).format(date=date, name=rng.choice(NAMES)),
            "day": day, "month": month, "year": year}


def _date_of(text: str) -> tuple[int, int, int] | None:
    """(day, month, year) from "12 March 2024", "March 12, 2024" or "2024-03-12"; None otherwise."""
    s = " ".join(clean(text).lower().replace(",", " ").split())
    if m := re.fullmatch(r"(\d{1,2})(?:st|nd|rd|th)? (?:of )?([a-z]+) (\d{4})", s):
        d, mon, y = m.groups()
    elif m := re.fullmatch(r"([a-z]+) (\d{1,2})(?:st|nd|rd|th)? (\d{4})", s):
        mon, d, y = m.groups()
    elif m := re.fullmatch(r"(\d{4})-(\d{1,2})-(\d{1,2})", s):
        return int(m[3]), int(m[2]), int(m[1])
    else:
        return None
    return (int(d), _MONTH_NUMBER[mon], int(y)) if mon in _MONTH_NUMBER else None


def _date_text(d: Data) -> str:
    return f"{d['day']} {MONTHS[d['month'] - 1]} {d['year']}"


_register(Family(
    "extract_date", "extraction",
    ["What date is mentioned in this sentence: {sentence}", "Extract the date from: \"{sentence}\"",
     "Find the date in \"{sentence}\".", "Which date appears here: {sentence}", "Pull out the date: {sentence}",
     "Give the date contained in the text \"{sentence}\".", "Text: {sentence} What date does it mention?",
     "On what date does this happen? {sentence}"],
    _date_sample, _date_text, lambda d, r: _date_of(r) == (d["day"], d["month"], d["year"]),
    lambda d: _pick(d, "The date in \"{s}\" is {t}.", "\"{s}\" mentions the date {t}.").format(
        s=d["sentence"], t=_date_text(d)),
    lambda d, rng: [f"{d['day'] % 28 + 1} {MONTHS[d['month'] - 1]} {d['year']}",
                    f"{d['day']} {MONTHS[d['month'] - 1]}", f"{d['day']} {MONTHS[d['month'] - 1]} {d['year'] + 1}"],
))

# --- Rule-based classification ------------------------------------------------------------------

_SENTIMENT_FRAMES = ("The {noun} was {a1}.", "What {art} {a1} {noun}!", "I think the {noun} is {a1} and {a2}.",
                     "Our trip to the {noun} shop felt {a1}.", "That was {art} {a1} day with the {noun}.",
                     "The {noun} looked {a1} today.", "Honestly, the new {noun} is {a1}.")


def _sentiment_sample(rng: random.Random) -> Data:
    lexicon = POSITIVE if rng.random() < 0.5 else NEGATIVE
    a1, a2 = rng.sample(lexicon, 2)
    return {"sentence": rng.choice(_SENTIMENT_FRAMES).format(noun=rng.choice(NOUNS), a1=a1, a2=a2,
                                                             art=_article(a1))}


def _sentiment(d: Data) -> str:
    """The label by lexicon lookup: more positive than negative words means positive."""
    words = re.findall(r"[a-z]+", d["sentence"].lower())
    score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
    return "positive" if score > 0 else "negative"


def _cue(d: Data) -> str:
    return next(w for w in re.findall(r"[a-z]+", d["sentence"].lower()) if w in POSITIVE + NEGATIVE)


_register(Family(
    "sentiment", "classification",
    ["Is this sentence positive or negative? {sentence}",
     "Classify the sentiment of \"{sentence}\" as positive or negative.", "What is the sentiment of: {sentence}",
     "Positive or negative: \"{sentence}\"", "Tell me whether this review is positive or negative: {sentence}",
     "Decide if the feeling in \"{sentence}\" is positive or negative.",
     "Label this text as positive or negative: {sentence}",
     "Sentence: {sentence} Is the tone positive or negative?"],
    _sentiment_sample, _sentiment, _v_text(_sentiment),
    lambda d: _pick(d, "The sentence \"{s}\" is {l}.", "\"{s}\" expresses a {l} feeling.",
                    "\"{w}\" is a {l} word, so \"{s}\" is {l}.").format(s=d["sentence"], l=_sentiment(d), w=_cue(d)),
    lambda d, rng: ["negative" if _sentiment(d) == "positive" else "positive", "neutral"],
))

# --- Formatting ---------------------------------------------------------------------------------

_KEYS = ("result", "answer", "value", "total", "sum")


def _json_solve(d: Data) -> str:
    return json.dumps({d["key"]: d["a"] + d["b"]})


def _json_verify(d: Data, r: str) -> bool:
    s = re.sub(r"^```(?:json)?\s*|\s*```$", "", r.strip()).strip().rstrip(".")
    try:
        obj = json.loads(s)
    except ValueError:
        return False
    if not isinstance(obj, dict) or list(obj) != [d["key"]]:
        return False
    v = obj[d["key"]]
    return (type(v) is int and v == d["a"] + d["b"]) or (isinstance(v, str) and v.strip() == str(d["a"] + d["b"]))


_register(Family(
    "json_answer", "formatting",
    ["What is {a} plus {b}? Reply in JSON with the key \"{key}\".",
     "Add {a} and {b} and return a JSON object with the key \"{key}\".",
     "Give the sum of {a} and {b} as JSON under the key \"{key}\".",
     "Compute {a} + {b}. Format the answer as JSON: {{\"{key}\": ...}}",
     "Return JSON with a single key \"{key}\" holding {a} plus {b}.",
     "Answer in JSON using the key \"{key}\": what is {a} + {b}?",
     "Calculate the total of {a} and {b}; respond with a JSON object keyed \"{key}\".",
     "Put the sum of {a} and {b} in JSON, key \"{key}\"."],
    lambda rng: {"a": rng.randint(0, 99), "b": rng.randint(0, 99), "key": rng.choice(_KEYS)},
    _json_solve, _json_verify,
    lambda d: _pick(d, "The sum of {a} and {b} as JSON with the key \"{key}\" is {j}.",
                    "In JSON under the key \"{key}\", {a} plus {b} is written {j}.").format(j=_json_solve(d), **d),
    # A bare number (format ignored), the wrong key, or the right format with an arithmetic slip.
    lambda d, rng: [str(d["a"] + d["b"]), json.dumps({rng.choice([k for k in _KEYS if k != d["key"]]): d["a"] + d["b"]}),
                    json.dumps({d["key"]: d["a"] + d["b"] + 1})],
))


def _bullets_verify(d: Data, r: str) -> bool:
    lines = [ln.strip() for ln in r.strip().splitlines() if ln.strip()]
    got = [m[1] if (m := re.fullmatch(r"[-*\u2022]\s+(.+)", ln)) else None for ln in lines]
    return None not in got and [clean(g).lower() for g in got] == [w.lower() for w in d["items"]]


_register(Family(
    "bullet_list", "formatting",
    ["Make a bulleted list of these items: {items}", "Turn {items} into a bullet list.",
     "Write each of these on its own bullet: {items}", "Format as a bulleted list: {items}",
     "Put the items {items} in a list with bullet points.", "Give me {items} as bullet points.",
     "Rewrite this as a bulleted list, one item per line: {items}",
     "List these with a dash in front of each: {items}"],
    lambda rng: _items(rng, 2, 5), lambda d: "\n".join(f"- {w}" for w in d["items"]), _bullets_verify,
    lambda d: _pick(d, "As a bulleted list, {a} is written one per line as {b}.",
                    "A bulleted list of {a} has the lines {b}.").format(
        a=_and(d["items"]), b=_and(f'"- {w}"' for w in d["items"])),
    lambda d, rng: [_csv(d["items"]), "\n".join(f"- {w}" for w in d["items"][:-1]),
                    "\n".join(f"{i}. {w}" for i, w in enumerate(d["items"], 1))],
))

_register(Family(
    "answer_upper", "formatting",
    ["What is the first item in {items}? Answer in upper case.",
     "Give the first element of the list {items}, written in capital letters.",
     "Name the first item of {items} in all caps.", "List: {items}. Reply with the first item in uppercase.",
     "Which item comes first in {items}? Use capital letters only.",
     "Return the first entry of {items} in upper case.", "Tell me the opening item of {items}, in capitals.",
     "Using only uppercase letters, what is the first item of {items}?"],
    _items, lambda d: d["items"][0].upper(), _v_text(lambda d: d["items"][0].upper(), case=True),
    lambda d: _pick(d, "The first item of {l} in upper case is {x}.",
                    "Written in capitals, the first element of {l} is {x}.").format(
        l=_csv(d["items"]), x=d["items"][0].upper()),
    lambda d, rng: [d["items"][0], d["items"][0].capitalize(), d["items"][1].upper()],
))

# --- Counting -----------------------------------------------------------------------------------


def _count_word_sample(rng: random.Random) -> Data:
    pool = rng.sample(NOUNS, 3)
    words = [rng.choice(pool) for _ in range(rng.randint(4, 10))]
    # Now and then ask about a word that is absent, so "0" is a skill too.
    target = rng.choice(NOUNS) if rng.random() < 0.15 else rng.choice(words)
    return {"words": words, "target": target}


def _times(n: int) -> str:
    return f"{n} time" if n == 1 else f"{n} times"


_register(Family(
    "count_word", "counting",
    ["How many times does the word \"{target}\" appear in: {text}?", "Count the occurrences of \"{target}\" in \"{text}\".",
     "In \"{text}\", how often does \"{target}\" occur?", "Tell me how many times \"{target}\" is in this text: {text}",
     "Text: {text}. How many times is the word \"{target}\" used?",
     "Count how often the word \"{target}\" shows up in: {text}",
     "What is the number of times \"{target}\" appears in \"{text}\"?", "Give the count of the word \"{target}\" in {text}."],
    _count_word_sample, lambda d: str(d["words"].count(d["target"])),
    _v_int(lambda d: str(d["words"].count(d["target"]))),
    lambda d: _pick(d, "The word \"{w}\" appears {n} in \"{t}\".", "In \"{t}\", \"{w}\" occurs {n}.").format(
        w=d["target"], t=_text(d), n=_times(d["words"].count(d["target"]))),
    lambda d, rng: [str(d["words"].count(d["target"]) + 1), str(d["words"].count(d["target"]) - 1),
                    str(len(d["words"]))],
))


def _count_letter_sample(rng: random.Random) -> Data:
    word = rng.choice(SPELLING)
    absent = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word]
    return {"word": word, "letter": rng.choice(absent) if rng.random() < 0.15 else rng.choice(word)}


_register(Family(
    "count_letter", "counting",
    ["How many times does the letter \"{letter}\" appear in the word \"{word}\"?", "Count the letter {letter} in {word}.",
     "How many \"{letter}\"s are in \"{word}\"?", "In the word {word}, how often does the letter {letter} occur?",
     "Tell me the number of times \"{letter}\" shows up in \"{word}\".",
     "Word: {word}. How many times does it contain the letter {letter}?",
     "Count how often \"{letter}\" occurs in the word \"{word}\".", "What is the count of the letter \"{letter}\" in {word}?"],
    _count_letter_sample, lambda d: str(d["word"].count(d["letter"])),
    _v_int(lambda d: str(d["word"].count(d["letter"]))),
    lambda d: _pick(d, "The letter \"{c}\" appears {n} in the word \"{w}\".", "\"{w}\" contains the letter \"{c}\" {n}.",
                    "Counting the letter \"{c}\" in \"{w}\" gives {k}.").format(
        c=d["letter"], w=d["word"], n=_times(d["word"].count(d["letter"])), k=d["word"].count(d["letter"])),
    lambda d, rng: [str(d["word"].count(d["letter"]) + 1), str(d["word"].count(d["letter"]) - 1), str(len(d["word"]))],
))

# --- Two-step compositions ----------------------------------------------------------------------


def _two_largest(d: Data) -> str:
    return str(sum(sorted(d["nums"])[-2:]))


_register(Family(
    "sum_two_largest", "composition",
    ["What is the sum of the two largest numbers in {nums}?", "Add the two biggest numbers from this list: {nums}",
     "Find the two largest values in {nums} and add them.", "Numbers: {nums}. What do the two highest add up to?",
     "Take the two greatest numbers of {nums} and give their sum.", "Sum the largest two numbers among {nums}.",
     "From {nums}, pick the two largest and add them together.",
     "Give the total of the two largest numbers in the list {nums}."],
    lambda rng: {"nums": _nums(rng, 3, 5, top=50)}, _two_largest, _v_int(_two_largest),
    lambda d: _pick(d, "The two largest of {l} are {x} and {y}, which add up to {s}.",
                    "The sum of the two largest numbers in {l} is {s}.").format(
        l=_and(d["nums"]), x=sorted(d["nums"])[-1], y=sorted(d["nums"])[-2], s=_two_largest(d)),
    # Largest plus smallest, everything summed, the largest alone, or the first two taken unsorted.
    lambda d, rng: [str(max(d["nums"]) + min(d["nums"])), str(sum(d["nums"])), str(max(d["nums"])),
                    str(sum(d["nums"][:2]))],
))


def _first_k(d: Data) -> str:
    return _csv(sorted(d["nums"])[:d["k"]])


def _first_k_fields(d: Data) -> dict:
    return {"nums": _csv(d["nums"]), "k": _NUMBER_WORDS[d["k"]]}


_register(Family(
    "sort_then_first", "composition",
    ["Sort {nums} in ascending order, then give the first {k}.",
     "Put these numbers in increasing order and return the first {k}: {nums}",
     "After sorting {nums} from smallest to largest, what are the first {k} numbers?",
     "Order {nums} from low to high and list the first {k}.",
     "Sort the list {nums} ascending and keep only the first {k} items.",
     "Arrange {nums} in ascending order; give me the first {k}.",
     "Numbers: {nums}. Sort them ascending and take the first {k}.",
     "First sort {nums} from small to big, then write the first {k} numbers."],
    lambda rng: {"nums": _nums(rng, 4, 6), "k": rng.choice((2, 3))}, _first_k, _v_ints(_first_k),
    lambda d: _pick(d, "Sorting {l} in ascending order and taking the first {k} gives {a}.",
                    "The first {k} of {l} after sorting from smallest to largest are {a}.").format(
        a=_first_k(d), **_first_k_fields(d)).replace("The first", "The lowest", 0),
    lambda d, rng: [_csv(d["nums"][:d["k"]]), _csv(sorted(d["nums"], reverse=True)[:d["k"]]),
                    _csv(sorted(d["nums"])[:d["k"] + 1]), _csv(sorted(d["nums"])[-d["k"]:])],
    fields=_first_k_fields,
))

# --- Ambiguous or impossible requests -----------------------------------------------------------

NEED_INFO = "I need more information:"
CANNOT = "I cannot do that:"
_LIST_VERBS = ("sort", "add up", "find the largest of", "find the smallest of", "reverse", "count")
_TOPICS = ("numbers", "scores", "prices", "ages", "temperatures", "values", "test marks", "heights",
           "distances", "weights")
_WORD_VERBS = ("capitalise", "reverse the letters of", "count the letters in", "spell out",
               "find the first letter of")
_WORD_NOUNS = ("word", "name", "city name", "secret word")
_EMPTY_VERBS = ("give the first item of", "give the last item of", "find the largest number in",
                "find the smallest number in")
_EMPTY_OBJS = ("the empty list []", "this list: []", "the list [] with nothing in it")


def _clarify_sample(rng: random.Random) -> Data:
    case = rng.choices(("missing_list", "missing_word", "divide_zero", "empty_list"), (7, 4, 6, 3))[0]
    if case == "missing_list":
        return {"case": case, "verb": rng.choice(_LIST_VERBS), "det": rng.choice(("the", "my", "these", "our", "all the")),
                "topic": rng.choice(_TOPICS)}
    if case == "missing_word":
        return {"case": case, "verb": rng.choice(_WORD_VERBS), "det": rng.choice(("the", "my", "this", "that")),
                "topic": rng.choice(_WORD_NOUNS)}
    if case == "divide_zero":
        return {"case": case, "verb": "divide", "a": rng.randint(1, 999), "zero": rng.choice(("0", "zero"))}
    return {"case": case, "verb": rng.choice(_EMPTY_VERBS), "obj": rng.choice(_EMPTY_OBJS)}


def _clarify_fields(d: Data) -> dict:
    obj = {"divide_zero": lambda: f"{d.get('a')} by {d.get('zero')}",
           "empty_list": lambda: d.get("obj")}.get(d["case"], lambda: f"{d.get('det')} {d.get('topic')}")()
    return {"verb": d["verb"], "Verb": d["verb"][0].upper() + d["verb"][1:], "obj": obj}


def _clarify_solve(d: Data) -> str:
    if d["case"] == "divide_zero":
        return f"{CANNOT} division by zero is undefined."
    if d["case"] == "empty_list":
        return f"{CANNOT} the list is empty."
    return f"{NEED_INFO} please give the {d['topic']}."


def _clarify_verify(d: Data, r: str) -> bool:
    # The style is the skill: the right opening, whatever short reason follows it.
    prefix = _clarify_solve(d).split(":")[0].lower()
    return clean(r).lower().startswith(prefix)


def _clarify_state(d: Data) -> str:
    f = _clarify_fields(d)
    if d["case"] == "divide_zero":
        return f"{d['a']} divided by zero is undefined, so nobody can work it out."
    if d["case"] == "empty_list":
        return f"It is impossible to {f['verb']} an empty list, because it has no items."
    return (f"Someone who wants to {f['verb']} {f['obj']} without giving them has left something out, "
            f"and the reply is \"{_clarify_solve(d)}\"")


def _clarify_wrong(d: Data, rng: random.Random) -> list[str]:
    if d["case"] == "divide_zero":
        return ["0", str(d["a"]), f"{NEED_INFO} please give the numbers."]
    if d["case"] == "empty_list":
        return ["0", rng.choice(NOUNS), f"{NEED_INFO} please give the list."]
    made_up = rng.choice(NOUNS).upper() if d["case"] == "missing_word" else "3, 7, 12"
    return [made_up, f"{CANNOT} that is not possible.", "0"]


_register(Family(
    "clarify", "clarify",
    ["{Verb} {obj}.", "Please {verb} {obj}.", "Can you {verb} {obj}?", "I need you to {verb} {obj}.",
     "Could you {verb} {obj} for me?", "Quick task: {verb} {obj}.", "Your job is to {verb} {obj}.",
     "Go ahead and {verb} {obj}."],
    _clarify_sample, _clarify_solve, _clarify_verify, _clarify_state, _clarify_wrong, fields=_clarify_fields,
))

CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(f.category for f in FAMILIES.values()))
