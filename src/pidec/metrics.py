"""Answer metrics shared by the tasks: SQuAD's exact match and token F1, and ROUGE.

The SQuAD normalisation is the official script's (v1.1 and v2.0 alike): lower case, drop
punctuation, drop the articles a/an/the, collapse whitespace. ROUGE is Google's `rouge-score`
package (the one the summarisation literature reports), with the Porter stemmer; ROUGE-Lsum
splits summaries into sentences at newlines, as that package does.
"""

from __future__ import annotations

import re
import string
from collections import Counter

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def squad_normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact(prediction: str, gold: str) -> float:
    return float(squad_normalize(prediction) == squad_normalize(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token F1 after normalisation; an empty answer (SQuAD 2.0's "no answer") scores 1 only
    against an empty one."""
    pred, ref = squad_normalize(prediction).split(), squad_normalize(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over(metric, prediction: str, golds: list[str]) -> float:
    """The best score over the accepted answers (SQuAD's max over gold answers); no gold
    answer at all means the question has none, scored against the empty answer."""
    return max(metric(prediction, g) for g in (golds or [""]))


class Rouge:
    """ROUGE F-measures, x100. Built once: the scorer's tokenizer and stemmer are reused."""

    def __init__(self, types: tuple[str, ...] = ROUGE_TYPES, stemmer: bool = True):
        try:
            from rouge_score import rouge_scorer
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError("ROUGE needs the rouge-score package: pip install rouge-score") from e
        self.types = types
        self._scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=stemmer)

    def pair(self, prediction: str, reference: str) -> dict[str, float]:
        scores = self._scorer.score(reference, prediction)
        return {t: 100.0 * scores[t].fmeasure for t in self.types}

    def mean(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        """Mean over pairs of each pair's F-measure (what rouge-score's users report)."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        if not predictions:
            return {t: 0.0 for t in self.types}
        total = Counter()
        for p, r in zip(predictions, references):
            total.update(self.pair(p, r))
        return {t: total[t] / len(predictions) for t in self.types}
