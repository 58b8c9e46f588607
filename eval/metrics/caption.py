"""Captioning metrics as computed by the COCO caption toolkit (``pycocoevalcap``): BLEU-1..4 and
CIDEr-D, both against all references of each image.

* Tokenisation (:func:`tokenize_caption`) stands in for the toolkit's PTB tokenizer run with
  ``-lowerCase`` followed by its punctuation filter: lower-case, clitics split off the way the
  Penn Treebank does (``don't`` -> ``do n't``, ``dog's`` -> ``dog 's``), punctuation tokens
  dropped, everything else kept.
* BLEU (Papineni et al. 2002) is corpus-level, as the toolkit's ``Bleu(4)``: clipped n-gram
  counts and candidate n-gram totals are summed over the corpus, the reference length of each
  candidate is the *closest* reference length (the shorter one on a tie), and the brevity penalty
  ``exp(1 - r / c)`` applies when the summed candidate length ``c`` is below the summed reference
  length ``r``. The toolkit's smoothing constants (1e-15 added to matches, 1e-9 to totals) are
  kept, so a corpus without any 4-gram match scores a tiny positive BLEU-4, as it does there.
* CIDEr-D (Vedantam et al. 2015, the toolkit's ``Cider``): per n = 1..4, TF-IDF vectors with
  ``idf = log(#images) - log(max(1, df))``, df = number of images whose references contain the
  n-gram (computed over the evaluated set); candidate weights are clipped by the reference's
  (``min(cand, ref) * ref``), the cosine is multiplied by ``exp(-delta^2 / (2 * 6^2))``, averaged
  over references and over n, and scaled by 10. ``delta`` is the difference of the two
  sentences' *bigram* counts, exactly as in the toolkit (whose length variable is accumulated at
  n-gram index 1); it equals the difference in words whenever both sentences have >= 2 words.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Hashable, Mapping, NamedTuple, Sequence

BLEU_TINY, BLEU_SMALL = 1e-15, 1e-9   # the toolkit's smoothing constants (bleu_scorer.py)
CIDER_SIGMA = 6.0
CIDER_SCALE = 10.0
MAX_N = 4

# Tokens the toolkit's tokenizer filter removes (PTB brackets and quotes included).
PUNCTUATION_TOKENS = frozenset({"'", '"', "`", ".", "?", "!", ",", ":", ";", "-",
                                "(", ")", "[", "]", "{", "}"})
_TOKEN = re.compile(r"[^\W_]+(?:['\-./][^\W_]+)*|\S")
_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)")

Tokens = list[str]


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------

def tokenize_caption(text: str) -> Tokens:
    """COCO-toolkit-style tokens: lower-cased, PTB clitics split, punctuation dropped."""
    tokens = []
    for token in _TOKEN.findall(text.lower()):
        if token in PUNCTUATION_TOKENS:
            continue
        clitic = _CLITIC.fullmatch(token)
        tokens.extend(clitic.groups() if clitic else (token,))
    return tokens


def _tokenize_corpus(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
                     ) -> tuple[dict, dict]:
    """Check that every image has one candidate and >= 1 reference; tokenise both."""
    if set(candidates) != set(references):
        extra = sorted(map(str, set(candidates) ^ set(references)))
        raise ValueError(f"candidates and references cover different images, e.g. {extra[0]!r}")
    if not candidates:
        raise ValueError("no captions to score")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"image {key!r}: references must be a non-empty list of strings")
    cands = {key: tokenize_caption(text) for key, text in candidates.items()}
    refs = {key: [tokenize_caption(r) for r in texts] for key, texts in references.items()}
    return cands, refs


def ngram_counts(tokens: Tokens, max_n: int = MAX_N) -> Counter:
    """Counts of every n-gram (as a tuple) of ``tokens`` for n = 1..max_n."""
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_n + 1)
                   for i in range(len(tokens) - n + 1))


# ---------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------

def closest_reference_length(candidate_length: int, reference_lengths: Sequence[int]) -> int:
    """The reference length nearest the candidate's; the shorter one on a tie (toolkit rule)."""
    return min(reference_lengths, key=lambda length: (abs(length - candidate_length), length))


def bleu_tokens(candidates: Mapping[Hashable, Tokens], references: Mapping[Hashable, Sequence[Tokens]],
                max_n: int = MAX_N) -> dict[str, float]:
    """Corpus BLEU-1..max_n of tokenised captions (see the module docstring for the rules)."""
    matches, totals = [0] * max_n, [0] * max_n
    candidate_length = reference_length = 0
    for key, tokens in candidates.items():
        refs = references[key]
        clip = Counter()
        for ref in refs:  # clip each n-gram by its largest count in any one reference
            for gram, count in ngram_counts(ref, max_n).items():
                clip[gram] = max(clip[gram], count)
        for gram, count in ngram_counts(tokens, max_n).items():
            matches[len(gram) - 1] += min(count, clip[gram])
        for n in range(max_n):
            totals[n] += max(len(tokens) - n, 0)
        candidate_length += len(tokens)
        reference_length += closest_reference_length(len(tokens), [len(r) for r in refs])
    ratio = (candidate_length + BLEU_TINY) / (reference_length + BLEU_SMALL)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = {}, 1.0
    for n in range(max_n):
        product *= (matches[n] + BLEU_TINY) / (totals[n] + BLEU_SMALL)
        scores[f"bleu_{n + 1}"] = product ** (1 / (n + 1)) * brevity
    return scores


def bleu(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
         max_n: int = MAX_N) -> dict[str, float]:
    """Corpus BLEU-1..4 of raw captions: ``{"bleu_1": ..., "bleu_4": ...}``."""
    cands, refs = _tokenize_corpus(candidates, references)
    return bleu_tokens(cands, refs, max_n)


# ---------------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------------

class CiderScores(NamedTuple):
    score: float          # corpus CIDEr-D: mean of the per-image scores
    per_image: dict       # image key -> CIDEr-D


class _Vector(NamedTuple):
    weights: list[dict]   # per n-gram order: n-gram -> tf * idf
    norms: list[float]    # per order: Euclidean norm of the weights
    length: int           # number of bigrams (the toolkit's length; see the module docstring)


def document_frequency(references: Mapping[Hashable, Sequence[Tokens]], max_n: int = MAX_N) -> Counter:
    """For every n-gram, the number of images whose references (any of them) contain it."""
    df = Counter()
    for refs in references.values():
        df.update(set().union(*(ngram_counts(ref, max_n) for ref in refs)))
    return df


def _tfidf(tokens: Tokens, df: Counter, log_images: float, max_n: int) -> _Vector:
    weights = [dict() for _ in range(max_n)]
    squares = [0.0] * max_n
    bigrams = 0
    for gram, count in ngram_counts(tokens, max_n).items():
        order = len(gram) - 1
        weight = count * (log_images - math.log(max(1.0, df[gram])))
        weights[order][gram] = weight
        squares[order] += weight * weight
        bigrams += count if order == 1 else 0
    return _Vector(weights, [math.sqrt(s) for s in squares], bigrams)


def _cider_similarity(cand: _Vector, ref: _Vector, sigma: float) -> list[float]:
    """Per order: clipped TF-IDF cosine times the Gaussian length penalty."""
    penalty = math.exp(-((cand.length - ref.length) ** 2) / (2 * sigma ** 2))
    values = []
    for order, weights in enumerate(cand.weights):
        value = sum(min(w, ref.weights[order].get(g, 0.0)) * ref.weights[order].get(g, 0.0)
                    for g, w in weights.items())
        if cand.norms[order] != 0 and ref.norms[order] != 0:
            value /= cand.norms[order] * ref.norms[order]
        values.append(value * penalty)
    return values


def cider_d_tokens(candidates: Mapping[Hashable, Tokens], references: Mapping[Hashable, Sequence[Tokens]],
                   max_n: int = MAX_N, sigma: float = CIDER_SIGMA) -> CiderScores:
    """CIDEr-D of tokenised captions, document frequencies from ``references`` themselves."""
    df = document_frequency(references, max_n)
    log_images = math.log(float(len(references)))
    per_image = {}
    for key, tokens in candidates.items():
        cand = _tfidf(tokens, df, log_images, max_n)
        totals = [0.0] * max_n
        for ref_tokens in references[key]:
            sims = _cider_similarity(cand, _tfidf(ref_tokens, df, log_images, max_n), sigma)
            totals = [t + s for t, s in zip(totals, sims)]
        per_image[key] = CIDER_SCALE * (sum(totals) / max_n) / len(references[key])
    return CiderScores(score=sum(per_image.values()) / len(per_image), per_image=per_image)


def cider_d(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
            max_n: int = MAX_N, sigma: float = CIDER_SIGMA) -> CiderScores:
    """CIDEr-D of raw captions (one candidate per image, all its references)."""
    cands, refs = _tokenize_corpus(candidates, references)
    return cider_d_tokens(cands, refs, max_n, sigma)


def caption_scores(candidates: Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D in one pass of the tokenizer: ``{"bleu_1": .., "cider_d": ..}``."""
    cands, refs = _tokenize_corpus(candidates, references)
    return {**bleu_tokens(cands, refs), "cider_d": cider_d_tokens(cands, refs).score}
