"""Data-driven gates: thresholds and regions fitted to each sample.

A data-driven gate is made of one or more *fitters*. Each fitter looks at the events of
the parent population (on the gate's transformed scale) and returns a small parameter
vector: a threshold, a singlet ratio band, or an ellipse (centre and covariance). The
gate turns the fitted parameters into a fixed gate (``realize``), so a fitted gate can be
shown, exported to Gating-ML and re-applied exactly.

Every fitter has sanity bounds (allowed values, minimum events, maximum shift from the
pooled estimate) and a pooling level; the engine decides between the sample's own fit and
the pooled estimate and flags every fallback with its reason.

Methods
-------
``valley``    lowest density between two peaks, looked for inside ``search: [lo, hi]``
``tail``      upper edge of the *negative* (lowest) peak: mode + z * sd of its left half
``hi``        upper edge of the *main* (tallest) peak: events above mode + z * sd(left half)
``lo``        lower edge of the main peak: events below mode - z * sd(right half)
``quantile``  the q-quantile of the parent's events
``gmm``       one component of a Gaussian mixture (sklearn, seeded) as an ellipse
``singlets``  FSC-A / FSC-H ratio band around the singlet diagonal
``scatter_region`` lymphocyte region on FSC-A / SSC-A (a Gaussian-mixture component)

Why one module: every fitter implements the one :class:`Fitter` contract (fit -> params,
bounds, pooled fallback) and shares the density, peak and subsampling helpers above; the
landmark-relative fitters, which need their own landmark search, are in
:mod:`~cytopipe.gating.landmarks`, and the parser of data-driven gate specs (which picks between
the two) in :mod:`~cytopipe.gating.fitparse`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numba
import numpy as np

from cytopipe.gating._quantile import quantile_of_sorted
from cytopipe.gating.gates import Dim, EllipsoidGate, Gate, PolygonGate, RectangleGate
from cytopipe.peaks import find_peaks

DEFAULT_MIN_EVENTS = 100
DEFAULT_MAX_EVENTS = 20_000  # threshold fits use at most this many events (a seeded subsample)
MIXTURE_MAX_EVENTS = 4_000  # mixtures locate clusters on fewer; the core refinement uses 5x more


class FitFailure(Exception):
    """A fit could not produce parameters (the message is the reason, for the flag)."""


# --------------------------------------------------------------------------------------------
# bounds
# --------------------------------------------------------------------------------------------
@dataclass
class Bounds:
    range: tuple[float | None, float | None] | None = None  # allowed fitted values
    center: list[tuple[float | None, float | None]] | None = None  # region gates: centre per marker
    min_events: int = DEFAULT_MIN_EVENTS
    max_shift: float | None = None  # vs. the pooled estimate, on the gate's scale
    fraction: tuple[float, float] | None = None  # share of parent events inside the gate

    def to_spec(self) -> dict:
        out: dict = {}
        if self.range is not None:
            out["range"] = list(self.range)
        if self.center is not None:
            out["center"] = [list(c) for c in self.center]
        out["min_events"] = self.min_events
        if self.max_shift is not None:
            out["max_shift"] = self.max_shift
        if self.fraction is not None:
            out["fraction"] = list(self.fraction)
        return out


def _within(value: float, lo, hi) -> bool:
    return (lo is None or value >= lo) and (hi is None or value <= hi)


# --------------------------------------------------------------------------------------------
# fitters
# --------------------------------------------------------------------------------------------
@dataclass
class Fitter:
    """Fits one parameter vector from the parent's events on ``dims``."""

    method: str
    dims: tuple[Dim, ...]
    options: dict = field(default_factory=dict)
    bounds: Bounds = field(default_factory=Bounds)
    pool: str = "cohort"
    default: np.ndarray | None = None

    def fit(self, values: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover

    @property
    def events_needed(self) -> int | None:
        """How many parent events the fit looks at (None = all); the engine subsamples first."""
        return self.options.get("max_events", DEFAULT_MAX_EVENTS)

    def out_of_bounds(self, params: np.ndarray) -> str | None:
        return None

    def shift(self, params: np.ndarray, reference: np.ndarray) -> float:
        return float(np.max(np.abs(np.asarray(params) - np.asarray(reference))))

    def describe(self, params: np.ndarray) -> str:
        return ", ".join(f"{v:.4g}" for v in np.ravel(params))

    def replacements(self, own: np.ndarray, reference: np.ndarray) -> list[np.ndarray]:
        """What may stand in for this sample's own ``params`` when its gate keeps an implausible
        fraction, least replaced first; the last is the whole ``reference``."""
        return [np.asarray(reference, dtype=np.float64)]

    def options_spec(self) -> dict:
        return dict(self.options)

    def default_spec(self):
        return None if self.default is None else float(self.default[0])

    def to_spec(self) -> dict:
        out = {"type": self.method, **self.options_spec(), "bounds": self.bounds.to_spec(), "pool": self.pool}
        if self.default is not None:
            out["default"] = self.default_spec()
        return out


def subsample_index(n: int, n_max: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """Positions of a seeded random subsample (with replacement) of ``n_max`` out of ``n``;
    None when no subsampling is needed. Drawing with replacement is O(n_max); the positions
    are not sorted (the fits do not care about order)."""
    if n_max is None or n <= n_max:
        return None
    return rng.integers(0, n, size=n_max)


def _subsample(x: np.ndarray, n_max: int, rng: np.random.Generator) -> np.ndarray:
    pos = subsample_index(len(x), n_max, rng)
    return x if pos is None else x[pos]


def _finite(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    return x if ok.all() else x[ok]


def density(x: np.ndarray, bandwidth: float | None = None, bins: int = 512):
    """Gaussian-smoothed histogram density of ``x`` over its 0.1-99.9 % range.

    Returns bin centres and density (arbitrary units). The bandwidth defaults to
    Silverman's rule on a robust spread, with n capped at 20 000 so large samples are not
    under-smoothed into noise.
    """
    return density_sorted(x, np.sort(x), bandwidth, bins)


def density_sorted(x: np.ndarray, ordered: np.ndarray, bandwidth: float | None = None, bins: int = 512):
    """:func:`density` of ``x`` given ``ordered`` = ``np.sort(x)``, for a caller that needs the
    order statistics too. The quantiles and the histogram are read off the sorted values (a
    ~30 us SIMD sort of 20k values instead of a selection and a binning pass, ~190 us); they are
    numpy's own numbers (``np.quantile``, ``np.histogram``: the bin of a value is the edge
    comparison numpy's binning corrects to)."""
    qs = quantile_of_sorted(ordered, [0.001, 0.25, 0.75, 0.999])
    if qs is None:  # NaN: numpy's own answer (np.histogram then refuses the range)
        qs = np.quantile(x, [0.001, 0.25, 0.75, 0.999])
    lo, q25, q75, hi = qs
    pad = 0.1 * (hi - lo) if hi > lo else 1.0
    lo, hi = lo - pad, hi + pad
    counts = _histogram_sorted(x, ordered, bins, lo, hi).astype(np.float64)
    width = (hi - lo) / bins
    if bandwidth is None:
        s = min(np.std(x), (q75 - q25) / 1.349) or np.std(x) or width
        bandwidth = 0.9 * s * min(len(x), 20_000) ** (-0.2)
    sigma = max(bandwidth / width, 1.0)
    half = min(int(math.ceil(4 * sigma)), (bins - 1) // 2)  # a kernel longer than the grid breaks "same"
    k = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    dens = np.convolve(counts, k / k.sum(), mode="same")
    centers = lo + (np.arange(bins) + 0.5) * width
    return centers, dens


def _histogram_sorted(x: np.ndarray, ordered: np.ndarray, bins: int, lo, hi) -> np.ndarray:
    """``np.histogram(x, bins, range=(lo, hi))[0]`` from the sorted values: bin i holds
    edge[i] <= v < edge[i + 1], the last bin its upper edge too, as numpy's binning does."""
    first, last = lo + 0.0, hi + 0.0
    edge_type = np.result_type(first, last, x)
    if not (np.isfinite(first) and np.isfinite(last) and first < last) or edge_type != np.float64:
        return np.histogram(x, bins=bins, range=(lo, hi))[0]
    edges = np.linspace(first, last, bins + 1, endpoint=True, dtype=edge_type)
    keys = ordered if ordered.dtype == np.float64 else ordered.astype(np.float64)
    at = np.empty(bins + 1, dtype=np.intp)
    at[:-1] = np.searchsorted(keys, edges[:-1], side="left")
    at[-1] = np.searchsorted(keys, edges[-1], side="right")
    return np.diff(at)


class ThresholdFitter(Fitter):
    """A 1-D threshold on one marker."""

    def out_of_bounds(self, params):
        if self.bounds.range is not None and not _within(params[0], *self.bounds.range):
            lo, hi = self.bounds.range
            return f"threshold {params[0]:.4g} outside the allowed range [{lo}, {hi}]"
        return None

    def describe(self, params):
        return f"{params[0]:.4g}"

    def _prepare(self, values, rng) -> np.ndarray:
        x = _finite(np.asarray(values[0]))
        if len(x) < self.bounds.min_events:
            raise FitFailure(f"only {len(x)} events in the parent (need >= {self.bounds.min_events})")
        return x


class ValleyFitter(ThresholdFitter):
    """The lowest density between two peaks, looked for inside ``search``.

    When the density is flat around its minimum (an empty gap between two well separated
    populations), the threshold is the middle of that flat stretch rather than its edge.
    """

    def fit(self, values, rng):
        x = self._prepare(values, rng)
        xs = _subsample(x, self.options.get("max_events", DEFAULT_MAX_EVENTS), rng)
        centers, dens = density(xs, self.options.get("bandwidth"))
        lo, hi = self.options["search"]
        window = np.flatnonzero((centers >= lo) & (centers <= hi))
        if len(window) < 3:
            raise FitFailure(f"the search range [{lo}, {hi}] lies outside the data")
        i = window[np.argmin(dens[window])]
        peaks = find_peaks(dens, self.options.get("min_peak", 0.02))
        left = peaks[peaks < i]
        right = peaks[peaks > i]
        if not len(left) or not len(right):
            raise FitFailure(f"no valley between two peaks inside the search range [{lo}, {hi}]")
        flank = min(dens[left[-1]], dens[right[0]])
        if dens[i] > self.options.get("max_depth", 0.8) * flank:
            raise FitFailure(f"the valley at {centers[i]:.3g} is too shallow to separate two populations")
        # the flat bottom around the minimum, between the two neighbouring peaks
        level = dens[i] + 0.02 * (flank - dens[i])
        a, b = i, i
        while a - 1 > left[-1] and dens[a - 1] <= level:
            a -= 1
        while b + 1 < right[0] and dens[b + 1] <= level:
            b += 1
        # the middle of the flat bottom, or of its part inside the search range
        a, b = max(a, window[0]), min(b, window[-1])
        if a > b:
            raise FitFailure(f"the valley lies outside the search range [{lo}, {hi}]")
        return np.array([0.5 * (centers[a] + centers[b])])


def _half_sd(d: np.ndarray) -> float:
    """Normal sd from one half of a peak (median absolute distance / 0.6745)."""
    return float(np.median(d)) / 0.6745 if len(d) else float("nan")


class PeakEdgeFitter(ThresholdFitter):
    """``tail`` (negative peak, upper edge), ``hi`` (main peak, upper edge) and ``lo``
    (main peak, lower edge)."""

    def fit(self, values, rng):
        x = self._prepare(values, rng)
        xs = _subsample(x, self.options.get("max_events", DEFAULT_MAX_EVENTS), rng)
        centers, dens = density(xs, self.options.get("bandwidth"))
        peaks = find_peaks(dens, self.options.get("min_peak", 0.05))
        if not len(peaks):
            raise FitFailure("no density peak found")
        peak = peaks[0] if self.method == "tail" else peaks[np.argmax(dens[peaks])]
        mode = centers[peak]
        z = self.options.get("z", 3.0)
        if self.method == "lo":
            sd = _half_sd(xs[xs > mode] - mode)
            t = mode - z * sd
        else:
            sd = _half_sd(mode - xs[xs < mode])
            t = mode + z * sd
        if not math.isfinite(t) or sd <= 0:
            raise FitFailure(f"cannot estimate the spread of the peak at {mode:.3g}")
        return np.array([t])


class QuantileFitter(ThresholdFitter):
    events_needed = None  # an exact quantile of every parent event

    def fit(self, values, rng):
        x = self._prepare(values, rng)
        return np.array([float(np.quantile(x, self.options["q"]))])


class SingletFitter(Fitter):
    """Ratio band ``low <= area / height <= high`` around the singlet diagonal."""

    def fit(self, values, rng):
        a, h = (np.asarray(v, dtype=np.float64) for v in values)
        ok = np.isfinite(a) & np.isfinite(h) & (h > 0)
        if ok.sum() < self.bounds.min_events:
            raise FitFailure(
                f"only {int(ok.sum())} events with a positive height (need >= {self.bounds.min_events})"
            )
        r = a[ok] / h[ok]
        r = _subsample(r, self.options.get("max_events", DEFAULT_MAX_EVENTS), rng)
        med = float(np.median(r))
        mad = float(np.median(np.abs(r - med))) * 1.4826
        if not mad > 0:
            raise FitFailure("area/height ratio has no spread")
        return np.array([med - self.options.get("low", 4.0) * mad, med + self.options.get("high", 4.0) * mad])

    def out_of_bounds(self, params):
        if self.bounds.range is not None:
            for v in params:
                if not _within(v, *self.bounds.range):
                    return f"ratio band [{params[0]:.4g}, {params[1]:.4g}] outside the allowed range {list(self.bounds.range)}"
        return None

    def describe(self, params):
        return f"area/height in [{params[0]:.4g}, {params[1]:.4g}]"

    def default_spec(self):
        return [float(v) for v in self.default]


class MixtureFitter(Fitter):
    """One Gaussian-mixture component as an ellipse: params = centre (k) + covariance (k*k)."""

    def fit(self, values, rng):
        from sklearn.mixture import GaussianMixture

        x = np.column_stack([np.asarray(v, dtype=np.float64) for v in values])
        x = x[np.isfinite(x).all(axis=1)]
        if len(x) < self.bounds.min_events:
            raise FitFailure(f"only {len(x)} events in the parent (need >= {self.bounds.min_events})")
        from cytopipe.threads import one_thread

        # the mixture only has to find the clusters: a few thousand events do; the trimmed
        # refinement below then uses up to 10x more for a precise centre and shape
        xs = _subsample(x, self.options.get("max_events", MIXTURE_MAX_EVENTS), rng)
        k = self.options.get("components", 2)
        gm = GaussianMixture(
            n_components=k,
            covariance_type="full",
            random_state=int(rng.integers(2**31 - 1)),
            n_init=self.options.get("n_init", 1),
            init_params="k-means++",  # seeding only: a full k-means start costs more than the fit
            reg_covar=1e-6 * float(np.var(xs)) + 1e-12,
        )
        with one_thread():
            gm.fit(xs)
        if not gm.converged_:
            raise FitFailure("the Gaussian mixture did not converge")
        candidates = list(range(k))
        names = [d.name for d in self.dims]
        if self.bounds.center is not None:  # only components centred where the population can be
            candidates = [
                c
                for c in candidates
                if all(_within(v, lo, hi) for v, (lo, hi) in zip(gm.means_[c], self.bounds.center))
            ]
            if not candidates:
                raise FitFailure("no mixture component is centred inside the allowed `center` bounds")
        for rule_key in ("exclude", "select"):
            rule = self.options.get(rule_key)
            if rule is None:
                continue
            chosen = _apply_rule(rule, gm, candidates, names)
            if rule_key == "exclude":
                if len(candidates) > 1:
                    candidates = [c for c in candidates if c != chosen]
            else:
                candidates = [chosen]
        if len(candidates) != 1:  # no select rule: the largest remaining component
            candidates = [max(candidates, key=lambda c: gm.weights_[c])]
        c = candidates[0]
        if gm.weights_[c] < self.options.get("min_weight", 0.01):
            raise FitFailure(f"the selected mixture component holds only {gm.weights_[c]:.1%} of events")
        mean, cov = gm.means_[c], gm.covariances_[c]
        trim = self.options.get("trim")
        if trim:
            xr = _subsample(x, 5 * self.options.get("max_events", MIXTURE_MAX_EVENTS), rng)
            mean, cov = refine_core(xr, mean, cov, trim)
        return np.concatenate([mean, cov.ravel()])

    @property
    def events_needed(self) -> int | None:
        n = self.options.get("max_events", MIXTURE_MAX_EVENTS)
        return 5 * n if self.options.get("trim") else n

    def split(self, params):
        k = len(self.dims)
        return params[:k], params[k:].reshape(k, k)

    def out_of_bounds(self, params):
        center, cov = self.split(params)
        if self.bounds.center is not None:
            for d, v, (lo, hi) in zip(self.dims, center, self.bounds.center):
                if not _within(v, lo, hi):
                    return f"centre on {d.name} ({v:.4g}) outside the allowed range [{lo}, {hi}]"
        if not np.all(np.linalg.eigvalsh((cov + cov.T) / 2) > 0):
            return "fitted covariance is not positive definite"
        return None

    def shift(self, params, reference):
        k = len(self.dims)
        return float(np.max(np.abs(params[:k] - reference[:k])))

    def describe(self, params):
        center, _ = self.split(params)
        return "centre (" + ", ".join(f"{v:.4g}" for v in center) + ")"

    def default_spec(self):
        center, cov = self.split(self.default)
        return {"center": center.tolist(), "covariance": cov.tolist()}


class DensestClusterFitter(MixtureFitter):
    """``scatter_region``: the densest cluster inside the allowed centre box.

    A smoothed 2-D histogram of the parent's events inside ``bounds.center`` gives the densest
    point; the cluster's centre and shape are then estimated from its trimmed core
    (:func:`refine_core`), which also grows a too-small starting ellipse to the cluster's size.
    """

    def fit(self, values, rng):
        from scipy.ndimage import gaussian_filter

        x = np.column_stack([np.asarray(v, dtype=np.float64) for v in values])
        x = x[np.isfinite(x).all(axis=1)]
        if len(x) < self.bounds.min_events:
            raise FitFailure(f"only {len(x)} events in the parent (need >= {self.bounds.min_events})")
        xs = _subsample(x, self.options.get("max_events", 10_000), rng)
        box = []
        for j in range(x.shape[1]):
            lo, hi = self.bounds.center[j] if self.bounds.center is not None else (None, None)
            qlo, qhi = np.quantile(xs[:, j], [0.005, 0.995])
            box.append((qlo if lo is None else lo, qhi if hi is None else hi))
        inside = np.all([(xs[:, j] >= a) & (xs[:, j] <= b) for j, (a, b) in enumerate(box)], axis=0)
        if inside.sum() < max(50, self.bounds.min_events // 10):
            raise FitFailure("too few events inside the allowed `center` region")
        hist, ex, ey = np.histogram2d(xs[inside, 0], xs[inside, 1], bins=64, range=box)
        hist = gaussian_filter(hist, 1.5)
        i, j = np.unravel_index(np.argmax(hist), hist.shape)
        mean = np.array([(ex[i] + ex[i + 1]) / 2, (ey[j] + ey[j + 1]) / 2])
        # a small starting ellipse (a few bins wide); the trimmed refinement grows it to the cluster
        cov = np.diag([(ex[1] - ex[0]) * 3, (ey[1] - ey[0]) * 3]) ** 2
        mean, cov = refine_core(xs, mean, cov, self.options.get("trim", 2.5), iterations=50)
        return np.concatenate([mean, cov.ravel()])

    @property
    def events_needed(self) -> int | None:
        return self.options.get("max_events", 10_000)


@numba.njit(cache=True, nogil=True)
def _core_moments_2d(x, mean, inv, c2):
    """Count, sum and cross-product sum of the events within Mahalanobis^2 ``c2``."""
    n = 0
    s1 = np.zeros(2)
    s2 = np.zeros((2, 2))
    for i in range(x.shape[0]):
        u = x[i, 0] - mean[0]
        v = x[i, 1] - mean[1]
        if (u * inv[0, 0] + v * inv[1, 0]) * u + (u * inv[0, 1] + v * inv[1, 1]) * v <= c2:
            n += 1
            a, b = x[i, 0], x[i, 1]
            s1[0] += a
            s1[1] += b
            s2[0, 0] += a * a
            s2[0, 1] += a * b
            s2[1, 1] += b * b
    s2[1, 0] = s2[0, 1]
    return n, s1, s2


def chi2_quantile(p: float, df: int) -> float:
    """``scipy.stats.chi2.ppf(p, df)`` by the function it calls, without importing scipy.stats
    (~0.5 s of CPU per process)."""
    from scipy.special import gammaincinv

    return float(2 * gammaincinv(df / 2, p))


def refine_core(
    x: np.ndarray, mean: np.ndarray, cov: np.ndarray, trim: float, iterations: int = 10, tol: float = 1e-3
):
    """Re-estimate a Gaussian cluster from its core: the events within Mahalanobis distance
    ``trim`` of the current estimate, with the chi-square consistency factor that undoes the
    trimming (as in MCD estimators). Neighbouring clusters and a mixture component that split
    the cluster in two then no longer bias its centre and shape."""
    from scipy.special import chdtr  # chi2.cdf's own function, without importing scipy.stats (~0.5 s)

    k = x.shape[1]
    c2 = trim * trim
    factor = chdtr(k, c2) / chdtr(k + 2, c2)
    xc = np.ascontiguousarray(x, dtype=np.float64)
    for _ in range(iterations):
        inv = np.linalg.inv(cov)
        if k == 2:
            n, s1, s2 = _core_moments_2d(xc, mean, inv, c2)
        else:
            d = xc - mean
            core = xc[((d @ inv) * d).sum(axis=1) <= c2]
            n, s1, s2 = len(core), core.sum(axis=0), core.T @ core
        if n < 10 * k:
            raise FitFailure(f"only {n} events in the core of the selected cluster")
        new_mean = s1 / n
        new_cov = (s2 - n * np.outer(new_mean, new_mean)) / (n - 1) * factor
        scale = np.sqrt(np.diag(new_cov))
        moved = max(
            np.abs(new_mean - mean).max() / scale.max(),
            np.abs(np.sqrt(np.diag(cov)) / scale - 1).max(),
        )
        mean, cov = new_mean, new_cov
        if moved < tol:
            break
    return mean, cov


def _apply_rule(rule, gm, candidates: list[int], names: list[str]) -> int:
    """``largest`` / ``smallest`` by weight, or ``{marker: highest|lowest}`` by mean."""
    if rule in ("largest", "smallest"):
        pick = max if rule == "largest" else min
        return pick(candidates, key=lambda c: gm.weights_[c])
    ((marker, how),) = rule.items()
    j = names.index(marker)
    pick = max if how == "highest" else min
    return pick(candidates, key=lambda c: gm.means_[c, j])


# --------------------------------------------------------------------------------------------
# data-driven gates
# --------------------------------------------------------------------------------------------
class DataDrivenGate(Gate):
    data_driven = True
    fraction: tuple[float, float] | None = None

    def fit_items(self) -> list[tuple[str, Fitter]]:
        """``(key suffix, fitter)`` pairs; the engine keys fits as ``population + suffix``."""
        raise NotImplementedError  # pragma: no cover

    def realize(self, params: Mapping[str, np.ndarray]) -> Gate:
        raise NotImplementedError  # pragma: no cover

    def contains(self, values):  # pragma: no cover - the engine realizes first
        raise TypeError("a data-driven gate must be fitted (realized) before use")


class ThresholdGate(DataDrivenGate):
    """Events above (``side: above``) or below a fitted threshold on one marker."""

    def __init__(self, dims, fitter: ThresholdFitter, side: str, fraction=None):
        super().__init__(dims)
        self.fitter = fitter
        self.side = side
        self.type = fitter.method
        self.fraction = fraction

    def fit_items(self):
        return [("", self.fitter)]

    def realize(self, params):
        t = float(params[""][0])
        if self.side == "above":
            return RectangleGate(self.dims, [t], [None], style="range")
        return RectangleGate(self.dims, [None], [t], style="range")

    def to_spec(self):
        spec = self.fitter.to_spec()
        default_side = "below" if self.fitter.method == "lo" else "above"
        if self.side != default_side:
            spec["side"] = self.side
        if self.fraction is not None:
            spec["bounds"]["fraction"] = list(self.fraction)
        return spec


class QuadrantGate(DataDrivenGate):
    """A quadrant whose thresholds are numbers or fitted thresholds (one per marker)."""

    type = "quadrant"

    def __init__(self, dims, thresholds: list, signs: list[str], fraction=None):
        super().__init__(dims)
        self.thresholds = thresholds
        self.signs = signs
        self.fraction = fraction

    def fit_items(self):
        return [(f"[{d.name}]", t) for d, t in zip(self.dims, self.thresholds) if isinstance(t, Fitter)]

    def realize(self, params):
        values = [
            float(params[f"[{d.name}]"][0]) if isinstance(t, Fitter) else t
            for d, t in zip(self.dims, self.thresholds)
        ]
        lower = [v if s == "+" else None for v, s in zip(values, self.signs)]
        upper = [v if s == "-" else None for v, s in zip(values, self.signs)]
        return RectangleGate(self.dims, lower, upper, style="quadrant")

    def to_spec(self):
        spec = {
            "type": "quadrant",
            "quadrant": "".join(self.signs),
            "thresholds": [t.to_spec() if isinstance(t, Fitter) else t for t in self.thresholds],
        }
        if self.fraction is not None:
            spec["bounds"] = {"fraction": list(self.fraction)}
        return spec


class EllipseFitGate(DataDrivenGate):
    """``gmm`` and ``scatter_region``: the selected mixture component's ellipse."""

    def __init__(self, dims, fitter: MixtureFitter, distance_square: float, fraction=None):
        super().__init__(dims)
        self.fitter = fitter
        self.type = fitter.method
        self.distance_square = distance_square
        self.fraction = fraction

    def fit_items(self):
        return [("", self.fitter)]

    def realize(self, params):
        center, cov = self.fitter.split(np.asarray(params[""]))
        return EllipsoidGate(self.dims, center, cov, self.distance_square)

    def to_spec(self):
        spec = self.fitter.to_spec()
        if self.fraction is not None:
            spec["bounds"]["fraction"] = list(self.fraction)
        return spec


class SingletGate(DataDrivenGate):
    """Events whose area/height ratio lies in the fitted band (a wedge polygon)."""

    type = "singlets"

    def __init__(self, dims, fitter: SingletFitter, fraction=None):
        super().__init__(dims)
        self.fitter = fitter
        self.fraction = fraction

    def fit_items(self):
        return [("", self.fitter)]

    def realize(self, params):
        lo, hi = (float(v) for v in params[""])
        big = 1e12  # beyond any detector range: the wedge is open-ended in practice
        # x = area, y = height; the band lo <= x / y <= hi is the wedge between two rays
        vertices = [[0.0, 0.0], [hi * big, big], [lo * big, big]]
        return PolygonGate(self.dims, vertices)

    def to_spec(self):
        spec = self.fitter.to_spec()
        if self.fraction is not None:
            spec["bounds"]["fraction"] = list(self.fraction)
        return spec
