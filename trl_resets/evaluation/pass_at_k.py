"""An `evaluate` metric module: accuracy, mean score and pass@k from the scores of each item's samples.

Loaded by path (``evaluate.load(<this file>)``), so nothing is fetched from a hub. Each prediction is one
item's list of sample scores (a reward in [0, 1]); a sample passes when its score reaches
``pass_threshold`` (1.0: the right answer, or every test passed). pass@k is the unbiased estimator
1 - C(n - c, k) / C(n, k) per item (n samples, c of them passing), averaged over items.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Accuracy, mean score and pass@k over items, each scored on one or more samples."
_INPUTS = """
Args:
    predictions: one list of sample scores (floats in [0, 1]) per item; every item needs at least max(k) samples.
    k: the pass@k values to report (default: [1]).
    pass_threshold: the score at which a sample counts as passing (default: 1.0).
Returns:
    accuracy: mean over items of the fraction of passing samples (pass@1).
    mean_score: mean over items of the mean sample score.
    pass@k: for each k.
    items: the number of items.
"""


def pass_at_k(num_samples: int, num_passed: int, k: int) -> float:
    """The chance that at least one of k samples drawn without replacement from n passes (c of them do)."""
    if num_samples - num_passed < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_passed, k) / math.comb(num_samples, k)


class PassAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions, k=(1,), pass_threshold=1.0):
        ks = sorted({int(value) for value in k})
        if not predictions:
            return {"accuracy": math.nan, "mean_score": math.nan, "items": 0,
                    **{f"pass@{value}": math.nan for value in ks}}
        fewest = min(len(scores) for scores in predictions)
        if fewest == 0 or (ks and ks[0] < 1):
            raise ValueError(f"every item needs a sample and every k must be at least 1 (got k={ks}, an item with "
                             f"{fewest} samples).")
        if ks and ks[-1] > fewest:
            raise ValueError(f"pass@{ks[-1]} needs at least {ks[-1]} samples per item, but an item has {fewest}; "
                             f"draw more samples or lower k.")
        passed = [sum(score >= pass_threshold for score in scores) for scores in predictions]
        result = {
            "accuracy": sum(c / len(s) for c, s in zip(passed, predictions)) / len(predictions),
            "mean_score": sum(sum(s) / len(s) for s in predictions) / len(predictions),
            "items": len(predictions),
        }
        for value in ks:
            result[f"pass@{value}"] = sum(pass_at_k(len(s), c, value) for c, s in zip(passed, predictions)) / len(
                predictions)
        return result
