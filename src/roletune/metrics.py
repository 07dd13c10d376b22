"""Text metrics for comparing generated replies with reference replies: BLEU-4, ROUGE-L,
distinct-n and mean length, all on one tokenization, `metric_tokens`.

Why these are written here rather than imported: the replies are mostly Chinese, which has no
spaces, so every metric must count Chinese as characters and space-separated text as words,
and BLEU, ROUGE-L and distinct-n must share that one rule or their numbers stop being
comparable. `rouge-score` drops non-ASCII text in its default tokenizer, so Chinese replies
score 0; sacrebleu computes the BLEU below exactly (the tests use it as a cross-check), but it
would be a runtime dependency for one function and brings its own tokenizers. Everything here
is pure Python and fast enough for the few thousand replies an eval set holds.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter

BLEU_MAX_ORDER = 4

# One token per character: CJK ideographs (with the extension planes), kana, hangul, bopomofo,
# CJK symbols and punctuation (。、「」; not U+3000, the ideographic space, which is whitespace),
# and the half-/full-width forms block (，！？：；).
_CJK = ("\u1100-\u11ff\u2e80-\u2fdf\u3001-\u9fff\ua960-\ua97f\uac00-\ud7ff"
        "\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003ffff")
_PUNCT = re.escape(string.punctuation)
# Within one whitespace-separated chunk: a CJK character, an ASCII punctuation mark, or a run of
# anything else (Latin letters, digits, other scripts).
_TOKEN = re.compile(f"[{_CJK}]|[{_PUNCT}]|[^{_CJK}{_PUNCT}]+")


def metric_tokens(text: str) -> list[str]:
    """Split text into the tokens every metric here counts: characters for Chinese text, words
    for space-separated text.

    Each CJK character (ideograph, kana, hangul, full-width punctuation) is one token; other
    text is split on whitespace into words, and each ASCII punctuation mark becomes a token of
    its own, so `hello, world!` gives `hello , world !` and `我爱NLP课` gives `我 爱 NLP 课`.
    Punctuation inside a word is split too (`don't` -> `don ' t`, `3.14` -> `3 . 14`); that
    costs nothing in comparisons because references are tokenized the same way.
    """
    return [token for chunk in text.split() for token in _TOKEN.findall(chunk)]


def bleu4(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 in 0..100 (Papineni et al. 2002), one reference per hypothesis.

    N-gram matches (clipped by the reference's counts) and lengths are summed over the corpus
    before the precisions are taken, so this is not a mean of sentence scores. Uniform weights
    over orders 1-4; brevity penalty exp(1 - ref_len / hyp_len) when the hypotheses are shorter
    in total. An order with no match is smoothed as sacrebleu's default ("exp", the NIST
    smoothing of mteval-v13a.pl): the k-th such order counts as 1 / 2**k matches. It equals
    `sacrebleu.corpus_bleu(hyps, [refs], tokenize="none")` on text pre-joined from
    `metric_tokens`. 0.0 when there is nothing to score.
    """
    matches = [0] * BLEU_MAX_ORDER
    totals = [0] * BLEU_MAX_ORDER
    hyp_len = ref_len = 0
    for hypothesis, reference in _paired(hypotheses, references):
        hyp_tokens, ref_tokens = metric_tokens(hypothesis), metric_tokens(reference)
        hyp_len += len(hyp_tokens)
        ref_len += len(ref_tokens)
        for n in range(1, BLEU_MAX_ORDER + 1):
            hyp_counts = Counter(_ngrams(hyp_tokens, n))
            totals[n - 1] += sum(hyp_counts.values())
            # Counter & keeps the smaller count: a hypothesis n-gram is credited at most as
            # often as the reference has it (the "clipped" count).
            matches[n - 1] += sum((hyp_counts & Counter(_ngrams(ref_tokens, n))).values())
    return _bleu_from_counts(matches, totals, hyp_len, ref_len)


def _bleu_from_counts(matches: list[int], totals: list[int], hyp_len: int, ref_len: int) -> float:
    # No match at all, or no hypothesis long enough for a 4-gram: sacrebleu floors the log of
    # the missing precision, which makes the score exactly 0.
    if not any(matches) or not all(totals):
        return 0.0
    log_precision = 0.0
    unmatched_orders = 0
    for n_matches, n_total in zip(matches, totals):
        if n_matches == 0:
            unmatched_orders += 1
            log_precision += math.log(1 / (2 ** unmatched_orders * n_total))
        else:
            log_precision += math.log(n_matches / n_total)
    brevity_penalty = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * brevity_penalty * math.exp(log_precision / BLEU_MAX_ORDER)


def rouge_l(hypotheses: list[str], references: list[str]) -> float:
    """Mean over pairs of the ROUGE-L F1 (beta = 1) in 0..100, from the longest common
    subsequence of `metric_tokens`. A pair with an empty hypothesis or reference scores 0."""
    pairs = _paired(hypotheses, references)
    if not pairs:
        return 0.0
    return 100 * sum(_rouge_l_f1(metric_tokens(h), metric_tokens(r)) for h, r in pairs) / len(pairs)


def _rouge_l_f1(hyp_tokens: list[str], ref_tokens: list[str]) -> float:
    lcs = _lcs_length(hyp_tokens, ref_tokens)
    if lcs == 0:  # also every pair with an empty side
        return 0.0
    precision, recall = lcs / len(hyp_tokens), lcs / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence: O(len(a) * len(b)) time, one row of memory
    as long as the shorter sequence."""
    if len(a) < len(b):
        a, b = b, a
    # row[j] is the LCS of the prefix of `a` read so far and b[:j].
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # the previous row's row[j - 1]
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / total n-grams over all texts, in 0..1 (Li et al. 2016): how little
    the replies repeat themselves and each other. N-grams do not cross from one text to the
    next. 0.0 when no text has n tokens."""
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got n={n}")
    _check_texts(texts)
    ngrams = [ngram for text in texts for ngram in _ngrams(metric_tokens(text), n)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def mean_length(texts: list[str]) -> float:
    """Mean number of `metric_tokens` per text; 0.0 for no texts."""
    _check_texts(texts)
    return sum(len(metric_tokens(text)) for text in texts) / len(texts) if texts else 0.0


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _check_texts(*lists) -> None:
    # A single string would be read as a list of characters and give a plausible, wrong score.
    if any(isinstance(texts, str) for texts in lists):
        raise TypeError("pass a list of texts, not one string")


def _paired(hypotheses: list[str], references: list[str]) -> list[tuple[str, str]]:
    _check_texts(hypotheses, references)
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; "
                         "each hypothesis needs exactly one reference")
    return list(zip(hypotheses, references))
