"""The task families of the skills curriculum: what each asks, its answer, checker, facts and mistakes.

Every family is data, not a class hierarchy: eight instruction phrasings (format strings over the
fields of a sampled instance) plus a few small functions (see :class:`~instructkit.synth.skills.Family`).
Answers are computed, never written by hand, so every one can be checked; each verifier accepts the
canonical answer under tolerant normalisation and rejects the realistic mistakes listed by the
family's ``wrong_candidates``. ``state`` gives the same fact as a plain sentence (several forms,
fixed per instance), so that a corpus can teach a skill as knowledge, without instruction format.

Importing this module registers every family in :data:`instructkit.synth.skills.FAMILIES`; import
that module, not this one, to use them.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable

from instructkit.synth.skills import (
    MONTHS,
    NEGATIVE,
    NOUNS,
    POSITIVE,
    SPELLING,
    WORDS,
    Data,
    Family,
    and_join,
    clean,
    csv_join,
    off_by_one,
    parse_date,
    register,
    sample_date_sentence,
    sample_email_sentence,
    sample_nums,
    sample_number_sentence,
    sample_sentiment_sentence,
    statement,
    swap_front,
)

# --- Arithmetic ---------------------------------------------------------------------------------

register(Family(
    name="add", category="arithmetic",
    phrasings=["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
               "Calculate the sum of {a} and {b}.", "What do you get when you add {b} to {a}?",
               "Find the total of {a} and {b}.", "{a} + {b} = ?", "Work out {a} plus {b}, please."],
    sample=lambda rng: {"a": rng.randint(0, 99), "b": rng.randint(0, 99)},
    solve=lambda d: str(d["a"] + d["b"]), verify="int",
    state=statement("{a} plus {b} is {answer}.", "The sum of {a} and {b} is {answer}.",
                    "Adding {a} and {b} gives {answer}."),
    # Off by one or by a carried ten, or subtracting instead of adding.
    wrong_candidates=lambda d, rng: [off_by_one(d["a"] + d["b"], rng), str(d["a"] + d["b"] + 10),
                                     str(abs(d["a"] - d["b"]))],
))


def _subtract_sample(rng: random.Random) -> Data:
    a = rng.randint(0, 99)
    return {"a": a, "b": rng.randint(0, a)}  # no negative answers: tiny models, small steps


register(Family(
    name="subtract", category="arithmetic",
    phrasings=["What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
               "What is left when you take {b} away from {a}?", "Calculate the difference {a} minus {b}.",
               "How much is {a} less {b}?", "{a} - {b} = ?", "Work out {a} take away {b}, please."],
    sample=_subtract_sample, solve=lambda d: str(d["a"] - d["b"]), verify="int",
    state=statement("{a} minus {b} is {answer}.", "Taking {b} away from {a} leaves {answer}.",
                    "The difference between {a} and {b} is {answer}."),
    # The operands swapped (b - a) is the classic slip; off by one the classic borrowing slip.
    wrong_candidates=lambda d, rng: [str(d["b"] - d["a"]), off_by_one(d["a"] - d["b"], rng),
                                     str(d["a"] + d["b"])],
))

register(Family(
    name="multiply", category="arithmetic",
    phrasings=["What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}.",
               "What is the product of {a} and {b}?", "Calculate {a} multiplied by {b}.",
               "How much is {a} x {b}?", "{a} * {b} = ?", "Work out {b} lots of {a}, please."],
    sample=lambda rng: {"a": rng.randint(0, 20), "b": rng.randint(0, 20)},
    solve=lambda d: str(d["a"] * d["b"]), verify="int",
    state=statement("{a} times {b} is {answer}.", "The product of {a} and {b} is {answer}.",
                    "{a} multiplied by {b} equals {answer}."),
    # One factor off by one (a times-table slip), adding instead, or a plain off-by-one.
    wrong_candidates=lambda d, rng: [str(d["a"] * (d["b"] + 1)), str(d["a"] + d["b"]),
                                     str(d["a"] * d["b"] + 1)],
))

# --- Comparison ---------------------------------------------------------------------------------


def _two(rng: random.Random) -> Data:
    a, b = rng.sample(range(100), 2)
    return {"a": a, "b": b}


register(Family(
    name="larger_of_two", category="comparison",
    phrasings=["Which is larger, {a} or {b}?", "What is the larger of {a} and {b}?",
               "Give the bigger number: {a} or {b}.", "Of {a} and {b}, which number is greater?",
               "Pick the larger number out of {a} and {b}.", "Tell me which is bigger: {a} or {b}.",
               "Compare {a} and {b} and give the larger one.", "Which number is higher, {a} or {b}?"],
    sample=_two, solve=lambda d: str(max(d["a"], d["b"])), verify="int",
    state=statement("The larger of {a} and {b} is {answer}.", "{answer} is larger than {n}.",
                    "Between {a} and {b}, {answer} is the bigger number.", n=lambda d: min(d["a"], d["b"])),
    wrong_candidates=lambda d, rng: [str(min(d["a"], d["b"])), str(max(d["a"], d["b"]) + 1)],
))

register(Family(
    name="smaller_of_two", category="comparison",
    phrasings=["Which is smaller, {a} or {b}?", "What is the smaller of {a} and {b}?",
               "Give the lower number: {a} or {b}.", "Of {a} and {b}, which number is less?",
               "Pick the smaller number out of {a} and {b}.", "Tell me which is less: {a} or {b}.",
               "Compare {a} and {b} and give the smaller one.", "Which number is lower, {a} or {b}?"],
    sample=_two, solve=lambda d: str(min(d["a"], d["b"])), verify="int",
    state=statement("The smaller of {a} and {b} is {answer}.", "{answer} is smaller than {n}.",
                    "Between {a} and {b}, {answer} is the lower number.", n=lambda d: max(d["a"], d["b"])),
    wrong_candidates=lambda d, rng: [str(max(d["a"], d["b"])), str(min(d["a"], d["b"]) - 1)],
))


def _nums_data(lo: int, hi: int, top: int = 99) -> Callable[[random.Random], Data]:
    return lambda rng: {"nums": sample_nums(rng, lo, hi, top)}


def _nums_and(d: Data) -> str:
    return and_join(d["nums"])


def _extreme_wrong(pick: Callable) -> Callable[[Data, random.Random], list[str]]:
    """Wrong answers for max/min: the runner-up, the opposite extreme, or the last number read."""
    def wrong(d: Data, rng: random.Random) -> list[str]:
        xs, other = d["nums"], (min if pick is max else max)
        return [str(pick(x for x in xs if x != pick(xs))), str(other(xs)), str(xs[-1])]
    return wrong


register(Family(
    name="max_list", category="comparison",
    phrasings=["What is the largest number in this list: {nums}?", "Find the maximum of {nums}.",
               "Which is the biggest of these numbers: {nums}?", "Give the highest value among {nums}.",
               "Here are some numbers: {nums}. Which one is the largest?",
               "Return the max of the list {nums}.", "Tell me the greatest number out of {nums}.",
               "Numbers: {nums}. What is the maximum?"],
    sample=_nums_data(3, 7), solve=lambda d: str(max(d["nums"])), verify="int",
    state=statement("The largest of {l} is {answer}.", "Among {l}, the biggest number is {answer}.",
                    "The maximum of the numbers {l} is {answer}.", l=_nums_and),
    wrong_candidates=_extreme_wrong(max),
))

register(Family(
    name="min_list", category="comparison",
    phrasings=["What is the smallest number in this list: {nums}?", "Find the minimum of {nums}.",
               "Which is the lowest of these numbers: {nums}?", "Give the least value among {nums}.",
               "Here are some numbers: {nums}. Which one is the smallest?",
               "Return the min of the list {nums}.", "Tell me the tiniest number out of {nums}.",
               "Numbers: {nums}. What is the minimum?"],
    sample=_nums_data(3, 7), solve=lambda d: str(min(d["nums"])), verify="int",
    state=statement("The smallest of {l} is {answer}.", "Among {l}, the lowest number is {answer}.",
                    "The minimum of the numbers {l} is {answer}.", l=_nums_and),
    wrong_candidates=_extreme_wrong(min),
))

# --- List operations ----------------------------------------------------------------------------


def _sorted(reverse: bool) -> Callable[[Data], str]:
    return lambda d: csv_join(sorted(d["nums"], reverse=reverse))


def _sort_wrong(reverse: bool) -> Callable[[Data, random.Random], list[str]]:
    """The opposite order, the input left as it was, or one adjacent pair left unswapped."""
    def wrong(d: Data, rng: random.Random) -> list[str]:
        good = sorted(d["nums"], reverse=reverse)
        i = next(i for i in range(len(good) - 1) if good[i] != good[i + 1])
        almost = good[:i] + [good[i + 1], good[i]] + good[i + 2:]
        return [_sorted(not reverse)(d), csv_join(d["nums"]), csv_join(almost)]
    return wrong


register(Family(
    name="sort_ascending", category="list",
    phrasings=["Sort these numbers in ascending order: {nums}",
               "Put {nums} in order from smallest to largest.",
               "Arrange the following numbers in increasing order: {nums}",
               "Order these from lowest to highest: {nums}", "Sort ascending: {nums}",
               "Can you sort {nums} from small to big?", "List the numbers {nums} in ascending order.",
               "Rearrange {nums} so that they go up."],
    sample=_nums_data(3, 7), solve=_sorted(False), verify="ints",
    state=statement("In ascending order, {nums} becomes {answer}.",
                    "The numbers {nums} sorted from smallest to largest are {answer}."),
    wrong_candidates=_sort_wrong(False),
))

register(Family(
    name="sort_descending", category="list",
    phrasings=["Sort these numbers in descending order: {nums}",
               "Put {nums} in order from largest to smallest.",
               "Arrange the following numbers in decreasing order: {nums}",
               "Order these from highest to lowest: {nums}", "Sort descending: {nums}",
               "Can you sort {nums} from big to small?", "List the numbers {nums} in descending order.",
               "Rearrange {nums} so that they go down."],
    sample=_nums_data(3, 7), solve=_sorted(True), verify="ints",
    state=statement("In descending order, {nums} becomes {answer}.",
                    "The numbers {nums} sorted from largest to smallest are {answer}."),
    wrong_candidates=_sort_wrong(True),
))


def _items(rng: random.Random, lo: int = 3, hi: int = 6) -> Data:
    return {"items": rng.sample(NOUNS, rng.randint(lo, hi))}  # distinct, so positions are unambiguous


register(Family(
    name="first_item", category="list",
    phrasings=["What is the first item in this list: {items}?", "Give the first element of {items}.",
               "Which item comes first in the list {items}?", "List: {items}. What is the first entry?",
               "Name the item at the start of this list: {items}",
               "Return the first word of the list {items}.", "Tell me the opening item of: {items}",
               "Here is a list: {items}. Which item is first?"],
    sample=_items, solve=lambda d: d["items"][0], verify="text",
    state=statement("The first item of the list {items} is {answer}.",
                    "In the list {items}, {answer} comes first.",
                    "{answer} is the first element of {items}."),
    wrong_candidates=lambda d, rng: [d["items"][1], d["items"][-1]],
))

register(Family(
    name="last_item", category="list",
    phrasings=["What is the last item in this list: {items}?", "Give the last element of {items}.",
               "Which item comes last in the list {items}?", "List: {items}. What is the final entry?",
               "Name the item at the end of this list: {items}",
               "Return the last word of the list {items}.", "Tell me the closing item of: {items}",
               "Here is a list: {items}. Which item is last?"],
    sample=_items, solve=lambda d: d["items"][-1], verify="text",
    state=statement("The last item of the list {items} is {answer}.",
                    "In the list {items}, {answer} comes last.", "{answer} is the final element of {items}."),
    wrong_candidates=lambda d, rng: [d["items"][-2], d["items"][0]],
))

register(Family(
    name="count_items", category="list",
    phrasings=["How many items are in this list: {items}?", "Count the items in {items}.",
               "What is the number of elements in {items}?",
               "List: {items}. How many entries does it have?",
               "Tell me how many things are listed here: {items}", "How long is the list {items}?",
               "Give the count of items in: {items}", "Here is a list: {items}. How many items is that?"],
    sample=lambda rng: {"items": [rng.choice(NOUNS) for _ in range(rng.randint(2, 9))]},
    solve=lambda d: str(len(d["items"])), verify="int",
    state=statement("The list {items} has {answer} items.", "There are {answer} items in {items}.",
                    "Counting {items} gives {answer} items."),
    # Off by one, or repeated items counted once.
    wrong_candidates=lambda d, rng: [off_by_one(len(d["items"]), rng), str(len(set(d["items"])))],
))

register(Family(
    name="reverse_list", category="list",
    phrasings=["Reverse this list: {items}", "Give the items of {items} in reverse order.",
               "Write the list {items} backwards.", "List: {items}. Reverse it.",
               "Return {items} from last to first.", "What is the list {items} reversed?",
               "Flip the order of the list {items}.", "Put these items in the opposite order: {items}"],
    sample=_items, solve=lambda d: csv_join(d["items"][::-1]), verify="words",
    state=statement("The list {items} reversed is {answer}.", "Backwards, {items} reads {answer}.",
                    "From last to first, {items} is {answer}."),
    wrong_candidates=lambda d, rng: [csv_join(d["items"]), csv_join(swap_front(d["items"][::-1])),
                                     csv_join(d["items"][:0:-1])],
))

# --- String operations on words -----------------------------------------------------------------


def _phrase(rng: random.Random, lo: int = 2, hi: int = 5) -> Data:
    return {"words": rng.sample(WORDS, rng.randint(lo, hi))}


def _shouty(rng: random.Random) -> Data:
    """Words in upper or title case, at least one all upper case, for the lower-case family."""
    while True:
        words = [w.upper() if rng.random() < 0.6 else w.capitalize() for w in _phrase(rng)["words"]]
        if any(w.isupper() and len(w) > 1 for w in words):
            return {"words": words}


def _text(d: Data) -> str:
    return " ".join(d["words"])


register(Family(
    name="upper_case", category="string",
    phrasings=["Write this in upper case: {text}", "Convert to capital letters: {text}",
               "Make this all caps: {text}", "Rewrite \"{text}\" in uppercase.",
               "Change every letter of \"{text}\" to upper case.", "Uppercase the following: {text}",
               "Put {text} in capital letters.", "Shout this text in capitals: {text}"],
    sample=_phrase, solve=lambda d: _text(d).upper(), verify="exact",
    state=statement("\"{text}\" in upper case is \"{answer}\".",
                    "In capital letters, \"{text}\" is written \"{answer}\".",
                    "The uppercase form of \"{text}\" is \"{answer}\"."),
    # Unchanged, only initials capitalised, or only the first word done.
    wrong_candidates=lambda d, rng: [_text(d), _text(d).title(),
                                     " ".join([d["words"][0].upper()] + d["words"][1:])],
))

register(Family(
    name="lower_case", category="string",
    phrasings=["Write this in lower case: {text}", "Convert to small letters: {text}",
               "Make this all lowercase: {text}", "Rewrite \"{text}\" in lowercase.",
               "Change every letter of \"{text}\" to lower case.", "Lowercase the following: {text}",
               "Put {text} in small letters.", "Turn off the capitals in this text: {text}"],
    sample=_shouty, solve=lambda d: _text(d).lower(), verify="exact",
    state=statement("\"{text}\" in lower case is \"{answer}\".",
                    "In small letters, \"{text}\" is written \"{answer}\".",
                    "The lowercase form of \"{text}\" is \"{answer}\"."),
    wrong_candidates=lambda d, rng: [_text(d), _text(d).lower().title(), _text(d).upper()],
))

register(Family(
    name="reverse_words", category="string",
    phrasings=["Reverse the order of the words in: {text}",
               "Write these words backwards, last word first: {text}",
               "Put the words of \"{text}\" in reverse order.", "Flip the word order of this phrase: {text}",
               "Say \"{text}\" with the words in the opposite order.", "Reverse the word order: {text}",
               "Rewrite {text} starting from the last word.", "What is \"{text}\" with its words reversed?"],
    sample=lambda rng: _phrase(rng, 3, 6), solve=lambda d: " ".join(d["words"][::-1]), verify="text",
    state=statement("\"{text}\" with the words in reverse order is \"{answer}\".",
                    "Read backwards word by word, \"{text}\" becomes \"{answer}\".",
                    "Reversing the words of \"{text}\" gives \"{answer}\"."),
    # Reversing the letters instead of the words is the typical confusion.
    wrong_candidates=lambda d, rng: [_text(d), _text(d)[::-1], " ".join(swap_front(d["words"][::-1]))],
))


def _initials(d: Data) -> list[str]:
    return [w[0] for w in d["words"]]


def _initials_verify(d: Data, r: str) -> bool:
    got = re.sub(r"[\s,;\-]+", "", clean(r)).lower()  # "o, l, b", "o l b" and "olb" all count
    return bool(got) and got == "".join(_initials(d)).lower()


register(Family(
    name="first_letters", category="string",
    phrasings=["What is the first letter of each word in: {text}?",
               "Give the initial letter of every word in \"{text}\".",
               "List the first letters of the words in {text}.", "Take the first letter of each word: {text}",
               "Write down the starting letter of each word of \"{text}\".",
               "Which letters do the words in \"{text}\" begin with?",
               "For each word in {text}, give its first letter.",
               "Initials of the words in \"{text}\", please."],
    sample=lambda rng: _phrase(rng, 3, 6), solve=lambda d: csv_join(_initials(d)), verify=_initials_verify,
    state=statement("The first letters of the words in \"{text}\" are {answer}.",
                    "The words of \"{text}\" start with {a}.", a=lambda d: and_join(_initials(d))),
    # Last letters instead of first, a word skipped, or two letters per word.
    wrong_candidates=lambda d, rng: [csv_join(w[-1] for w in d["words"]), csv_join(_initials(d)[:-1]),
                                     csv_join(w[:2] for w in d["words"])],
))

register(Family(
    name="word_count", category="string",
    phrasings=["How many words are in this sentence: {text}?", "Count the words in \"{text}\".",
               "What is the word count of \"{text}\"?", "Tell me how many words this has: {text}",
               "Give the number of words in: {text}", "How long is \"{text}\" in words?",
               "Number of words in {text}?", "Count how many words appear here: {text}"],
    sample=lambda rng: {"words": [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]},
    solve=lambda d: str(len(d["words"])), verify="int",
    state=statement("\"{text}\" has {answer} words.", "The sentence \"{text}\" is {answer} words long.",
                    "There are {answer} words in \"{text}\"."),
    # Off by one, or letters counted instead of words.
    wrong_candidates=lambda d, rng: [off_by_one(len(d["words"]), rng), str(len(_text(d).replace(" ", "")))],
))


def _longest_sample(rng: random.Random) -> Data:
    while True:  # a unique longest word, so the answer is never a matter of tie-breaking
        words = rng.sample(WORDS, rng.randint(3, 6))
        lengths = sorted((len(w) for w in words), reverse=True)
        if lengths[0] > lengths[1]:
            return {"words": words}


register(Family(
    name="longest_word", category="string",
    phrasings=["What is the longest word in \"{text}\"?", "Find the longest word in this phrase: {text}",
               "Which word has the most letters: {words}?", "Give the longest of these words: {words}",
               "Out of {words}, which word is longest?",
               "Name the word with the most letters in \"{text}\".", "Words: {words}. Which is the longest?",
               "Return the longest word from: {text}"],
    sample=_longest_sample, solve=lambda d: max(d["words"], key=len), verify="text",
    state=statement("The longest word in \"{text}\" is {answer}.", "Of {a}, the longest word is {answer}.",
                    "{answer} has the most letters among {a}.", a=lambda d: and_join(d["words"])),
    # The shortest word, the runner-up, or simply the first word.
    wrong_candidates=lambda d, rng: [min(d["words"], key=len), sorted(d["words"], key=len)[-2],
                                     d["words"][0]],
))

# --- Extraction (sentences come from the sample_*_sentence helpers) -----------------------------

register(Family(
    name="extract_numbers", category="extraction",
    phrasings=["List the numbers that appear in this sentence: {sentence}",
               "Extract all numbers from: \"{sentence}\"", "Which numbers are mentioned in \"{sentence}\"?",
               "Pull out the numbers in this text: {sentence}", "Give every number found in: {sentence}",
               "Find the numbers in the sentence \"{sentence}\".",
               "Sentence: {sentence} What numbers does it contain?",
               "Write down the numbers from \"{sentence}\" in order."],
    sample=sample_number_sentence, solve=lambda d: csv_join(d["numbers"]), verify="ints",
    state=statement("The numbers in \"{sentence}\" are {a}.", "\"{sentence}\" mentions the numbers {a}.",
                    a=lambda d: and_join(d["numbers"])),
    # A number missed, the order lost, or the numbers added up.
    wrong_candidates=lambda d, rng: [csv_join(d["numbers"][:-1]), csv_join(d["numbers"][::-1]),
                                     str(sum(d["numbers"]))],
))

register(Family(
    name="extract_email", category="extraction",
    phrasings=["What is the email address in this sentence: {sentence}",
               "Extract the email address from: \"{sentence}\"", "Find the email in \"{sentence}\".",
               "Which email address is mentioned here: {sentence}", "Pull out the email address: {sentence}",
               "Give the email contained in the text \"{sentence}\".",
               "Text: {sentence} What email address does it contain?",
               "Copy the email address out of this sentence: {sentence}"],
    sample=sample_email_sentence, solve=lambda d: d["email"],
    verify=lambda d, r: clean(r).strip("<>").lower() == d["email"],
    state=statement("The email address in \"{sentence}\" is {email}.",
                    "\"{sentence}\" contains the email address {email}."),
    # The address cut short: the user name only, no top-level domain, or the domain only.
    wrong_candidates=lambda d, rng: [d["email"].split("@")[0], d["email"].rsplit(".", 1)[0],
                                     "@" + d["email"].split("@")[1]],
))


def _date_text(d: Data, day_shift: int = 0, year_shift: int = 0) -> str:
    return f"{(d['day'] - 1 + day_shift) % 28 + 1} {MONTHS[d['month'] - 1]} {d['year'] + year_shift}"


register(Family(
    name="extract_date", category="extraction",
    phrasings=["What date is mentioned in this sentence: {sentence}", "Extract the date from: \"{sentence}\"",
               "Find the date in \"{sentence}\".", "Which date appears here: {sentence}",
               "Pull out the date: {sentence}", "Give the date contained in the text \"{sentence}\".",
               "Text: {sentence} What date does it mention?", "On what date does this happen? {sentence}"],
    # Any common way of writing the same date counts: "4 October 1996", "October 4, 1996", "1996-10-04".
    sample=sample_date_sentence, solve=_date_text,
    verify=lambda d, r: parse_date(r) == (d["day"], d["month"], d["year"]),
    state=statement("The date in \"{sentence}\" is {answer}.", "\"{sentence}\" mentions the date {answer}."),
    # A day or year off by one, or the year left out.
    wrong_candidates=lambda d, rng: [_date_text(d, day_shift=1), _date_text(d, year_shift=1),
                                     f"{d['day']} {MONTHS[d['month'] - 1]}"],
))

# --- Rule-based classification ------------------------------------------------------------------


def _cues(d: Data) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", d["sentence"].lower()) if w in POSITIVE or w in NEGATIVE]


def _sentiment(d: Data) -> str:
    """The label by lexicon lookup: more positive than negative words means positive."""
    return "positive" if 2 * sum(w in POSITIVE for w in _cues(d)) > len(_cues(d)) else "negative"


register(Family(
    name="sentiment", category="classification",
    phrasings=["Is this sentence positive or negative? {sentence}",
               "Classify the sentiment of \"{sentence}\" as positive or negative.",
               "What is the sentiment of: {sentence}", "Positive or negative: \"{sentence}\"",
               "Tell me whether this review is positive or negative: {sentence}",
               "Decide if the feeling in \"{sentence}\" is positive or negative.",
               "Label this text as positive or negative: {sentence}",
               "Sentence: {sentence} Is the tone positive or negative?"],
    sample=sample_sentiment_sentence, solve=_sentiment, verify="text",
    state=statement("The sentence \"{sentence}\" is {answer}.",
                    "\"{sentence}\" expresses a {answer} feeling.",
                    "\"{w}\" is a {answer} word, so \"{sentence}\" is {answer}.", w=lambda d: _cues(d)[0]),
    wrong_candidates=lambda d, rng: ["negative" if _sentiment(d) == "positive" else "positive", "neutral"],
))

# --- Formatting ---------------------------------------------------------------------------------

_KEYS = ("result", "answer", "value", "total", "sum")


def _json_verify(d: Data, r: str) -> bool:
    """Exactly one key, the asked one, holding the sum (as a number, or a string of it)."""
    s = re.sub(r"^```(?:json)?\s*|\s*```$", "", r.strip()).strip().rstrip(".")
    try:
        obj = json.loads(s)
    except ValueError:
        return False
    if not isinstance(obj, dict) or list(obj) != [d["key"]]:
        return False
    v, want = obj[d["key"]], d["a"] + d["b"]
    return (type(v) is int and v == want) or (isinstance(v, str) and v.strip() == str(want))


def _json_wrong(d: Data, rng: random.Random) -> list[str]:
    """A bare number (the format ignored), another key, or the right format with an arithmetic slip."""
    other = rng.choice([k for k in _KEYS if k != d["key"]])
    total = d["a"] + d["b"]
    return [str(total), json.dumps({other: total}), json.dumps({d["key"]: total + 1})]


register(Family(
    name="json_answer", category="formatting",
    phrasings=["What is {a} plus {b}? Reply in JSON with the key \"{key}\".",
               "Add {a} and {b} and return a JSON object with the key \"{key}\".",
               "Give the sum of {a} and {b} as JSON under the key \"{key}\".",
               "Compute {a} + {b}. Format the answer as JSON: {{\"{key}\": ...}}",
               "Return JSON with a single key \"{key}\" holding {a} plus {b}.",
               "Answer in JSON using the key \"{key}\": what is {a} + {b}?",
               "Calculate the total of {a} and {b}; respond with a JSON object keyed \"{key}\".",
               "Put the sum of {a} and {b} in JSON, key \"{key}\"."],
    sample=lambda rng: {"a": rng.randint(0, 99), "b": rng.randint(0, 99), "key": rng.choice(_KEYS)},
    solve=lambda d: json.dumps({d["key"]: d["a"] + d["b"]}), verify=_json_verify,
    state=statement("The sum of {a} and {b} as JSON with the key \"{key}\" is {answer}.",
                    "In JSON under the key \"{key}\", {a} plus {b} is written {answer}."),
    wrong_candidates=_json_wrong,
))


def _bullets_verify(d: Data, r: str) -> bool:
    lines = [ln.strip() for ln in r.strip().splitlines() if ln.strip()]
    got = [m[1] if (m := re.fullmatch(r"[-*\u2022]\s+(.+)", ln)) else None for ln in lines]
    return None not in got and [clean(g).lower() for g in got] == [w.lower() for w in d["items"]]


register(Family(
    name="bullet_list", category="formatting",
    phrasings=["Make a bulleted list of these items: {items}", "Turn {items} into a bullet list.",
               "Write each of these on its own bullet: {items}", "Format as a bulleted list: {items}",
               "Put the items {items} in a list with bullet points.", "Give me {items} as bullet points.",
               "Rewrite this as a bulleted list, one item per line: {items}",
               "List these with a dash in front of each: {items}"],
    sample=lambda rng: _items(rng, 2, 5), solve=lambda d: "\n".join(f"- {w}" for w in d["items"]),
    verify=_bullets_verify,
    # The corpus has one statement per line, so the lines of the list are quoted, not broken.
    state=statement("As a bulleted list, {a} is written one per line as {b}.",
                    "A bulleted list of {a} has the lines {b}.",
                    a=lambda d: and_join(d["items"]), b=lambda d: and_join(f'"- {w}"' for w in d["items"])),
    # Commas instead of bullets, an item dropped, or numbers instead of bullets.
    wrong_candidates=lambda d, rng: [csv_join(d["items"]), "\n".join(f"- {w}" for w in d["items"][:-1]),
                                     "\n".join(f"{i}. {w}" for i, w in enumerate(d["items"], 1))],
))

register(Family(
    name="answer_upper", category="formatting",
    phrasings=["What is the first item in {items}? Answer in upper case.",
               "Give the first element of the list {items}, written in capital letters.",
               "Name the first item of {items} in all caps.",
               "List: {items}. Reply with the first item in uppercase.",
               "Which item comes first in {items}? Use capital letters only.",
               "Return the first entry of {items} in upper case.",
               "Tell me the opening item of {items}, in capitals.",
               "Using only uppercase letters, what is the first item of {items}?"],
    sample=_items, solve=lambda d: d["items"][0].upper(), verify="exact",
    state=statement("The first item of {items} in upper case is {answer}.",
                    "Written in capitals, the first element of {items} is {answer}."),
    # The format instruction ignored (or half followed), or the wrong item in the right format.
    wrong_candidates=lambda d, rng: [d["items"][0], d["items"][0].capitalize(), d["items"][1].upper()],
))

# --- Counting -----------------------------------------------------------------------------------


def _count_word_sample(rng: random.Random) -> Data:
    pool = rng.sample(NOUNS, 3)
    words = [rng.choice(pool) for _ in range(rng.randint(4, 10))]
    # Now and then ask about a word that is absent, so that "0" is part of the skill.
    return {"words": words, "target": rng.choice(NOUNS) if rng.random() < 0.15 else rng.choice(words)}


def _times(count: Callable[[Data], int]) -> Callable[[Data], str]:
    return lambda d: "1 time" if count(d) == 1 else f"{count(d)} times"


def _word_hits(d: Data) -> int:
    return d["words"].count(d["target"])


register(Family(
    name="count_word", category="counting",
    phrasings=["How many times does the word \"{target}\" appear in: {text}?",
               "Count the occurrences of \"{target}\" in \"{text}\".",
               "In \"{text}\", how often does \"{target}\" occur?",
               "Tell me how many times \"{target}\" is in this text: {text}",
               "Text: {text}. How many times is the word \"{target}\" used?",
               "Count how often the word \"{target}\" shows up in: {text}",
               "What is the number of times \"{target}\" appears in \"{text}\"?",
               "Give the count of the word \"{target}\" in {text}."],
    sample=_count_word_sample, solve=lambda d: str(_word_hits(d)), verify="int",
    state=statement("The word \"{target}\" appears {n} in \"{text}\".",
                    "In \"{text}\", \"{target}\" occurs {n}.",
                    n=_times(_word_hits)),
    # Off by one, or every word counted.
    wrong_candidates=lambda d, rng: [off_by_one(_word_hits(d), rng), str(len(d["words"]))],
))


def _count_letter_sample(rng: random.Random) -> Data:
    word = rng.choice(SPELLING)
    absent = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word]
    return {"word": word, "letter": rng.choice(absent) if rng.random() < 0.15 else rng.choice(word)}


def _letter_hits(d: Data) -> int:
    return d["word"].count(d["letter"])


register(Family(
    name="count_letter", category="counting",
    phrasings=["How many times does the letter \"{letter}\" appear in the word \"{word}\"?",
               "Count the letter {letter} in {word}.", "How many \"{letter}\"s are in \"{word}\"?",
               "In the word {word}, how often does the letter {letter} occur?",
               "Tell me the number of times \"{letter}\" shows up in \"{word}\".",
               "Word: {word}. How many times does it contain the letter {letter}?",
               "Count how often \"{letter}\" occurs in the word \"{word}\".",
               "What is the count of the letter \"{letter}\" in {word}?"],
    sample=_count_letter_sample, solve=lambda d: str(_letter_hits(d)), verify="int",
    state=statement("The letter \"{letter}\" appears {n} in the word \"{word}\".",
                    "\"{word}\" contains the letter \"{letter}\" {n}.",
                    "Counting the letter \"{letter}\" in \"{word}\" gives {answer}.", n=_times(_letter_hits)),
    # Off by one, or every letter of the word counted.
    wrong_candidates=lambda d, rng: [off_by_one(_letter_hits(d), rng), str(len(d["word"]))],
))

# --- Two-step compositions ----------------------------------------------------------------------

register(Family(
    name="sum_two_largest", category="composition",
    phrasings=["What is the sum of the two largest numbers in {nums}?",
               "Add the two biggest numbers from this list: {nums}",
               "Find the two largest values in {nums} and add them.",
               "Numbers: {nums}. What do the two highest add up to?",
               "Take the two greatest numbers of {nums} and give their sum.",
               "Sum the largest two numbers among {nums}.",
               "From {nums}, pick the two largest and add them together.",
               "Give the total of the two largest numbers in the list {nums}."],
    sample=_nums_data(3, 5, top=50), solve=lambda d: str(sum(sorted(d["nums"])[-2:])), verify="int",
    state=statement("The two largest of {l} are {x} and {y}, which add up to {answer}.",
                    "The sum of the two largest numbers in {l} is {answer}.", l=_nums_and,
                    x=lambda d: sorted(d["nums"])[-1], y=lambda d: sorted(d["nums"])[-2]),
    # One step skipped or botched: largest plus smallest, everything summed, the largest alone, or
    # the first two taken without sorting.
    wrong_candidates=lambda d, rng: [str(max(d["nums"]) + min(d["nums"])), str(sum(d["nums"])),
                                     str(max(d["nums"])), str(sum(d["nums"][:2]))],
))


def _k_word(d: Data) -> str:
    return {2: "two", 3: "three"}[d["k"]]


def _first_k_wrong(d: Data, rng: random.Random) -> list[str]:
    """Not sorted, sorted the wrong way, one too many, or the wrong end of the sorted list."""
    up, k = sorted(d["nums"]), d["k"]
    return [csv_join(d["nums"][:k]), csv_join(up[::-1][:k]), csv_join(up[:k + 1]), csv_join(up[-k:])]


register(Family(
    name="sort_then_first", category="composition",
    phrasings=["Sort {nums} in ascending order, then give the first {kw}.",
               "Put these numbers in increasing order and return the first {kw}: {nums}",
               "After sorting {nums} from smallest to largest, what are the first {kw} numbers?",
               "Order {nums} from low to high and list the first {kw}.",
               "Sort the list {nums} ascending and keep only the first {kw} items.",
               "Arrange {nums} in ascending order; give me the first {kw}.",
               "Numbers: {nums}. Sort them ascending and take the first {kw}.",
               "First sort {nums} from small to big, then write the first {kw} numbers."],
    sample=lambda rng: {"nums": sample_nums(rng, 4, 6), "k": rng.choice((2, 3))},
    solve=lambda d: csv_join(sorted(d["nums"])[:d["k"]]), verify="ints",
    fields=lambda d: {"nums": csv_join(d["nums"]), "kw": _k_word(d)},
    state=statement("Sorting {nums} in ascending order and taking the first {kw} gives {answer}.",
                    "The first {kw} of {nums} after sorting from smallest to largest are {answer}.",
                    kw=_k_word),
    wrong_candidates=_first_k_wrong,
))

# --- Ambiguous or impossible requests -----------------------------------------------------------

#: The two fixed reply styles; their opening is what the verifier checks.
NEED_INFO, CANNOT = "I need more information:", "I cannot do that:"
_LIST_VERBS = ("sort", "add up", "find the largest of", "find the smallest of", "reverse", "count")
_TOPICS = ("numbers", "scores", "prices", "ages", "temperatures", "values", "test marks", "heights",
           "distances", "weights", "list", "items")
_WORD_VERBS = ("capitalise", "reverse the letters of", "count the letters in", "spell out",
               "find the first letter of")
_EMPTY_VERBS = ("give the first item of", "give the last item of", "find the largest number in",
                "find the smallest number in")


def _clarify_sample(rng: random.Random) -> Data:
    """A request with its input missing (ask for it) or impossible to carry out (decline)."""
    case = rng.choices(("missing_list", "missing_word", "divide_zero", "empty_list"), (7, 4, 6, 3))[0]
    if case == "missing_list":
        return {"case": case, "verb": rng.choice(_LIST_VERBS),
                "det": rng.choice(("the", "my", "these", "our", "all the")), "topic": rng.choice(_TOPICS)}
    if case == "missing_word":
        return {"case": case, "verb": rng.choice(_WORD_VERBS),
                "det": rng.choice(("the", "my", "this", "that")),
                "topic": rng.choice(("word", "name", "city name", "secret word"))}
    if case == "divide_zero":
        return {"case": case, "verb": "divide", "a": rng.randint(1, 999), "zero": rng.choice(("0", "zero"))}
    return {"case": case, "verb": rng.choice(_EMPTY_VERBS),
            "obj": rng.choice(("the empty list []", "this list: []", "the list [] with nothing in it"))}


def _clarify_fields(d: Data) -> dict:
    if d["case"] == "divide_zero":
        obj = f"{d['a']} by {d['zero']}"
    elif d["case"] == "empty_list":
        obj = d["obj"]
    else:
        obj = f"{d['det']} {d['topic']}"
    return {"verb": d["verb"], "Verb": d["verb"][0].upper() + d["verb"][1:], "obj": obj}


def _clarify_solve(d: Data) -> str:
    if d["case"] == "divide_zero":
        return f"{CANNOT} division by zero is undefined."
    if d["case"] == "empty_list":
        return f"{CANNOT} the list is empty."
    return f"{NEED_INFO} please give the {d['topic']}."


def _clarify_verify(d: Data, r: str) -> bool:
    # The style is the skill: the right opening, whatever short reason follows it.
    return clean(r).lower().startswith(_clarify_solve(d).split(":")[0].lower())


def _clarify_state(d: Data) -> str:
    f = _clarify_fields(d)
    if d["case"] == "divide_zero":
        return f"{d['a']} divided by {d['zero']} is undefined, so nobody can work it out."
    if d["case"] == "empty_list":
        return f"It is impossible to {f['verb']} {f['obj']}, because it has no items."
    it = "it" if d["case"] == "missing_word" else "them"
    return (f"Someone who wants to {f['verb']} {f['obj']} without giving {it} has left something out, "
            f"and the reply is \"{_clarify_solve(d)}\"")


def _clarify_wrong(d: Data, rng: random.Random) -> list[str]:
    """A made-up answer (the hallucination the family exists to prevent) or the other reply style."""
    if d["case"] == "divide_zero":
        return ["0", str(d["a"]), f"{NEED_INFO} please give the numbers."]
    if d["case"] == "empty_list":
        return ["0", rng.choice(NOUNS), f"{NEED_INFO} please give the list."]
    made_up = rng.choice(NOUNS).upper() if d["case"] == "missing_word" else "3, 7, 12"
    return [made_up, f"{CANNOT} that is not possible.", "0"]


register(Family(
    name="clarify", category="clarify",
    phrasings=["{Verb} {obj}.", "Please {verb} {obj}.", "Can you {verb} {obj}?",
               "I need you to {verb} {obj}.", "Could you {verb} {obj} for me?", "Quick task: {verb} {obj}.",
               "Your job is to {verb} {obj}.", "Go ahead and {verb} {obj}."],
    sample=_clarify_sample, solve=_clarify_solve, verify=_clarify_verify, state=_clarify_state,
    wrong_candidates=_clarify_wrong, fields=_clarify_fields,
))
