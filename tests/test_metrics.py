import math
import random

import pytest

from roletune.metrics import bleu4, distinct_n, mean_length, metric_tokens, rouge_l


# --- tokenization: characters for Chinese text, words for space-separated text ---

@pytest.mark.parametrize("text, tokens", [
    ("我爱你。", ["我", "爱", "你", "。"]),
    ("你好，世界！", ["你", "好", "，", "世", "界", "！"]),  # full-width punctuation
    ("hello, world!", ["hello", ",", "world", "!"]),
    ("我爱NLP课", ["我", "爱", "NLP", "课"]),
    ("用Python 3写代码!", ["用", "Python", "3", "写", "代", "码", "!"]),
    ("こんにちは 안녕", ["こ", "ん", "に", "ち", "は", "안", "녕"]),
    ("你好\u3000世界", ["你", "好", "世", "界"]),  # the ideographic space separates, it is no token
    ("don't stop", ["don", "'", "t", "stop"]),
    ("", []),
    (" \n\t ", []),
])
def test_metric_tokens(text, tokens):
    assert metric_tokens(text) == tokens


# --- BLEU-4, hand-computed ---

def test_bleu4_partial_matches_with_exp_smoothing():
    # hyp: the cat sat on the mat   ref: the cat is on the mat   (6 tokens each, no brevity penalty)
    # 1-grams: the x2, cat, on, mat match        -> 5/6
    # 2-grams: "the cat", "on the", "the mat"     -> 3/5
    # 3-grams: "on the mat"                       -> 1/4
    # 4-grams: none of 3 match; first unmatched order -> 1 / (2**1 * 3) = 1/6
    # BLEU = 100 * (5/6 * 3/5 * 1/4 * 1/6) ** (1/4) = 100 * (1/48) ** (1/4)
    assert bleu4(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(100 * 48 ** -0.25)


def test_bleu4_clips_counts_and_doubles_smoothing_per_unmatched_order():
    # hyp 的的的的 vs ref 我的书的 (4 tokens each)
    # 1-grams: hyp has 的 x4, ref has 的 x2 -> clipped to 2/4
    # 2-grams 0/3 -> 1/(2*3);  3-grams 0/2 -> 1/(4*2);  4-grams 0/1 -> 1/(8*1)
    # BLEU = 100 * (1/2 * 1/6 * 1/8 * 1/8) ** (1/4) = 100 * (1/768) ** (1/4)
    assert bleu4(["的的的的"], ["我的书的"]) == pytest.approx(100 * 768 ** -0.25)


def test_bleu4_brevity_penalty():
    # hyp 我爱北京 (4) is a prefix of ref 我爱北京天安门 (7): every precision is 1,
    # so BLEU = 100 * exp(1 - 7/4)
    assert bleu4(["我爱北京"], ["我爱北京天安门"]) == pytest.approx(100 * math.exp(-0.75))


def test_bleu4_sums_counts_over_the_corpus():
    # pair 1 identical (4 tokens), pair 2 disjoint (3 tokens); lengths 7 vs 7.
    # 1-grams 4/7, 2-grams 3/5, 3-grams 2/3, 4-grams 1/1 -> 100 * (8/35) ** (1/4) ~ 69.1,
    # not the mean of the sentence scores (100 and 0).
    assert bleu4(["a b c d", "x y z"], ["a b c d", "p q r"]) == pytest.approx(100 * (8 / 35) ** 0.25)


def test_bleu4_edge_cases():
    assert bleu4(["我爱北京天安门", "hello, world!"], ["我爱北京天安门", "hello, world!"]) == pytest.approx(100)
    assert bleu4([], []) == 0.0
    assert bleu4(["", ""], ["", ""]) == 0.0
    assert bleu4([""], ["我爱北京"]) == 0.0
    assert bleu4(["甲乙丙丁"], ["戊己庚辛"]) == 0.0  # no n-gram matches
    assert bleu4(["你好"], ["你好"]) == 0.0  # no hypothesis has a 4-gram: BLEU-4 is 0, as in sacrebleu
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu4(["a", "b"], ["a"])
    with pytest.raises(TypeError):
        bleu4("我爱北京", "我爱北京")


# --- ROUGE-L ---

def test_rouge_l_hand_computed():
    # 我爱北京天安门 (7) vs 我在北京看天安门 (8): LCS 我北京天安门 = 6
    # P = 6/7, R = 6/8, F1 = 2PR/(P+R) = 2*6/(7+8) = 0.8
    assert rouge_l(["我爱北京天安门"], ["我在北京看天安门"]) == pytest.approx(80)
    # order matters: "a b c" vs "c b a" has LCS 1 -> F1 = 2*1/(3+3)
    assert rouge_l(["a b c"], ["c b a"]) == pytest.approx(100 / 3)
    # mean over pairs: 80 and an empty hypothesis (0) -> 40
    assert rouge_l(["我爱北京天安门", ""], ["我在北京看天安门", "你好"]) == pytest.approx(40)


def naive_lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def test_rouge_l_matches_full_table_lcs():
    # The one-row LCS against the textbook full table, both argument orders (the shorter
    # sequence becomes the row, so length order exercises the swap).
    rng = random.Random(0)
    for _ in range(200):
        hyp = "".join(rng.choice("甲乙丙丁戊") for _ in range(rng.randint(1, 12)))
        ref = "".join(rng.choice("甲乙丙丁戊") for _ in range(rng.randint(1, 12)))
        expected = 100 * 2 * naive_lcs(hyp, ref) / (len(hyp) + len(ref))
        assert rouge_l([hyp], [ref]) == pytest.approx(expected)
        assert rouge_l([ref], [hyp]) == pytest.approx(expected)


def test_rouge_l_edge_cases():
    assert rouge_l(["你好，世界！"], ["你好，世界！"]) == pytest.approx(100)
    assert rouge_l([], []) == 0.0
    assert rouge_l([""], [""]) == 0.0
    assert rouge_l(["你好"], [""]) == 0.0
    with pytest.raises(ValueError):
        rouge_l(["a"], [])


# --- distinct-n and length ---

def test_distinct_n_hand_computed():
    # 我爱你 / 我爱他: unigrams 我 爱 你 我 爱 他 -> 4 distinct / 6
    # bigrams 我爱 爱你 我爱 爱他 -> 3 distinct / 4 (no bigram 你我 across the two texts)
    texts = ["我爱你", "我爱他"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)


def test_distinct_n_edge_cases():
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["", "你"], 2) == 0.0  # no text has 2 tokens
    assert distinct_n(["hello, world!"], 1) == 1.0
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n(["你好"], 0)


def test_mean_length():
    # 我 爱 NLP 课 (4) + hello , world ! (4) + "" (0) -> 8/3
    assert mean_length(["我爱NLP课", "hello, world!", ""]) == pytest.approx(8 / 3)
    assert mean_length([]) == 0.0


# --- cross-check with sacrebleu ---

CHINESE = "我你他她的了是在有不人这中大为上个国说们到和地也子时道出而要于就下得可那过心好看天"
ENGLISH = ["the", "cat", "sat", "on", "a", "mat", "and", "you", "said", "hello", "world", "it", "is"]


def random_sentence(rng):
    if rng.random() < 0.5:
        tokens = [rng.choice(CHINESE) for _ in range(rng.randint(1, 25))]
        return "".join(tokens) + rng.choice(["", "。", "！", "？"])
    words = [rng.choice(ENGLISH) + rng.choice(["", "", "", ",", "!"]) for _ in range(rng.randint(1, 15))]
    return " ".join(words)


def related_reference(rng, hypothesis):
    # Edit some tokens so pairs share n-grams of every order, and lengths differ both ways.
    tokens = metric_tokens(hypothesis)
    edited = []
    for token in tokens:
        roll = rng.random()
        if roll < 0.1:
            continue
        edited.append(rng.choice(CHINESE) if roll < 0.25 else token)
        if roll > 0.9:
            edited.append(rng.choice(ENGLISH))
    return " ".join(edited)


def random_pairs(seed, n=50):
    rng = random.Random(seed)
    hyps = [random_sentence(rng) for _ in range(n)]
    refs = [related_reference(rng, h) if rng.random() < 0.8 else random_sentence(rng) for h in hyps]
    return hyps, refs


@pytest.mark.parametrize("seed", range(5))
def test_bleu4_equals_sacrebleu(seed):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = random_pairs(seed)
    joined_hyps = [" ".join(metric_tokens(h)) for h in hyps]
    joined_refs = [" ".join(metric_tokens(r)) for r in refs]
    expected = sacrebleu.corpus_bleu(joined_hyps, [joined_refs], tokenize="none").score
    assert 0 < expected < 100
    assert bleu4(hyps, refs) == pytest.approx(expected, abs=1e-6)
    # Single pairs reach the smoothing, no-match and no-4-gram branches far more often.
    for hyp, ref, joined_hyp, joined_ref in zip(hyps, refs, joined_hyps, joined_refs):
        expected = sacrebleu.corpus_bleu([joined_hyp], [[joined_ref]], tokenize="none").score
        assert bleu4([hyp], [ref]) == pytest.approx(expected, abs=1e-6)
