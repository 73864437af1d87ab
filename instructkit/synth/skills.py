"""A procedural skills curriculum: verifiable instruction-following tasks sized for tiny CPU models.

Thirty-odd task families (arithmetic, comparison, list and string operations, extraction, rule-based
classification, formatting, counting, two-step compositions, and requests that must be declined or
clarified) each come with eight instruction phrasings, a computed answer, a verifier, a plain-text
statement of the same fact and a realistic wrong answer. From them :func:`write_skills` builds:

* ``train.jsonl`` / ``validation.jsonl``: seen families, seen phrasings, disjoint instances;
* ``heldout_phrasing.jsonl``: seen families asked in two phrasings per family that tuning never sees;
* ``heldout_family.jsonl``: whole families that tuning never sees (their facts are in the corpus,
  so a model can only answer them by turning knowledge into instruction following);
* ``corpus.txt``: one plain statement per line for every family, with no instruction format;
* ``preference.jsonl`` / ``preference_validation.jsonl``: chosen (verified) vs rejected
  (realistically wrong) replies on train / validation instances;
* ``manifest.json``: seed, counts, held-out families and phrasings.

No (family, inputs) pair occurs in two splits, and the corpus never states an evaluation instance,
so scores on the evaluation splits measure generalisation rather than recall. Everything is
deterministic for a seed: each (split, family) pair draws from its own string-seeded generator,
which also keeps the evaluation splits identical when only ``n_train`` changes.

The family definitions live in :mod:`instructkit.synth.skills_families`, which registers them into
:data:`FAMILIES` when this module is imported.
"""

from __future__ import annotations

import functools
import json
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Data = dict
SPLITS = ("train", "validation", "heldout_phrasing", "heldout_family")
#: One family from each of four categories, each with a seen sibling skill (max_list, first_item,
#: upper_case, count_word) and stated in the corpus, so that it is learnable from knowledge.
DEFAULT_HELDOUT_FAMILIES = ("min_list", "last_item", "lower_case", "count_letter")
N_HELDOUT_PHRASINGS = 2
# Default sizes, the demo's: `instructkit synth skills` and `instructkit demo` write the same files.
N_TRAIN = 10000
N_CORPUS = 30000
# Default sizes per family, so the defaults scale with the number of families.
VAL_PER_FAMILY, HELDOUT_PHRASING_PER_FAMILY, HELDOUT_FAMILY_PER_FAMILY = 20, 20, 40
_MAX_TRIES = 2000  # consecutive duplicate draws before a family is declared exhausted


def canonical_key(family: str, data: Data) -> str:
    """A string that is equal for two instances exactly when their family and inputs are equal."""
    return family + "|" + json.dumps(data, sort_keys=True, separators=(",", ":"))


# --- Normalisation and answer parsing -----------------------------------------------------------

# Tiny models often wrap a bare answer in a stock preamble; accepting it keeps the check about the
# skill, not about one exact surface form.
_PREAMBLE = re.compile(r"^(?:the\s+)?(?:final\s+)?(?:answer|result)\s*(?:is\b\s*:?|:)\s*", re.I)


def clean(text: str) -> str:
    """Normalise a reply for comparison.

    Collapses whitespace and drops a leading "The answer is"/"Answer:", a trailing period, and quotes
    or backticks around the whole reply. Case is left alone: families where case matters (upper
    case, lower case) compare it, the others lower-case both sides.

    Args:
        text: A model's reply.

    Returns:
        The normalised reply ("" for an empty one).
    """
    s = " ".join(text.split())
    for _ in range(2):  # a period or a preamble may sit outside the quotes or inside them
        s = _PREAMBLE.sub("", s.strip("`").strip())
        if s.endswith("."):
            s = s[:-1].rstrip()
        if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
            s = s[1:-1].strip()
    return s


def parse_int(text: str) -> int | None:
    """The integer a reply consists of, or None when it is anything else."""
    s = clean(text)
    return int(s) if re.fullmatch(r"[-+]?\d+", s) else None


def parse_ints(text: str) -> list[int] | None:
    """Integers written with commas, spaces, "and" or brackets; None if anything else is there."""
    s = re.sub(r"\band\b", ",", clean(text).strip("[]() "))
    toks = [t for t in re.split(r"[,;\s]+", s) if t]
    if not toks or not all(re.fullmatch(r"[-+]?\d+", t) for t in toks):
        return None
    return [int(t) for t in toks]


def parse_words(text: str) -> list[str]:
    """Lower-cased items of a comma-separated (or else space-separated) reply; [] for an empty one."""
    s = clean(text).strip("[]() ")
    parts = re.split(r"\s*,\s*", s) if "," in s else s.split()
    return [p.strip("\"'").lower() for p in parts if p.strip("\"'")]


def verify_int(solve: Callable[[Data], str]) -> Callable[[Data, str], bool]:
    """A verifier for answers that are one integer."""
    return lambda d, r: parse_int(r) == int(solve(d))


def verify_ints(solve: Callable[[Data], str]) -> Callable[[Data, str], bool]:
    """A verifier for an ordered list of integers, whatever the separators."""
    return lambda d, r: parse_ints(r) == parse_ints(solve(d))


def verify_words(solve: Callable[[Data], str]) -> Callable[[Data, str], bool]:
    """A verifier for an ordered list of words, ignoring case and separators."""
    return lambda d, r: bool(parse_words(r)) and parse_words(r) == parse_words(solve(d))


def verify_text(solve: Callable[[Data], str], case: bool = False) -> Callable[[Data, str], bool]:
    """A verifier comparing the normalised reply with the answer; ``case`` makes case count."""
    def verify(d: Data, r: str) -> bool:
        got, want = clean(r), solve(d)
        return bool(got) and (got == want if case else got.lower() == want.lower())
    return verify


#: Named verifiers built from a family's ``solve``: ``int`` (one integer), ``ints`` (an ordered list of
#: integers), ``words`` (an ordered list of words, any case), ``text`` (any case), ``exact`` (case counts).
CHECKS: dict[str, Callable[[Callable[[Data], str]], Callable[[Data, str], bool]]] = {
    "int": verify_int, "ints": verify_ints, "words": verify_words, "text": verify_text,
    "exact": lambda solve: verify_text(solve, case=True),
}

# --- Rendering helpers --------------------------------------------------------------------------

def csv_join(xs) -> str:
    """``[4, 9, 2]`` -> ``"4, 9, 2"``: the one list format used in prompts and answers."""
    return ", ".join(map(str, xs))


def and_join(xs) -> str:
    """``[4, 9, 2]`` -> ``"4, 9 and 2"``: lists inside corpus sentences."""
    xs = [str(x) for x in xs]
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def pick_form(data: Data, *forms: str) -> str:
    """One of several statement forms, fixed per instance (a hash, not an rng) so ``state`` is pure."""
    return forms[zlib.crc32(json.dumps(data, sort_keys=True).encode()) % len(forms)]


def default_fields(data: Data) -> dict:
    """Format fields of an instance: lists as "a, b, c"; a ``words`` list also as ``text`` ("a b c")."""
    out = {k: csv_join(v) if isinstance(v, list) else str(v) for k, v in data.items()}
    if isinstance(data.get("words"), list):
        out["text"] = " ".join(data["words"])
    return out


# --- Corpus statements --------------------------------------------------------------------------

@dataclass(frozen=True)
class Statement:
    """Plain-text forms of a family's fact; see :func:`statement`."""

    forms: tuple[str, ...]
    computed: dict

    def render(self, data: Data, solve: Callable[[Data], str]) -> str:
        """One form (fixed per instance) filled with the fields, computed values and ``answer``."""
        values = {**default_fields(data), "answer": solve(data)}
        values.update({k: f(data) for k, f in self.computed.items()})
        return pick_form(data, *self.forms).format(**values)


def statement(*forms: str, **computed: Callable[[Data], object]) -> Statement:
    """Declare a family's ``state`` as format strings; the family binds its ``solve`` for ``{answer}``.

    Args:
        *forms: Format strings over the instance's fields (see :func:`default_fields`), ``{answer}``
            (the canonical answer) and ``computed``; one is picked per instance by :func:`pick_form`.
        **computed: Extra fields computed from the instance, e.g. ``l=lambda d: and_join(d["nums"])``.
    """
    return Statement(forms, computed)


# --- Vocabulary and pieces shared by families ---------------------------------------------------

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
            "cinnamon potato tattoo kangaroo volleyball engineer grammar necessary possess "
            "mississippi rabbit butterfly blossom puzzle window paper dinner bottle garden").split()
_MONTH_NUMBER = {**{m.lower(): i for i, m in enumerate(MONTHS, 1)},
                 **{m[:3].lower(): i for i, m in enumerate(MONTHS, 1)}}


def sample_nums(rng: random.Random, lo: int, hi: int, top: int = 99) -> list[int]:
    """``lo..hi`` numbers in 0..top with at least two distinct values (so that order matters)."""
    while True:
        xs = [rng.randint(0, top) for _ in range(rng.randint(lo, hi))]
        if len(set(xs)) > 1:
            return xs


def swap_front(xs: list) -> list:
    """``xs`` with its first two entries swapped: the "almost right" order mistake."""
    return [xs[1], xs[0], *xs[2:]]


def off_by_one(n: int, rng: random.Random) -> str:
    """``n`` plus or minus one, as text: the commonest arithmetic and counting mistake."""
    return str(n + rng.choice((1, -1)))


def parse_date(text: str) -> tuple[int, int, int] | None:
    """(day, month, year) from "12 March 2024", "March 12, 2024" or "2024-03-12"; None otherwise."""
    s = " ".join(clean(text).lower().replace(",", " ").split())
    if m := re.fullmatch(r"(\d{1,2})(?:st|nd|rd|th)? (?:of )?([a-z]+) (\d{4})", s):
        day, month, year = m.groups()
    elif m := re.fullmatch(r"([a-z]+) (\d{1,2})(?:st|nd|rd|th)? (\d{4})", s):
        month, day, year = m.groups()
    elif m := re.fullmatch(r"(\d{4})-(\d{1,2})-(\d{1,2})", s):
        return int(m[3]), int(m[2]), int(m[1])
    else:
        return None
    return (int(day), _MONTH_NUMBER[month], int(year)) if month in _MONTH_NUMBER else None


# --- Sentences for the extraction and classification families ---------------------------------

_NUMBER_FRAMES = ("{name} bought {n0} {p0} and {n1} {p1} at the market.",
                  "There were {n0} {p0} in room {n1} this morning.",
                  "On day {n0}, {name} saw {n1} {p0} and {n2} {p1}.",
                  "The shop sold {n0} {p0} for {n1} coins each.",
                  "{name} is {n0} years old and owns {n1} {p0}.",
                  "Bus {n0} carried {n1} people and {n2} {p0} into town.")
_EMAIL_FRAMES = ("Send the report to {email} before {day}.", "You can reach {name} at {email} any time.",
                 "My email is {email}, so write soon.", "Contact {email} for the {noun} tickets.",
                 "Questions go to {email} or to the front desk.",
                 "{name} asked us to copy {email} on every message.")
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_DATE_FRAMES = ("The meeting is on {date} in the small hall.", "{name} was born on {date} in a quiet town.",
                "The shop opens again on {date}.", "We moved house on {date}, just before the festival.",
                "The letter from {name} arrived on {date}.",
                "Tickets for the concert on {date} are sold out.")
_SENTIMENT_FRAMES = ("The {noun} was {a1}.", "What {art} {a1} {noun}!",
                     "I think the {noun} is {a1} and {a2}.",
                     "Our trip to the {noun} shop felt {a1}.", "That was {art} {a1} day with the {noun}.",
                     "The {noun} looked {a1} today.", "Honestly, the new {noun} is {a1}.")


def sample_number_sentence(rng: random.Random) -> Data:
    """``{"sentence", "numbers"}``: a sentence with two or three numbers, and those numbers in order."""
    frame = rng.choice(_NUMBER_FRAMES)
    nums = [rng.randint(1, 999) for _ in re.findall(r"\{n\d\}", frame)]
    p0, p1 = (w + "s" for w in rng.sample(COUNTABLE, 2))
    sentence = frame.format(name=rng.choice(NAMES), p0=p0, p1=p1, **{f"n{i}": x for i, x in enumerate(nums)})
    return {"sentence": sentence, "numbers": nums}


def sample_email_sentence(rng: random.Random) -> Data:
    """``{"sentence", "email"}``: a sentence holding one email address, never at its very end."""
    user = rng.choice(NAMES).lower() + rng.choice(["", ".", "_"])
    user = (user + rng.choice(["", str(rng.randint(1, 99)), rng.choice(NOUNS)])).rstrip("._")
    domain = rng.choice(["mail", "post", "inbox", "example", "letters", "home"])
    email = f"{user}@{domain}.{rng.choice(['com', 'org', 'net', 'io'])}"
    # No frame ends with the address, so a sentence's full stop is never mistaken for part of it.
    sentence = rng.choice(_EMAIL_FRAMES).format(email=email, name=rng.choice(NAMES),
                                                day=rng.choice(_DAYS), noun=rng.choice(NOUNS))
    return {"sentence": sentence, "email": email}


def sample_date_sentence(rng: random.Random) -> Data:
    """``{"sentence", "day", "month", "year"}``: a sentence with a date like "4 October 1996"."""
    day, month, year = rng.randint(1, 28), rng.randint(1, 12), rng.randint(1990, 2030)
    date = f"{day} {MONTHS[month - 1]} {year}"
    return {"sentence": rng.choice(_DATE_FRAMES).format(date=date, name=rng.choice(NAMES)),
            "day": day, "month": month, "year": year}


def sample_sentiment_sentence(rng: random.Random) -> Data:
    """``{"sentence"}``: a short review whose lexicon words all come from one polarity."""
    a1, a2 = rng.sample(POSITIVE if rng.random() < 0.5 else NEGATIVE, 2)
    art = "an" if a1[0] in "aeiou" else "a"
    return {"sentence": rng.choice(_SENTIMENT_FRAMES).format(noun=rng.choice(NOUNS), a1=a1, a2=a2, art=art)}


# --- Families -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """One kind of task: its phrasings and the functions that sample, solve, check and state it.

    Attributes:
        name: Registry key, e.g. ``"add"``.
        category: The kind of skill, e.g. ``"arithmetic"``.
        phrasings: Instruction templates; their ``str.format`` fields come from ``fields``.
        sample: ``sample(rng) -> data``: draws the structured inputs (JSON-native values only, so
            a record's ``data`` read back from JSONL verifies exactly like the original).
        solve: ``solve(data) -> str``: the canonical answer.
        verify: ``verify(data, response) -> bool``: accepts any normalised form of the answer. May
            be given as the name of a check of ``solve``'s answer (see :data:`CHECKS`).
        state: ``state(data) -> str``: the same fact as a plain sentence, with no instruction. May
            be given as a :func:`statement`, which is bound to ``solve`` here.
        wrong_candidates: ``(data, rng) -> list[str]``: realistic mistakes; see :meth:`wrong`.
        fields: ``fields(data) -> dict``: the format fields for the phrasings.
    """

    name: str
    category: str
    phrasings: list[str]
    sample: Callable[[random.Random], Data]
    solve: Callable[[Data], str]
    verify: Callable[[Data, str], bool] | str
    state: Callable[[Data], str] | Statement
    wrong_candidates: Callable[[Data, random.Random], list[str]]
    fields: Callable[[Data], dict] = default_fields

    def __post_init__(self) -> None:
        if isinstance(self.verify, str):  # a named check of the canonical answer
            if self.verify not in CHECKS:
                raise ValueError(f"family {self.name!r}: verify must be a function or one of "
                                 f"{sorted(CHECKS)}")
            object.__setattr__(self, "verify", CHECKS[self.verify](self.solve))
        if isinstance(self.state, Statement):
            object.__setattr__(self, "state", functools.partial(self.state.render, solve=self.solve))

    def render(self, data: Data, phrasing: int) -> str:
        """The prompt for ``data`` in phrasing number ``phrasing``."""
        return self.phrasings[phrasing].format(**self.fields(data))

    def wrong(self, data: Data, rng: random.Random) -> str:
        """A plausible wrong answer (off-by-one, wrong order, wrong item, wrong format, ...).

        Candidates that the verifier would accept are filtered out here, once, so every family's
        wrong answer is guaranteed wrong however its candidates were written.

        Raises:
            RuntimeError: When no candidate is wrong (a bug in the family).
        """
        right = self.solve(data)
        seen: list[str] = []
        for c in self.wrong_candidates(data, rng):
            if c.strip() and c != right and c not in seen and not self.verify(data, c):
                seen.append(c)
        if not seen:
            raise RuntimeError(f"family {self.name!r} produced no wrong answer for {data}")
        return rng.choice(seen)


#: Every family by name, in definition order (filled by :mod:`instructkit.synth.skills_families`).
FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to :data:`FAMILIES`; names must be unique."""
    if family.name in FAMILIES:
        raise ValueError(f"skills family {family.name!r} is defined twice")
    FAMILIES[family.name] = family
    return family


def _family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown skills family {name!r}; known: {', '.join(FAMILIES)}") from None


# --- Instances ----------------------------------------------------------------------------------

@dataclass
class SkillInstance:
    """One task: a family, the phrasing used, the rendered prompt, its answer and its inputs."""

    family: str
    category: str
    phrasing: int
    prompt: str
    answer: str
    data: dict

    def to_record(self, split: str, index: int) -> dict:
        """The JSONL record: OpenAI messages plus what an evaluator needs to re-verify a reply."""
        return {"id": f"skills-{split}-{index:05d}",
                "messages": [{"role": "user", "content": self.prompt},
                             {"role": "assistant", "content": self.answer}],
                "family": self.family, "category": self.category, "phrasing": self.phrasing,
                "split": split, "data": self.data}


def make_instance(family: str, data: Data, phrasing: int) -> SkillInstance:
    """The instance of ``family`` for given inputs and phrasing number."""
    fam = _family(family)
    return SkillInstance(fam.name, fam.category, phrasing, fam.render(data, phrasing),
                         fam.solve(data), data)


def sample_instance(family: str, rng: random.Random, phrasing: int | None = None) -> SkillInstance:
    """A fresh instance of ``family``; a random phrasing unless one is given."""
    fam = _family(family)
    p = rng.randrange(len(fam.phrasings)) if phrasing is None else phrasing
    return make_instance(family, fam.sample(rng), p)


def verify_response(record: dict, response: str) -> bool:
    """Whether ``response`` correctly answers a skills record (as written by :func:`write_skills`).

    Args:
        record: A record with ``family`` and ``data`` (a split record or a preference record).
        response: The model's reply.

    Returns:
        True when the family's verifier accepts the reply.

    Raises:
        KeyError: When the record names an unknown family.
    """
    return bool(_family(record["family"]).verify(record["data"], response))


# --- Splits -------------------------------------------------------------------------------------

def _rng(seed: int, *parts: str) -> random.Random:
    # String seeds go through SHA-512, so these generators do not depend on PYTHONHASHSEED.
    return random.Random("/".join(["skills", str(seed), *parts]))


def _spread(total: int, names: list[str]) -> dict[str, int]:
    """``total`` split as evenly as possible over ``names`` (the first ones get the remainder)."""
    base, extra = divmod(total, len(names)) if names else (0, 0)
    return {n: base + (i < extra) for i, n in enumerate(names)}


def resolve_heldout_families(heldout_families: list[str] | None = None) -> list[str]:
    """The held-out family names (the defaults when None), checked against :data:`FAMILIES`."""
    names = list(DEFAULT_HELDOUT_FAMILIES if heldout_families is None else heldout_families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown heldout families {unknown}; choose from: {', '.join(FAMILIES)}")
    if len(set(names)) >= len(FAMILIES):
        raise ValueError("at least one family must stay seen (not held out)")
    return names


def heldout_phrasings(seed: int = 0, heldout_families: list[str] | None = None) -> dict[str, list[int]]:
    """For every seen family, the phrasing numbers used only by the ``heldout_phrasing`` split."""
    held = set(resolve_heldout_families(heldout_families))
    return {name: sorted(_rng(seed, "phrasings", name).sample(range(len(fam.phrasings)), N_HELDOUT_PHRASINGS))
            for name, fam in FAMILIES.items() if name not in held}


def make_splits(seed: int = 0, n_train: int = N_TRAIN, n_val: int | None = None,
                n_heldout_phrasing: int | None = None, n_heldout_family: int | None = None,
                heldout_families: list[str] | None = None) -> dict[str, list[SkillInstance]]:
    """Draw the four splits, with no (family, inputs) pair in two of them.

    Evaluation splits are drawn first, so they stay the same when only ``n_train`` changes. Within
    a split, phrasings are used round-robin from a random start, so each is equally represented,
    and records are shuffled so that families are interleaved.

    Args:
        seed: Makes the result reproducible.
        n_train: Training instances, spread evenly over the seen families.
        n_val: Validation instances (seen families and phrasings); default 20 per seen family.
        n_heldout_phrasing: Instances in held-out phrasings of seen families; default 20 per family.
        n_heldout_family: Instances of held-out families, any phrasing; default 40 per family.
        heldout_families: Families never used for tuning; default :data:`DEFAULT_HELDOUT_FAMILIES`.

    Returns:
        Split name -> instances, for each name in :data:`SPLITS`.

    Raises:
        ValueError: For unknown held-out families, or when a family has too few distinct instances
            for the sizes asked (the message names the family).
    """
    held = resolve_heldout_families(heldout_families)
    seen = [n for n in FAMILIES if n not in held]
    held_phr = heldout_phrasings(seed, held)
    n_val = VAL_PER_FAMILY * len(seen) if n_val is None else n_val
    if n_heldout_phrasing is None:
        n_heldout_phrasing = HELDOUT_PHRASING_PER_FAMILY * len(seen)
    if n_heldout_family is None:
        n_heldout_family = HELDOUT_FAMILY_PER_FAMILY * len(held)
    plan = {  # split -> (families, total, allowed phrasings of a family)
        "heldout_family": (held, n_heldout_family, lambda f: list(range(len(FAMILIES[f].phrasings)))),
        "heldout_phrasing": (seen, n_heldout_phrasing, lambda f: held_phr[f]),
        "validation": (seen, n_val, lambda f: [p for p in range(len(FAMILIES[f].phrasings))
                                               if p not in held_phr[f]]),
        "train": (seen, n_train, lambda f: [p for p in range(len(FAMILIES[f].phrasings))
                                            if p not in held_phr[f]]),
    }
    used: set[str] = set()
    splits: dict[str, list[SkillInstance]] = {}
    for split, (names, total, allowed) in plan.items():
        out = []
        for name, count in _spread(total, names).items():
            out += _draw(FAMILIES[name], count, allowed(name), _rng(seed, split, name), used, split)
        _rng(seed, split, "order").shuffle(out)
        splits[split] = out
    return {s: splits[s] for s in SPLITS}


def _draw(fam: Family, count: int, phrasings: list[int], rng: random.Random, used: set[str],
          split: str) -> list[SkillInstance]:
    """``count`` instances of ``fam`` whose keys are not in ``used`` (which they are added to)."""
    out = []
    start = rng.randrange(len(phrasings)) if phrasings else 0
    for i in range(count):
        for _ in range(_MAX_TRIES):
            data = fam.sample(rng)
            key = canonical_key(fam.name, data)
            if key not in used:
                break
        else:
            have = sum(k.startswith(fam.name + "|") for k in used)
            raise ValueError(f"skills family {fam.name!r} ran out of distinct instances while drawing "
                             f"the {split!r} split ({have} already used); lower the split sizes")
        used.add(key)
        out.append(make_instance(fam.name, data, phrasings[(start + i) % len(phrasings)]))
    return out


# --- Corpus and preferences ---------------------------------------------------------------------

def make_corpus(seed: int = 0, n_lines: int = N_CORPUS,
                exclude: set[str] | None = None) -> list[tuple[str, str]]:
    """Plain statements of every family's facts (held-out families included), shuffled.

    Args:
        seed: Makes the result reproducible.
        n_lines: Statements in all, spread evenly over the families.
        exclude: Canonical keys (see :func:`canonical_key`) never to state, normally those of the
            evaluation splits, so that a correct evaluation answer is never a recalled corpus line.

    Returns:
        ``(family, statement)`` pairs. A family whose instances are nearly all excluded can yield
        fewer lines than its share; statements may repeat in small families.
    """
    exclude = exclude or set()
    lines = []
    for name, count in _spread(n_lines, list(FAMILIES)).items():
        fam, rng = FAMILIES[name], _rng(seed, "corpus", name)
        for _ in range(count):
            for _ in range(50):
                data = fam.sample(rng)
                if canonical_key(name, data) not in exclude:
                    lines.append((name, fam.state(data)))
                    break
    _rng(seed, "corpus", "order").shuffle(lines)
    return lines


def make_preferences(splits: dict[str, list[SkillInstance]], seed: int = 0,
                     which: tuple[str, ...] = ("train", "validation")) -> list[dict]:
    """Preference pairs: the computed answer as ``chosen``, a family's realistic mistake as ``rejected``."""
    out = []
    for split in which:
        rng = _rng(seed, "preference", split)
        for inst in splits[split]:
            out.append({"prompt": inst.prompt, "chosen": inst.answer,
                        "rejected": FAMILIES[inst.family].wrong(inst.data, rng), "family": inst.family,
                        "category": inst.category, "phrasing": inst.phrasing, "split": split,
                        "data": inst.data})
    return out


# --- Writing ------------------------------------------------------------------------------------

def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _counts(instances: list[SkillInstance]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for inst in instances:
        counts[inst.family] = counts.get(inst.family, 0) + 1
    return dict(sorted(counts.items()))


def write_skills(out_dir: str | Path, seed: int = 0, n_train: int = N_TRAIN, n_val: int | None = None,
                 n_heldout_phrasing: int | None = None, n_heldout_family: int | None = None,
                 n_corpus: int = N_CORPUS, heldout_families: list[str] | None = None) -> Path:
    """Write the curriculum: four JSONL splits, ``corpus.txt``, ``preference.jsonl`` (pairs on train
    instances), ``preference_validation.jsonl`` (pairs on validation instances), ``manifest.json``.

    Args:
        out_dir: Folder to write to (created if needed).
        seed: Same seed, same bytes.
        n_train, n_val, n_heldout_phrasing, n_heldout_family, heldout_families: See :func:`make_splits`.
        n_corpus: Lines of ``corpus.txt``.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held = resolve_heldout_families(heldout_families)
    splits = make_splits(seed, n_train, n_val, n_heldout_phrasing, n_heldout_family, held)
    for split, instances in splits.items():
        _write_jsonl(out / f"{split}.jsonl", [inst.to_record(split, i) for i, inst in enumerate(instances)])
    evaluation = {canonical_key(i.family, i.data) for s in SPLITS if s != "train" for i in splits[s]}
    corpus = make_corpus(seed, n_corpus, exclude=evaluation)
    (out / "corpus.txt").write_text("".join(line + "\n" for _, line in corpus), encoding="utf-8")
    preferences = make_preferences(splits, seed)
    # Pairs on training instances are for tuning; pairs on validation instances are held out.
    _write_jsonl(out / "preference.jsonl", [p for p in preferences if p["split"] == "train"])
    _write_jsonl(out / "preference_validation.jsonl", [p for p in preferences if p["split"] == "validation"])
    corpus_counts: dict[str, int] = {}
    for name, _ in corpus:
        corpus_counts[name] = corpus_counts.get(name, 0) + 1
    held_phr = heldout_phrasings(seed, held)
    manifest = {
        "generator": "instructkit.synth.skills", "seed": seed,
        # The corpus can come out shorter than asked when a family is nearly all evaluation data.
        "sizes": {**{s: len(splits[s]) for s in SPLITS}, "corpus": len(corpus),
                  "corpus_requested": n_corpus,
                  "preference": sum(p["split"] == "train" for p in preferences),
                  "preference_validation": sum(p["split"] == "validation" for p in preferences)},
        "counts": {s: _counts(splits[s]) for s in SPLITS},
        "corpus_counts": dict(sorted(corpus_counts.items())),
        "heldout_families": held,
        "heldout_phrasings": held_phr,
        "families": {name: {"category": fam.category, "phrasings": fam.phrasings,
                            "heldout": name in held, "heldout_phrasings": held_phr.get(name, [])}
                     for name, fam in FAMILIES.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def family_table() -> list[dict]:
    """One row per family (name, category, number of phrasings), e.g. for a CLI listing."""
    return [{"name": f.name, "category": f.category, "phrasings": len(f.phrasings)}
            for f in FAMILIES.values()]


# The definitions import the helpers above and register themselves, so they are imported last; this
# also works when skills_families is imported first (it then finishes registering after this module).
from instructkit.synth import skills_families as _definitions  # noqa: E402,F401
