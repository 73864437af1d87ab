"""The 25 verifiable instructions of IFEval, each a pure function ``check(response, **kwargs) -> bool``.

Every check follows the semantics of the reference implementation (google-research
``instruction_following_eval/instructions.py``), edge cases included; the comments name the cases
that surprise people. Three rules hold for all of them, as in the reference:

* a response that is empty or only whitespace follows no instruction (see :meth:`Instruction.follows`);
* ``"less than"`` means ``count < N`` and ``"at least"`` means ``count >= N``;
* keyword, forbidden-word, postscript-marker and section-splitter arguments are used as regular
  expressions, not literal text (they are plain words in the published data).

Arguments are validated when a prompt record is read (:func:`bind`), so a typo in a prompts file is a
:class:`~instructkit.data.errors.DataError` naming the file, line and field, not a crash halfway
through scoring. Where the reference would silently pick a *random* value for a missing or
out-of-range argument, this is an error too, so scores never depend on chance.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructkit.data.errors import DataError
from instructkit.evaluate.ifeval import text

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


# --------------------------------------------------------------------------------------- keywords


def keywords_existence(response: str, keywords: list[str]) -> bool:
    """Every keyword occurs somewhere, case-insensitively (also inside longer words: "cat" in "catalog")."""
    return all(re.search(k, response, flags=re.IGNORECASE) for k in keywords)


def keywords_frequency(response: str, keyword: str, frequency: int, relation: str) -> bool:
    """Non-overlapping case-insensitive occurrences of the keyword, substrings of words included."""
    return _compare(len(re.findall(keyword, response, flags=re.IGNORECASE)), relation, frequency)


def keywords_forbidden_words(response: str, forbidden_words: list[str]) -> bool:
    """No forbidden word occurs as a whole word (``\\b`` boundaries), case-insensitively."""
    return not any(re.search(rf"\b{w}\b", response, flags=re.IGNORECASE) for w in forbidden_words)


def keywords_letter_frequency(response: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    """Occurrences of one character in the lower-cased response (the letter is lower-cased too)."""
    return _compare(response.lower().count(letter), let_relation, let_frequency)


# --------------------------------------------------------------------------------------- language


def response_language(response: str, language: str) -> bool:
    """langdetect's language of the whole response is ``language``; undetectable text passes."""
    detected = text.detect_language(response)
    return detected is None or detected == language


# ------------------------------------------------------------------------------- length constraints


def number_sentences(response: str, num_sentences: int, relation: str) -> bool:
    """Sentences as NLTK's English Punkt model counts them."""
    return _compare(text.count_sentences(response), relation, num_sentences)


def number_paragraphs(response: str, num_paragraphs: int) -> bool:
    """Exactly N paragraphs separated by a ``***`` divider.

    An empty piece before the first or after the last divider is not counted; an empty piece
    between two dividers fails the check outright. Longer runs of asterisks also split, and every
    three asterisks count as a divider ("******" is two dividers with an empty piece between).
    """
    pieces = re.split(r"\s?\*\*\*\s?", response)
    count = len(pieces)
    for i, piece in enumerate(pieces):
        if not piece.strip():
            if i in (0, len(pieces) - 1):
                count -= 1
            else:
                return False
    return count == num_paragraphs


def number_words(response: str, num_words: int, relation: str) -> bool:
    return _compare(text.count_words(response), relation, num_words)


_FIRST_WORD_STOP = frozenset(".,?!'\"")


def nth_paragraph_first_word(response: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly N paragraphs separated by blank lines, and paragraph ``nth`` starts with ``first_word``.

    Paragraphs are the pieces between ``"\\n\\n"``; blank pieces do not count towards N, but the nth
    paragraph is looked up by position among *all* pieces, blank ones included (as in the
    reference). The first word is the first whitespace-separated token, with leading quotes removed
    and cut at the first ``. , ? ! ' "``, compared case-insensitively.
    """
    pieces = response.split("\n\n")
    count = sum(1 for p in pieces if p.strip())
    if nth_paragraph > count:
        return False
    paragraph = pieces[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in _FIRST_WORD_STOP:
            break
        first += ch.lower()
    return count == num_paragraphs and first == first_word


# ------------------------------------------------------------------------------ detectable content


def number_placeholders(response: str, num_placeholders: int) -> bool:
    """At least N placeholders ``[...]``: shortest bracket pairs on one line, ``[]`` included."""
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


def postscript(response: str, postscript_marker: str) -> bool:
    """The marker appears anywhere (case-insensitive); P.S. and P.P.S tolerate a space after each dot."""
    lowered = response.lower()
    if postscript_marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif postscript_marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + postscript_marker.lower() + r".*$"
    return bool(re.findall(pattern, lowered, flags=re.MULTILINE))


# ------------------------------------------------------------------------------- detectable format


def number_bullet_lists(response: str, num_bullets: int) -> bool:
    """Exactly N lines that start (after whitespace) with ``*`` not followed by ``*``, or with ``-``.

    A ``---`` rule or a line starting with a negative number counts as a dash bullet, and a bold
    ``**`` line start does not count, exactly as in the reference.
    """
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def constrained_response(response: str) -> bool:
    """One of "My answer is yes." / "My answer is no." / "My answer is maybe." appears (exact case)."""
    stripped = response.strip()
    return any(option in stripped for option in CONSTRAINED_RESPONSES)


def number_highlighted_sections(response: str, num_highlights: int) -> bool:
    """At least N highlights: non-blank ``*text*`` and ``**text**`` spans on one line.

    Two patterns are counted, as in the reference: single-asterisk spans (in ``**bold**`` these are
    the blank ``**`` pairs, which do not count) and double-asterisk spans, so ``*a*`` and
    ``**a**`` each count once, and a span broken by a newline does not count.
    """
    count = sum(1 for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip())
    count += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h[2:-2].strip())
    return count >= num_highlights


def multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    """At least N occurrences of the splitter followed by a number ("Section 1"), case-sensitive.

    The splitter may appear anywhere, not only at a line start; text before the first one is not
    a section.
    """
    pieces = re.split(r"\s?" + section_spliter + r"\s?\d+\s?", response)
    return len(pieces) - 1 >= num_sections


_FENCES = ("```json", "```Json", "```JSON", "```")


def json_format(response: str) -> bool:
    """The stripped response, less one leading code fence (```json, ```Json, ```JSON or ```) and one
    trailing ```, parses as JSON (any JSON value; Python's parser, so NaN and Infinity pass)."""
    value = response.strip()
    for fence in _FENCES:  # applied in turn, like chained str.removeprefix calls
        value = value.removeprefix(fence)
    value = value.removesuffix("```").strip()
    try:  # RecursionError: nesting too deep for Python's parser, which the reference does not catch
        json.loads(value)
    except (ValueError, RecursionError):
        return False
    return True


def title(response: str) -> bool:
    """A title ``<<...>>`` on one line with something other than whitespace and ``<``/``>`` inside."""
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


# ------------------------------------------------------------------------------------- combination


def two_responses(response: str) -> bool:
    """Exactly two different non-blank answers separated by ``******``.

    Blank pieces are allowed only before the first or after the last separator; the two answers
    must differ after stripping whitespace.
    """
    pieces = response.split("******")
    answers = []
    for i, piece in enumerate(pieces):
        if piece.strip():
            answers.append(piece)
        elif i not in (0, len(pieces) - 1):
            return False
    return len(answers) == 2 and answers[0].strip() != answers[1].strip()


def repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    """The response starts with the request, compared case-insensitively after stripping both."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


# -------------------------------------------------------------------------------------- start/end


def end_checker(response: str, end_phrase: str) -> bool:
    """The response ends with the phrase, case-insensitively, ignoring surrounding whitespace and
    double quotes around the whole response."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    """The stripped response is at least two characters long and starts and ends with ``"``."""
    stripped = response.strip()
    return len(stripped) > 1 and stripped[0] == '"' and stripped[-1] == '"'


# -------------------------------------------------------------------------------------- change case


def capital_word_frequency(response: str, capital_frequency: int, capital_relation: str) -> bool:
    """Tokens (``nltk.word_tokenize``) that are all upper case (``str.isupper``); "DON'T" is two tokens."""
    capitals = sum(1 for tok in text.word_tokenize(response) if tok.isupper())
    return _compare(capitals, capital_relation, capital_frequency)


def english_capital(response: str) -> bool:
    """``str.isupper()`` and langdetect says English; undetectable upper-case text passes."""
    if not response.isupper():
        return False
    detected = text.detect_language(response)
    return detected is None or detected == "en"


def english_lowercase(response: str) -> bool:
    """``str.islower()`` and langdetect says English; undetectable lower-case text passes."""
    if not response.islower():
        return False
    detected = text.detect_language(response)
    return detected is None or detected == "en"


# -------------------------------------------------------------------------------------- punctuation


def no_comma(response: str) -> bool:
    """No ASCII comma (other comma characters such as "，" are allowed, as in the reference)."""
    return "," not in response


# ---------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Param:
    """One argument of an instruction.

    Attributes:
        name: The key in the prompt record's ``kwargs`` object.
        kind: ``count`` (integer >= 0), ``index`` (integer >= 1), ``relation``, ``text`` (non-empty
            string), ``words`` (non-empty list of non-empty strings), ``letter`` (one character),
            ``language`` (a langdetect code).
        regex: The reference uses the value as a regular expression, so it must compile.
        normalize: Applied after validation, mirroring the reference's ``build_description``.
    """

    name: str
    kind: str
    regex: bool = False
    normalize: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class InstructionType:
    id: str
    check: Callable[..., bool]
    params: tuple[Param, ...] = ()

    @property
    def category(self) -> str:
        return self.id.split(":")[0]


def _strip(v: str) -> str:
    return v.strip()


def _lower(v: str) -> str:
    return v.lower()


def _letter(v: str) -> str:
    return v.strip().lower()


def _sorted_unique(v: list[str]) -> list[str]:
    return sorted(set(v))


_C, _R = "count", "relation"

INSTRUCTIONS: dict[str, InstructionType] = {t.id: t for t in (
    InstructionType("keywords:existence", keywords_existence,
                    (Param("keywords", "words", regex=True, normalize=sorted),)),
    InstructionType("keywords:frequency", keywords_frequency,
                    (Param("keyword", "text", regex=True, normalize=_strip), Param("frequency", _C),
                     Param("relation", _R))),
    InstructionType("keywords:forbidden_words", keywords_forbidden_words,
                    (Param("forbidden_words", "words", regex=True, normalize=_sorted_unique),)),
    InstructionType("keywords:letter_frequency", keywords_letter_frequency,
                    (Param("letter", "letter", normalize=_letter), Param("let_frequency", _C),
                     Param("let_relation", _R))),
    InstructionType("language:response_language", response_language, (Param("language", "language"),)),
    InstructionType("length_constraints:number_sentences", number_sentences,
                    (Param("num_sentences", _C), Param("relation", _R))),
    InstructionType("length_constraints:number_paragraphs", number_paragraphs, (Param("num_paragraphs", _C),)),
    InstructionType("length_constraints:number_words", number_words,
                    (Param("num_words", _C), Param("relation", _R))),
    InstructionType("length_constraints:nth_paragraph_first_word", nth_paragraph_first_word,
                    (Param("num_paragraphs", _C), Param("nth_paragraph", "index"),
                     Param("first_word", "text", normalize=_lower))),
    InstructionType("detectable_content:number_placeholders", number_placeholders,
                    (Param("num_placeholders", _C),)),
    InstructionType("detectable_content:postscript", postscript,
                    (Param("postscript_marker", "text", regex=True, normalize=_strip),)),
    InstructionType("detectable_format:number_bullet_lists", number_bullet_lists, (Param("num_bullets", _C),)),
    InstructionType("detectable_format:constrained_response", constrained_response),
    InstructionType("detectable_format:number_highlighted_sections", number_highlighted_sections,
                    (Param("num_highlights", _C),)),
    InstructionType("detectable_format:multiple_sections", multiple_sections,
                    (Param("section_spliter", "text", regex=True, normalize=_strip), Param("num_sections", _C))),
    InstructionType("detectable_format:json_format", json_format),
    InstructionType("detectable_format:title", title),
    InstructionType("combination:two_responses", two_responses),
    InstructionType("combination:repeat_prompt", repeat_prompt, (Param("prompt_to_repeat", "text"),)),
    InstructionType("startend:end_checker", end_checker, (Param("end_phrase", "text", normalize=_strip),)),
    InstructionType("change_case:capital_word_frequency", capital_word_frequency,
                    (Param("capital_frequency", _C), Param("capital_relation", _R))),
    InstructionType("change_case:english_capital", english_capital),
    InstructionType("change_case:english_lowercase", english_lowercase),
    InstructionType("punctuation:no_comma", no_comma),
    InstructionType("startend:quotation", quotation),
)}


@dataclass(frozen=True)
class Instruction:
    """An instruction type bound to validated arguments, ready to check responses."""

    type: InstructionType
    kwargs: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.type.id

    def follows(self, response: str) -> bool:
        """Whether ``response`` follows the instruction; blank responses never do (as in the reference)."""
        return bool(response.strip()) and bool(self.type.check(response, **self.kwargs))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(param: Param, value: Any, err: Callable[[str, str], DataError]) -> Any:
    kind = param.kind
    if kind in ("count", "index"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # e.g. 3.0 from a Parquet column of floats
        low = 0 if kind == "count" else 1
        if not _is_int(value) or value < low:
            raise err(f"must be an integer >= {low}, got {value!r}", f"set it to a whole number >= {low}")
    elif kind == "relation":
        if value not in RELATIONS:
            raise err(f"must be 'less than' or 'at least', got {value!r}", "use one of the two relations")
    elif kind == "words":
        if (not isinstance(value, list) or not value
                or not all(isinstance(w, str) and w.strip() for w in value)):
            raise err(f"must be a non-empty list of non-empty strings, got {value!r}",
                      'write it as a JSON array such as ["apple", "pear"]')
    elif kind == "letter":
        if not isinstance(value, str) or len(value) != 1:
            raise err(f"must be a single character, got {value!r}", 'write one character such as "e"')
    elif kind == "language":
        langs = text.supported_languages()
        if value not in langs:
            raise err(f"must be a language code langdetect knows, got {value!r}",
                      f"use one of {', '.join(langs)}")
    elif kind == "text":
        if not isinstance(value, str) or not value.strip():
            raise err(f"must be a non-empty string, got {value!r}", "give the text as a JSON string")
    if param.normalize:
        value = param.normalize(value)
    if param.regex:
        for pattern in value if isinstance(value, list) else [value]:
            try:
                re.compile(pattern)
                re.compile(pattern.lower())  # the postscript check lower-cases its marker first
            except re.error as e:
                raise err(f"{pattern!r} is not a valid regular expression ({e}); IFEval matches this "
                          f"argument as a regular expression", "escape special characters with a backslash")
    return value


def bind(instruction_id: Any, kwargs: Any, *, file: str | Path = "<input>", line: int | None = None,
         index: int = 0) -> Instruction:
    """Validate one instruction of a prompt record and bind its arguments.

    ``None`` values in ``kwargs`` are treated as absent, so records in the Hugging Face
    ``google/IFEval`` layout (every argument key present, unused ones null) are accepted.

    Raises:
        DataError: Unknown id, unknown/missing argument, or an argument of the wrong type or range;
            the message names ``file``, ``line`` and the field ``kwargs[index].name``.
    """
    if not isinstance(instruction_id, str) or instruction_id not in INSTRUCTIONS:
        close = difflib.get_close_matches(str(instruction_id), INSTRUCTIONS, n=1)
        hint = f"did you mean '{close[0]}'? Otherwise use" if close else "use"
        raise DataError(file, line, f"instruction_id_list[{index}]",
                        f"unknown instruction id {instruction_id!r}",
                        f"{hint} one of the {len(INSTRUCTIONS)} IFEval ids: {', '.join(INSTRUCTIONS)}",
                        reason="unknown_instruction")
    itype = INSTRUCTIONS[instruction_id]
    if not isinstance(kwargs, dict):
        raise DataError(file, line, f"kwargs[{index}]", f"must be a JSON object, got {kwargs!r}",
                        "give one object of arguments per instruction ({} when it takes none)",
                        reason="invalid_kwargs")
    given = {k: v for k, v in kwargs.items() if v is not None}
    names = [p.name for p in itype.params]
    extra = sorted(set(given) - set(names))
    if extra:
        takes = f"takes only {', '.join(names)}" if names else "takes no arguments"
        raise DataError(file, line, f"kwargs[{index}].{extra[0]}",
                        f"{instruction_id} {takes}, got unexpected {', '.join(extra)}",
                        "remove the argument or check the instruction id", reason="invalid_kwargs")
    bound = {}
    for p in itype.params:
        fld = f"kwargs[{index}].{p.name}"
        if p.name not in given:
            raise DataError(file, line, fld, f"missing, {instruction_id} needs {', '.join(names)}",
                            f"add \"{p.name}\" to the instruction's arguments", reason="invalid_kwargs")

        def err(problem: str, fix: str, fld: str = fld) -> DataError:
            return DataError(file, line, fld, problem, fix, reason="invalid_kwargs")

        bound[p.name] = _validate(p, given[p.name], err)
    if itype.id == "length_constraints:nth_paragraph_first_word" and bound["nth_paragraph"] > bound["num_paragraphs"]:
        raise DataError(file, line, f"kwargs[{index}].nth_paragraph",
                        f"paragraph {bound['nth_paragraph']} asked for in a response of "
                        f"{bound['num_paragraphs']} paragraphs", "make nth_paragraph <= num_paragraphs",
                        reason="invalid_kwargs")
    return Instruction(itype, bound)
