"""Satterthwaite denominator degrees of freedom for the random-intercept mixed model.

With 4-20 patients per arm, Wald z (normal) and chi-square references make the mixed model's tests
anti-conservative: the variance of an estimated effect is itself estimated from few patients. The
standard remedy (SAS ``DDFM=SATTERTHWAITE``, R's lmerTest) refers a single contrast ``l'b`` to a t
distribution with

    nu = 2 (l'C l)^2 / (g' A g),   g_j = d(l'C l)/d theta_j,   A = Cov(theta_hat)

where ``C = (X'V^-1 X)^-1``, ``theta = (residual variance, random-intercept variance)`` and ``A`` is
the inverse of the REML information ``I_jk = tr(P V_j P V_k) / 2`` with ``P = V^-1 - V^-1 X C X'V^-1``.
A q-dimensional Wald test uses F(q, ddf) with the Fai-Cornelius (1996) combination of the
per-eigen-contrast degrees of freedom (as lmerTest). A variance estimated at 0 (the boundary) is held
fixed, so the ordinary least-squares case gets exactly ``n - rank(X)``. Every product exploits the
block structure of ``V^-1`` (one block per patient): cost O(n k^2 + G^2 k), no n x n matrix.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse


class SatterthwaiteDF:
    """Degrees of freedom of contrasts of the fixed effects of ``y = X b + Z u + e``, Var(u) =
    ``re_var`` I, Var(e) = ``scale`` I, Z = patient indicators (``groups``), at the REML estimates."""

    def __init__(self, exog: np.ndarray, groups: np.ndarray, scale: float, re_var: float):
        x = np.asarray(exog, dtype=float)
        n, _ = x.shape
        _, codes = np.unique(np.asarray(groups), return_inverse=True)
        g = int(codes.max()) + 1
        self._z = sparse.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, g))
        sizes = np.asarray(self._z.sum(axis=0)).ravel()
        self._boundary = not re_var > 1e-8 * scale
        tau = 0.0 if self._boundary else float(re_var)
        self._s2 = float(scale)
        self._c = tau / (scale + sizes * tau)  # V_i^-1 = (I - c_i J) / s2
        q = self._winv(x)  # V^-1 X
        self.cov = np.linalg.pinv(x.T @ q)  # C
        self._q = q
        # REML information of (s2, tau) from the block structure (see the module docstring)
        c, s2 = self._c, self._s2
        qtq = q.T @ q
        qc = q @ self.cov
        tr_ww = float(np.sum(sizes - 2 * c * sizes + c**2 * sizes**2)) / s2**2
        tr_pp = (
            tr_ww
            - 2 * np.sum((q.T @ self._winv(q)) * self.cov)
            + np.sum((qtq @ self.cov) * (qtq @ self.cov).T)
        )
        info = [[0.5 * tr_pp]]
        if not self._boundary:
            zq = np.asarray(self._z.T @ q)  # G x k: per-patient sums of V^-1 X
            wz = (1 - c * sizes) / s2  # V^-1 Z = Z diag(wz)
            zpz = np.diag(sizes * wz) - zq @ self.cov @ zq.T  # Z'PZ
            # ||PZ||_F^2 = ||V^-1 Z||^2 - 2 tr(Z'V^-1 Q C Q'Z) + ||Q C Q'Z||^2
            qcz = qc @ zq.T  # n x G = Q C Q'Z
            tr_pzpz = (
                float(np.sum(sizes * wz**2))
                - 2 * float(np.sum(np.diag(np.asarray(self._z.T @ qcz)) * wz))
                + float(np.sum(qcz * qcz))
            )
            tr_zpzzpz = float(np.sum(zpz * zpz))
            info = [[0.5 * tr_pp, 0.5 * tr_pzpz], [0.5 * tr_pzpz, 0.5 * tr_zpzzpz]]
        self._a = np.linalg.pinv(np.asarray(info, dtype=float), rcond=1e-10, hermitian=True)
        self.df_resid = n - int(np.linalg.matrix_rank(x))

    def _winv(self, m: np.ndarray) -> np.ndarray:
        """V^-1 @ m, block by block."""
        sums = np.asarray(self._z.T @ m)
        return (m - np.asarray(self._z @ (self._c[:, None] * sums))) / self._s2

    def df(self, contrast: np.ndarray) -> float:
        """Satterthwaite df of ``contrast @ b`` (a 1-D contrast)."""
        l_vec = np.asarray(contrast, dtype=float)
        var = float(l_vec @ self.cov @ l_vec)
        w = self._q @ (self.cov @ l_vec)  # d(l'Cl)/d theta_j = w' V_j w
        grad = [float(w @ w)]
        if not self._boundary:
            grad.append(float(np.sum(np.asarray(self._z.T @ w) ** 2)))
        grad = np.asarray(grad)
        denom = float(grad @ self._a @ grad)
        if not denom > 0 or not var > 0:
            return float(self.df_resid)
        return float(np.clip(2 * var**2 / denom, 1.0, max(self.df_resid, 1)))

    def ddf(self, contrasts: np.ndarray) -> float:
        """Denominator df of the F test of ``contrasts @ b = 0`` (Fai-Cornelius, as lmerTest)."""
        lm = np.atleast_2d(np.asarray(contrasts, dtype=float))
        vals, vecs = np.linalg.eigh(lm @ self.cov @ lm.T)
        keep = vals > 1e-10 * max(float(vals.max()), 1e-300)
        nus = np.array([self.df(vecs[:, i] @ lm) for i in np.flatnonzero(keep)])
        if len(nus) == 0:
            return np.nan
        if len(nus) == 1 or np.ptp(nus) < 1e-8:
            return float(nus.mean())
        if np.any(nus <= 2):
            return 2.0
        e = float(np.sum(nus / (nus - 2)))
        return 2 * e / (e - len(nus))
