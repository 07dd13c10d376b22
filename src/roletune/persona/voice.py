"""voice_score: how much replies sound like the character's own lines, by a small classifier trained at eval
time (character n-grams and logistic regression, from scikit-learn; no neural model).

Its positives are the character's lines (the training replies); its negatives, lines that are not the
character's: the other speakers' (the training prompts) and the base model's replies to training prompts.
The replies it then scores answer the held-out prompts, which none of its lines came from. Its
cross-validated accuracy is reported beside the score: near 50%, the two sets are not separable and the
score says nothing.
"""
from __future__ import annotations

import random

NGRAMS = (1, 3)  # characters: Chinese has no spaces, and a voice lives in its particles and endings
MAX_LINES = 2000  # each side, drawn with a fixed seed: enough for n-gram weights, and seconds to fit
FOLDS = 5


def _pipeline():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=NGRAMS, sublinear_tf=True),
                         LogisticRegression(max_iter=1000, class_weight="balanced"))


class VoiceClassifier:
    """Fitted on the character's lines against other lines; `score(replies)` is the mean probability that a
    reply is the character's."""

    def __init__(self, character: list[str], others: list[str], seed: int = 0):
        from sklearn.model_selection import StratifiedKFold, cross_val_score

        draw = random.Random(seed)
        character = _sample(character, draw)
        others = _sample(others, draw)
        texts, labels = [*character, *others], [1] * len(character) + [0] * len(others)
        folds = min(FOLDS, len(character), len(others))
        if folds < 2:
            raise ValueError(f"the voice classifier needs 2 lines a side at least, got {len(character)} and "
                             f"{len(others)}")
        self.cv_accuracy = float(cross_val_score(_pipeline(), texts, labels, scoring="balanced_accuracy",
                                                 cv=StratifiedKFold(folds, shuffle=True, random_state=seed)).mean())
        self.sizes = {"character_lines": len(character), "other_lines": len(others)}
        self.model = _pipeline().fit(texts, labels)

    def score(self, replies: list[str]) -> float:
        if not replies:
            return float("nan")
        return float(self.model.predict_proba(replies)[:, 1].mean())


def _sample(lines: list[str], draw: random.Random) -> list[str]:
    lines = [line for line in lines if line.strip()]
    return draw.sample(lines, MAX_LINES) if len(lines) > MAX_LINES else lines
