"""Statistics of accuracies: the binomial standard error, differences within noise, mean and sample std.

A difference within ``NOISE_Z`` standard errors is called within noise. Example::

    >>> round(accuracy_se(0.85, 2000), 4)
    0.008
    >>> mean_std([1.0, 3.0])
    (2.0, 1.4142135623730951)
"""

from __future__ import annotations

import math

__all__ = ["NOISE_Z", "accuracy_se", "compare_accuracy", "mean_std", "finite"]


# A difference within NOISE_Z standard errors (about 95 % for a normal estimate) is called within noise.
NOISE_Z = 2.0


def accuracy_se(accuracy: float, n: int | None) -> float | None:
    """Binomial standard error of an accuracy measured on ``n`` test samples: sqrt(p(1-p)/n).

    About 0.008 (0.8 point) for p = 0.85 on 2,000 images. None when ``n`` is unknown.

    >>> round(accuracy_se(0.85, 2000), 4)
    0.008
    """
    if not n:
        return None
    return math.sqrt(max(0.0, accuracy * (1.0 - accuracy)) / n)


def compare_accuracy(first: dict, second: dict, z: float = NOISE_Z) -> dict:
    """``second``'s accuracy minus ``first``'s (``stage`` minus ``against``), with the standard error of
    the difference.

    The two errors are combined as for independent samples, sqrt(se1^2 + se2^2):
    both models are scored on the same test images, so this is on the cautious
    side. ``within_noise`` is None when either error is unknown. An error of 0
    (both scores 0 % or 100 %) is exact: a difference of 0 is within noise (``z``
    0), any other is beyond it, by infinitely many errors, which no JSON number
    says (``z`` None).

    >>> perfect = {"stage": "student", "accuracy": 1.0, "accuracy_se": 0.0}
    >>> compare_accuracy(perfect, {**perfect, "stage": "distilled"})["within_noise"]
    True
    """
    difference = second["accuracy"] - first["accuracy"]
    se1, se2 = first.get("accuracy_se"), second.get("accuracy_se")
    se = math.sqrt(se1**2 + se2**2) if se1 is not None and se2 is not None else None
    if se is None:
        ratio, within = None, None
    elif se > 0:
        ratio, within = difference / se, abs(difference) <= z * se
    else:
        within = difference == 0
        ratio = 0.0 if within else None
    return {
        "stage": second["stage"],
        "against": first["stage"],
        "difference": difference,
        "se": se,
        "z": ratio,
        "within_noise": within,
        "noise_z": z,
    }


def finite(value) -> int | float | None:
    """``value`` when it is a finite number (not a bool), else None: numbers read from a file (a curve, the
    latency cache) are checked with it."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (n - 1; None for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
