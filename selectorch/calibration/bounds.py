"""Upper confidence bounds on a risk, as p-values of ``H0: risk > target``.

A p-value ``p <= delta`` rejects ``H0``, i.e. certifies ``risk <= target`` at level ``delta``.
"""

from __future__ import annotations

import math

BOUNDS = ("clopper-pearson", "hoeffding-bentkus")


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) <= k)``, summed in log space (exact, stable for large ``n``).

    Example:
        >>> round(binomial_cdf(0, 2, 0.5), 4)
        0.25
    """
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    terms = [
        base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


class BinomialCDFPath:
    """``P(Binomial(n, p) <= e)`` along a path where ``n`` grows one trial at a time.

    Each :meth:`add` appends one trial and raises ``e`` by 0 or 1, updating the CDF in O(1)
    with ``F(n + 1, e) = F(n, e) - p f(n, e)`` and ``F(n + 1, e + 1) = F(n + 1, e) +
    f(n + 1, e + 1)`` (``f`` the pmf, from ``lgamma``), where :func:`binomial_cdf` costs O(e)
    per call. Rounding can drift by a few ulps over many steps: callers that compare the value
    with a level recompute it exactly near that level.

    Example:
        >>> path = BinomialCDFPath(0.5)
        >>> path.add(0); path.add(1)
        >>> round(path.cdf, 4), round(binomial_cdf(1, 2, 0.5), 4)
        (0.75, 0.75)
    """

    def __init__(self, p: float) -> None:
        self.log_p, self.log_q = math.log(p), math.log1p(-p)
        self.p, self.n, self.e, self.cdf = p, 0, 0, 1.0

    def _pmf(self, k: int, n: int) -> float:
        if k < 0 or k > n:
            return 0.0
        return math.exp(
            math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * self.log_p + (n - k) * self.log_q
        )

    def add(self, step: int) -> None:
        """Append one trial; ``step`` (0 or 1) is how much ``e`` grows."""
        cdf = self.cdf - self.p * self._pmf(self.e, self.n)
        self.n += 1
        if step:
            self.e += 1
            cdf += self._pmf(self.e, self.n)
        self.cdf = min(1.0, max(0.0, cdf))


def clopper_pearson_pvalue(errors: int, n: int, target: float) -> float:
    """Exact binomial p-value of ``H0: risk > target`` after ``errors`` in ``n`` 0/1 losses.

    ``p <= delta`` exactly when the one-sided Clopper-Pearson upper bound at level ``delta``
    is at most ``target``.
    """
    return binomial_cdf(errors, n, target)


def hoeffding_bentkus_pvalue(mean_loss: float, n: int, target: float) -> float:
    """Hoeffding-Bentkus p-value of ``H0: risk > target`` for losses in [0, 1].

    ``min(exp(-n h(min(mean, target), target)), e * P(Binomial(n, target) <= ceil(n mean)))``
    with ``h(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b))`` (Bates et al. 2021,
    "Distribution-free, risk-controlling prediction sets").
    """
    if n == 0:
        return 1.0
    if target >= 1.0:
        return 0.0
    a, b = min(mean_loss, target), target
    h = (a * math.log(a / b) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - b))
    hoeffding = math.exp(-n * h)
    bentkus = math.e * binomial_cdf(math.ceil(n * mean_loss - 1e-9), n, target)
    return min(hoeffding, bentkus, 1.0)


def pvalue(bound: str, losses_sum: float, n: int, target: float, binary: bool) -> float:
    """p-value of ``H0: risk > target`` with the chosen bound."""
    if n == 0:
        return 1.0
    if bound == "clopper-pearson":
        if not binary:
            raise ValueError(
                "bound='clopper-pearson' needs 0/1 losses (correct/incorrect); use "
                "bound='hoeffding-bentkus' for losses in [0, 1]."
            )
        return clopper_pearson_pvalue(round(losses_sum), n, target)
    return hoeffding_bentkus_pvalue(losses_sum / n, n, target)


def upper_bound(bound: str, losses_sum: float, n: int, delta: float, binary: bool) -> float:
    """The ``1 - delta`` upper confidence bound on the risk: the smallest target not rejected.

    Found by bisection on the p-value (monotone in the target), to 1e-6.
    """
    if n == 0:
        return 1.0
    lo, hi = losses_sum / n, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if pvalue(bound, losses_sum, n, mid, binary) <= delta:
            hi = mid
        else:
            lo = mid
    return hi
