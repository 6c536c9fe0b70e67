"""L2-regularized linear models on F >> N standardized features, fitted exactly in the span of the N training rows.

Why: the baseline's statistics are wide (Whisper base: 7,168 per utterance;
WavLM Large: 51,200) next to the training utterances of a fold (hundreds to
~4,400 on IEMOCAP). Every iteration of a logistic-regression solver on the
(N, F) rows costs O(N F), and scikit-learn's Ridge, given F > N, builds the
(N, N) Gram matrix X X^T again for every alpha.

Why it is exact: a linear model with an L2 penalty on its weights and a free
intercept has its optimal weights in the span of the training rows (the
representer theorem: the loss's gradient in w is a combination of the rows,
the penalty's is w, and the free intercept's optimality makes the
combination's coefficients sum to zero). So the same objective can be
written on the rows' coordinates z_i = Q^T x_i in an orthonormal basis Q
(F, r) of that span, r <= N: ||w|| = ||Q^T w|| for w in the span, and
w . x = (Q^T w) . z for a training row. Its optimum v maps back to w = Q v,
the optimum of the plain fit; a held-out row x enters through Q^T x. Only
inner products are needed: K = X X^T (N, N) and X_val X^T, one pass over the
features, in float64.

The basis: a pivoted Cholesky factor of K + gamma 1 1^T, which is the Gram
matrix of the rows with a constant feature sqrt(gamma) appended. The
constant feature keeps the factorization away from the exact zero
eigenvalue that centering puts along 1 (the scaler's training mean makes the
rows sum to zero), and it changes no optimum: the free intercept absorbs
whatever weight it would get, so that weight is zero. Pivoting drops exactly
dependent rows (e.g. two frameless utterances' identical zero statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURE_BLOCK = 2048  # columns standardized in float64 at a time: (N, 2048) float64 is 72 MB at N = 4,400
RANK_TOL = 1e-10  # relative to the largest diagonal entry: residuals below it are rounding, not directions


def standardized_blocks(x: np.ndarray, mean: np.ndarray, scale: np.ndarray, block: int = FEATURE_BLOCK):
    """Yield (columns, (N, b) float64 standardized block) over the features of (N, F) rows x."""
    for lo in range(0, x.shape[1], block):
        cols = slice(lo, min(lo + block, x.shape[1]))
        yield cols, (x[:, cols].astype(np.float64) - mean[cols]) / scale[cols]


def gram(x: np.ndarray, other: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """K = X X^T (N, N) and X_other X^T (M, N) of the standardized rows, (x - mean) / scale, in float64."""
    k = np.zeros((len(x), len(x)))  # (N, N)
    cross = np.zeros((len(other), len(x)))  # (M, N)
    for cols, xb in standardized_blocks(x, mean, scale):
        k += xb @ xb.T  # numpy computes a @ a.T as one symmetric rank-k update
        cross += ((other[:, cols].astype(np.float64) - mean[cols]) / scale[cols]) @ xb.T
    return k, cross


def lift(weights: np.ndarray, x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(k, N) weights on the standardized training rows -> (k, F) feature weights, sum_i weights[:, i] x_i."""
    out = np.empty((len(weights), x.shape[1]))  # (k, F)
    for cols, xb in standardized_blocks(x, mean, scale):
        out[:, cols] = weights @ xb
    return out


@dataclass
class Span:
    """Orthonormal coordinates of the span of the centered training rows (see the module)."""

    train: np.ndarray  # (N, r) coordinates of every training row
    pivots: np.ndarray  # (r,) int: the training rows whose span it is
    factor: np.ndarray  # (r, r) lower triangular: K[pivots][:, pivots] = factor @ factor.T

    @classmethod
    def of(cls, k: np.ndarray) -> Span:
        """From K (N, N) of rows that sum to zero (centered by their own mean), so any N - 1 of them span them all."""
        from scipy.linalg.lapack import dpstrf

        n = len(k)
        if n < 2:
            return cls(np.zeros((n, 0)), np.zeros(0, dtype=np.int64), np.zeros((0, 0)))
        # leave out row 0: its exact dependence on the others (they sum to zero) is what would make the
        # factorization meet a zero pivot blurred by rounding; pivoting drops any further dependent row
        c, piv, rank, info = dpstrf(k[1:, 1:], lower=1, tol=RANK_TOL * float(np.max(np.diag(k))))
        if info < 0:
            raise ValueError(f"pivoted Cholesky failed (LAPACK info {info})")
        pivots = piv[:rank].astype(np.int64)  # 1-based in LAPACK: k[1:, 1:]'s row i is k's row i + 1
        factor = np.tril(c)[:rank, :rank]
        span = cls(np.empty((n, rank)), pivots, factor)
        span.train[piv] = np.tril(c)[:, :rank]  # rows in pivot order; the trailing columns are unfactored residue
        span.train[0] = span.coordinates(k[:1])[0]
        return span

    def coordinates(self, cross: np.ndarray) -> np.ndarray:
        """(M, N) inner products of other rows with the training rows -> (M, r) their coordinates."""
        from scipy.linalg import solve_triangular

        if len(cross) == 0 or len(self.pivots) == 0:
            return np.zeros((len(cross), len(self.pivots)))
        return solve_triangular(self.factor, cross[:, self.pivots].T, lower=True).T

    def row_weights(self, coef: np.ndarray) -> np.ndarray:
        """(k, r) weights on the coordinates -> (k, N) weights on the training rows.

        The coordinates' basis is Q = X_p^T factor^-T (X_p: the pivot rows), so Q v = X_p^T (factor^-1 v).
        """
        from scipy.linalg import solve_triangular

        out = np.zeros((len(coef), len(self.train)))  # (k, N)
        if coef.size:
            out[:, self.pivots] = solve_triangular(self.factor, coef.T, lower=True, trans="T").T
        return out


class KernelRidge:
    """Ridge (free intercept) on the training rows `keep`, from the Gram matrices alone, for any alpha.

    The kernel form w = X_c^T (K_c + alpha I)^-1 y_c with the kept rows centered, as scikit-learn solves
    Ridge when F > N, but from one K for every alpha instead of a new X X^T per fit.
    """

    def __init__(self, k: np.ndarray, cross: np.ndarray, y: np.ndarray, keep: np.ndarray) -> None:
        self.n, self.keep = len(k), keep
        self.kk = k[np.ix_(keep, keep)]  # (n, n)
        r = self.kk.mean(axis=1)
        self.kc = self.kk - r[:, None] - r[None, :] + r.mean()  # the centered kept rows' Gram
        self.cross = cross[:, keep]  # (M, n)
        self.mean = float(y[keep].mean())
        self.yc = y[keep] - self.mean

    def fit(self, alpha: float) -> tuple[np.ndarray, float, np.ndarray]:
        """(N,) weights on the training rows, the intercept, (M,) predictions for the held-out rows."""
        from scipy.linalg import cho_factor, cho_solve

        a = cho_solve(cho_factor(self.kc + alpha * np.eye(len(self.kc)), lower=True), self.yc)  # (n,)
        a -= a.mean()  # sum_j a_j (x_j - mean of the x) = sum_j (a_j - mean of the a) x_j
        intercept = self.mean - float((self.kk @ a).mean())
        weights = np.zeros(self.n)
        weights[self.keep] = a
        return weights, intercept, self.cross @ a + intercept
