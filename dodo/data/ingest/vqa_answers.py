"""VQA v2 answers: the official answer normalisation, soft scores and the answer vocabulary.

Torch-free (submit-time checks read the vocabulary through ``describe``-level code).

Normalisation. VQA v2's evaluation (``vqaEval.py`` of the official VQA API, which ViLT, VLMo and
BEiT-3 reuse to build their answer lists) compares answers after: newlines / tabs to spaces;
punctuation removed (or turned into a space when it joins two words, e.g. "t-shirt" ->
"t shirt"); periods not inside a number removed; lower case; number words to digits ("two" ->
"2", "none" -> "0"); the articles a / an / the dropped; apostrophe-less contractions restored
("dont" -> "don't"). No package on the index ships that function (the API is a script in the
VQA repository, not an installable package), so it is written out here, rule for rule; the
contraction table is the official one's common entries (it lists ~170 rare spellings as well).

Soft score of an answer = min(1, #annotators who gave it / 3) over the 10 human answers (the
training target as this project states it). The official metric (``official_accuracy``)
averages min(1, matches / 3) over the 10 leave-one-out subsets of 9 annotators: 0.3 / 0.6 /
0.9 / 1 for 1 / 2 / 3 / 4+ annotators, which is also what ViLT's and VLMo's code train on.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Mapping, Sequence

# The official evaluation's punctuation list (the apostrophe is kept: contractions).
PUNCT: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                          ">", "<", "@", "`", ",", "?", "!")
# A period not followed by a digit ("5." -> "5", "1.5" kept). The official pattern reads
# "(?!<=\d)(\.)(?!\d)"; its first group is a no-op lookahead, so this is what it does.
_PERIOD = re.compile(r"\.(?!\d)")
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")  # "1,000": commas are then removed, not spaced
NUMBERS: dict[str, str] = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                           "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's",
    "someones": "someone's", "thats": "that's", "thered": "there'd", "theres": "there's", "theyd": "they'd",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
DEFAULT_MIN_COUNT = 9  # the standard 3,129-answer list: answers given >= 9 times (train + val)


def normalize_answer(text: str) -> str:
    """One answer as the official VQA evaluation compares it (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    join = _COMMA_NUMBER.search(text) is not None
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or join:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [NUMBERS.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def answer_counts(answers: Iterable[str]) -> dict[str, int]:
    """The 10 annotators' answers -> {normalised answer: how many gave it}."""
    counts = Counter(normalize_answer(a) for a in answers)
    counts.pop("", None)  # an answer that was only punctuation
    return dict(counts)


def soft_score(count: int) -> float:
    """min(1, count / 3): 3 or more of the 10 annotators agreeing is a fully correct answer."""
    return min(1.0, count / 3.0)


def official_accuracy(count: int, annotators: int = 10) -> float:
    """The official VQA accuracy of an answer ``count`` of the ``annotators`` gave (vqaEval.py):
    min(1, matches among the other annotators / 3), averaged over leaving each annotator out.
    For 10 annotators: 0, 0.3, 0.6, 0.9, 1 for 0, 1, 2, 3, 4+ (the targets ViLT's and VLMo's
    released code train on)."""
    if annotators <= 1:
        return soft_score(count)
    left_in = (annotators - count) * min(1.0, count / 3.0)  # the left-out annotator gave another answer
    left_out = count * min(1.0, (count - 1) / 3.0)  # the left-out annotator gave this one
    return (left_in + left_out) / annotators


def vocabulary(majority: Iterable[str], min_count: int) -> list[str]:
    """Answers whose (normalised) majority answer count is >= ``min_count``, most frequent
    first (ties alphabetical, so the list is a pure function of the data)."""
    counts = Counter(normalize_answer(a) for a in majority)
    counts.pop("", None)
    return [a for a, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]


def score_vector(counts: Mapping[str, int], index: Mapping[str, int], size: int,
                 official: bool = False) -> list[float]:
    """{answer: count} -> soft scores (``official``: the official accuracy) over a vocabulary
    (``index``: answer -> position); answers outside the vocabulary cannot be predicted and are
    left out (their score is lost)."""
    out = [0.0] * size
    total = sum(counts.values())
    for answer, n in counts.items():
        j = index.get(answer)
        if j is not None:
            out[j] = official_accuracy(n, total) if official else soft_score(n)
    return out


def best_possible(counts_per_question: Sequence[Mapping[str, int]], index: Mapping[str, int]) -> float:
    """The VQA score an oracle choosing within the vocabulary reaches (the vocabulary's ceiling)."""
    if not counts_per_question:
        return 0.0
    return sum(max((soft_score(n) for a, n in c.items() if a in index), default=0.0)
               for c in counts_per_question) / len(counts_per_question)
