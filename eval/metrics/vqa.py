"""Question-answering metrics: VQAv2 soft accuracy, exact match (GQA style), yes/no (POPE style).

**VQAv2 answer normalisation** follows the official evaluation script of the VQA challenge
(GT-Vision-Lab ``vqaEval.py``, Antol et al. 2015 / Goyal et al. 2017), rule by rule:

1. newlines and tabs become spaces, then surrounding whitespace is stripped;
2. punctuation (:func:`process_punctuation`): each mark of :data:`PUNCTUATION` is *deleted* when
   the text has it next to a space or contains a digit-comma-digit group such as ``1,000``, and is
   otherwise *replaced by a space*; then every period not followed by a digit is deleted (so
   ``3.5`` keeps its decimal point, ``yes.`` loses its full stop);
3. digits and articles (:func:`process_digit_article`): the text is lower-cased and split on
   whitespace; number words map to digits through :data:`MANUAL_MAP` (``"none"`` -> ``"0"``),
   the articles ``a``, ``an``, ``the`` are dropped, and apostrophe-less contractions are restored
   from :data:`CONTRACTIONS` (``"dont"`` -> ``"don't"``).

**Soft accuracy** (the official formula): with the ten annotator answers, for each annotator the
prediction scores ``min(#matching answers among the other nine / 3, 1)``; the answer's accuracy is
the mean over the ten leave-one-out subsets. Like the official script, the annotator answers go
through the punctuation rule only (the annotations were normalised when collected), and only when
they disagree; ``normalise_references=True`` applies the full normalisation to them instead, for
data sets whose references are raw text.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Hashable, Iterable, Mapping, NamedTuple, Sequence

# Punctuation marks handled by rule 2 (the apostrophe and colon are deliberately absent).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) look-ahead that
# always succeeds at a period, so in effect a period is removed unless a digit follows it.
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official call is ``periodStrip.sub("", text, re.UNICODE)``: re.UNICODE (32) lands in the
# ``count`` argument, so at most 32 periods are removed. Kept for bit-exact agreement.
OFFICIAL_PERIOD_LIMIT = 32
ARTICLES = frozenset({"a", "an", "the"})
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
              "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# The official contractions table, entry for entry (its capitalised keys such as "Im" can never
# match, since rule 3 lower-cases first; they are kept so the table is the published one).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
SOFT_ACCURACY_MATCHES = 3   # an answer given by 3 other annotators counts as fully correct


# ---------------------------------------------------------------------------------------------
# Normalisation (official VQAv2 rules; see the module docstring)
# ---------------------------------------------------------------------------------------------

def process_punctuation(text: str) -> str:
    """Rule 2: delete or space out :data:`PUNCTUATION`, then drop periods not before a digit.

    Whether a mark is deleted or replaced by a space is decided on the *input* text, mark by
    mark, exactly as the official script does.
    """
    has_digit_comma = DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=OFFICIAL_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """Rule 3: lower-case, number words -> digits, drop articles, restore contractions."""
    words = [MANUAL_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """The full official normalisation of one answer (rules 1-3)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


# ---------------------------------------------------------------------------------------------
# VQAv2 soft accuracy
# ---------------------------------------------------------------------------------------------

def prepare_references(answers: Sequence[str], normalise_references: bool = False) -> list[str]:
    """Annotator answers as the official script compares them: punctuation rule only, and only
    when the answers are not all identical (or the full normalisation when asked)."""
    answers = [str(a) for a in answers]
    if normalise_references:
        return [normalize_answer(a) for a in answers]
    if len(set(answers)) > 1:
        return [process_punctuation(a) for a in answers]
    return answers


def vqa_soft_accuracy(prediction: str, answers: Sequence[str],
                      normalise_references: bool = False) -> float:
    """Official VQAv2 accuracy of one prediction against its annotator answers (usually 10):
    ``mean_i min(#{j != i : answer_j == prediction} / 3, 1)`` after normalisation.

    With 10 answers of which k equal the prediction this is 0.3 k for k <= 2 (k = 2 gives 0.6),
    0.9 for k = 3 and 1.0 for k >= 4.
    """
    if not answers:
        raise ValueError("vqa_soft_accuracy needs at least one reference answer")
    predicted = normalize_answer(prediction)
    references = prepare_references(answers, normalise_references)
    matches = sum(reference == predicted for reference in references)
    per_subset = []
    for reference in references:  # leave annotator i out: matches among the others
        others = matches - (reference == predicted)
        per_subset.append(min(others / SOFT_ACCURACY_MATCHES, 1.0))
    return sum(per_subset) / len(per_subset)


class VQAScores(NamedTuple):
    overall: float                      # mean soft accuracy in [0, 1]
    per_answer_type: dict[str, float]   # e.g. "yes/no", "number", "other"
    per_question: dict                  # question id -> soft accuracy


def vqa_scores(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]],
               answer_types: Mapping[Hashable, str] | None = None,
               normalise_references: bool = False) -> VQAScores:
    """Soft accuracy over a set of questions (every question of ``answers`` must be predicted),
    averaged overall and per answer type, as the official script reports (as fractions)."""
    missing = [qid for qid in answers if qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} questions have no prediction, e.g. question {missing[0]!r}")
    per_question = {qid: vqa_soft_accuracy(predictions[qid], refs, normalise_references)
                    for qid, refs in answers.items()}
    by_type: dict[str, list[float]] = defaultdict(list)
    for qid, score in per_question.items():
        if answer_types is not None and qid in answer_types:
            by_type[answer_types[qid]].append(score)
    return VQAScores(overall=_mean(per_question.values()),
                     per_answer_type={t: _mean(s) for t, s in sorted(by_type.items())},
                     per_question=per_question)


# ---------------------------------------------------------------------------------------------
# Exact match (GQA style) and yes/no (POPE style)
# ---------------------------------------------------------------------------------------------

def exact_match(prediction: str, answer: str) -> bool:
    """GQA-style accuracy of one answer: a single reference, correct only when equal after the
    VQAv2 normalisation of both (so "Two." matches "2", "the left" matches "left")."""
    return normalize_answer(prediction) == normalize_answer(answer)


def exact_match_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of :func:`exact_match` hits over aligned prediction/answer lists."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    return _mean(exact_match(p, a) for p, a in zip(predictions, answers))


def yes_no_label(text: str) -> str:
    """Map a free-form reply to "yes"/"no" with POPE's rule (Li et al. 2023, as in LLaVA's
    ``eval_pope.py``): keep the first sentence, drop commas, and answer "no" when one of its
    words is "no", "No" or "not"; anything else counts as "yes"."""
    sentence = text.split(".")[0].replace(",", "")
    words = sentence.split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


class YesNoScores(NamedTuple):
    accuracy: float
    precision: float    # of "yes" predictions; 0.0 when nothing was predicted "yes"
    recall: float       # of "yes" labels; 0.0 when no label is "yes"
    f1: float           # harmonic mean of the two; 0.0 when both are 0
    yes_ratio: float    # fraction of predictions that are "yes" (POPE reports it for bias)


def yes_no_scores(predictions: Sequence[str], labels: Sequence[str]) -> YesNoScores:
    """POPE-style binary metrics with "yes" as the positive class. Predictions are free text
    (mapped by :func:`yes_no_label`); labels must be "yes" or "no" (any case)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("yes_no_scores needs at least one labelled question")
    gold = [label.strip().lower() for label in labels]
    bad = [label for label in gold if label not in ("yes", "no")]
    if bad:
        raise ValueError(f"yes/no labels must be 'yes' or 'no', got {bad[0]!r}")
    guessed = [yes_no_label(p) for p in predictions]
    tp = sum(g == "yes" and y == "yes" for g, y in zip(guessed, gold))
    fp = sum(g == "yes" and y == "no" for g, y in zip(guessed, gold))
    fn = sum(g == "no" and y == "yes" for g, y in zip(guessed, gold))
    tn = len(gold) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return YesNoScores(accuracy=(tp + tn) / len(gold), precision=precision, recall=recall, f1=f1,
                       yes_ratio=(tp + fp) / len(gold))


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        raise ValueError("nothing to average: no questions given")
    return float(sum(values)) / len(values)
