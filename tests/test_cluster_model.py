"""Training, the frozen model file, mapping new visits, abundances and concordance."""

import json
import zipfile

import numpy as np
import pandas as pd
import pytest

from cytopipe import cluster
from cytopipe.errors import ClusteringError

MARKERS = ["CD3", "CD4", "CD8", "CD19", "CD56", "CD16"]
# phenotypes (arcsinh-like units) of 5 cell types on MARKERS
PHENOTYPES = {
    "CD4 T": [3, 3, 0, 0, 0, 0],
    "CD8 T": [3, 0, 3, 0, 0, 0],
    "B": [0, 0, 0, 3, 0, 0],
    "NK": [0, 0, 0, 0, 3, 3],
    "Mono": [0, 1, 0, 0, 0, 1.5],
}
CHANNELS = ["FSC-A", "SSC-A", *MARKERS, "Time"]  # whole-sample column order


def make_sample(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Events (n x CHANNELS) with per-event truth labels; proportions vary by seed."""
    rng = np.random.default_rng(seed)
    names = list(PHENOTYPES)
    props = rng.dirichlet(np.full(len(names), 5.0))
    truth = rng.choice(len(names), size=n, p=props)
    centers = np.array([PHENOTYPES[k] for k in names], dtype=np.float32)
    ev = np.empty((n, len(CHANNELS)), np.float32)
    ev[:, 0] = rng.uniform(5e4, 1e5, n)
    ev[:, 1] = rng.uniform(1e4, 5e4, n)
    ev[:, 2:-1] = centers[truth] + shift + rng.normal(scale=0.35, size=(n, len(MARKERS)))
    ev[:, -1] = np.arange(n)
    return ev, np.array(names, dtype=object)[truth]


@pytest.fixture(scope="module")
def cohort():
    return {f"P{i:02d}_W00": make_sample(3000 + 500 * i, seed=i) for i in range(4)}


@pytest.fixture(scope="module")
def settings():
    return cluster.ClusterSettings(xdim=6, ydim=6, n_metaclusters=5, seed=11, cells_per_sample=1500)


@pytest.fixture(scope="module")
def model(cohort, settings):
    data = {sid: ev for sid, (ev, _) in cohort.items()}
    return cluster.train_model(
        data,
        MARKERS,
        settings,
        columns=CHANNELS,
        parent="Live",
        transforms={"kind": "arcsinh", "cofactor": 150},
    )


def test_training_is_balanced_seeded_and_order_independent(cohort, settings, model):
    assert model.training["samples"] == {sid: 1500 for sid in cohort}
    assert model.training["n_cells"] == 6000
    assert model.codes.shape == (36, 6) and model.node_metacluster.shape == (36,)
    assert model.n_metaclusters == 5 and model.parent == "Live" and model.markers == MARKERS
    # same seed, samples given in another order (and as DataFrames) -> identical model
    frames = {sid: pd.DataFrame(ev, columns=CHANNELS) for sid, (ev, _) in reversed(list(cohort.items()))}
    again = cluster.train_model(frames, MARKERS, settings, parent="Live", transforms=model.transforms)
    assert np.array_equal(again.codes, model.codes)
    assert np.array_equal(again.node_metacluster, model.node_metacluster)
    assert again.content_hash == model.content_hash
    # pre-subsampling per sample (as a Dask task would) is idempotent
    pre = {}
    for sid, (ev, _) in cohort.items():
        idx = cluster.subsample_indices(len(ev), 1500, settings.seed, sid)
        pre[sid] = ev[idx]
    assert np.array_equal(cluster.train_model(pre, MARKERS, settings, columns=CHANNELS).codes, model.codes)
    other = cluster.train_model(
        frames, MARKERS, cluster.ClusterSettings(xdim=6, ydim=6, n_metaclusters=5, seed=12)
    )
    assert not np.array_equal(other.codes, model.codes)


def test_subsample_depends_only_on_sample_and_seed():
    a = cluster.subsample_indices(10_000, 100, 1, "P01")
    assert np.array_equal(a, cluster.subsample_indices(10_000, 100, 1, "P01"))
    assert not np.array_equal(a, cluster.subsample_indices(10_000, 100, 1, "P02"))
    assert len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    assert np.array_equal(cluster.subsample_indices(50, 100, 1, "P01"), np.arange(50))
    s = cluster.ClusterSettings(max_training_cells=1000)
    assert cluster.training_cells_per_sample(s, 3) == 333


def test_metaclusters_find_the_cell_types(cohort, model):
    for sid, (ev, truth) in cohort.items():
        _, mc = cluster.map_events(model, ev, CHANNELS, sample_id=sid)
        summary = cluster.concordance_summary(mc, truth)
        assert (summary["best_f1"] > 0.97).all(), summary


def test_later_visit_maps_exactly_as_in_the_first_run(cohort, model, tmp_path):
    """A week-24 sample mapped onto the frozen (saved, reloaded) model gets exactly the
    assignment it would have had if it had been mapped with the week-0 samples."""
    w24, _ = make_sample(4000, seed=99, shift=0.2)
    together = {sid: ev for sid, (ev, _) in cohort.items()} | {"P00_W24": w24}
    first_run = {sid: cluster.map_events(model, ev, CHANNELS) for sid, ev in together.items()}
    path = cluster.save_model(model, tmp_path / "model.npz")
    frozen = cluster.load_model(path)
    later_nodes, later_mc = cluster.map_events(frozen, w24, CHANNELS, sample_id="P00_W24", chunk_size=333)
    assert np.array_equal(later_nodes, first_run["P00_W24"][0])
    assert np.array_equal(later_mc, first_run["P00_W24"][1])
    # the whole cohort concatenated in any order maps the same per event
    order = ["P02_W00", "P00_W24", "P00_W00", "P03_W00", "P01_W00"]
    stacked = np.concatenate([together[s] for s in order])
    nodes, _ = cluster.map_events(frozen, stacked, CHANNELS, chunk_size=1000)
    assert np.array_equal(nodes, np.concatenate([first_run[s][0] for s in order]))


def test_model_file_round_trip(model, tmp_path):
    path = cluster.save_model(model, tmp_path / "m.npz")
    assert path.exists() and not (tmp_path / "m.npz.tmp").exists()
    back = cluster.load_model(path)
    assert back.content_hash == model.content_hash
    for name in ("codes", "node_metacluster", "node_counts", "metacluster_medians"):
        assert np.array_equal(getattr(back, name), getattr(model, name)), name
    assert back.center is None and back.scale is None
    assert back.settings == model.settings
    assert back.markers == MARKERS and back.parent == "Live"
    assert back.transforms == {"kind": "arcsinh", "cofactor": 150}
    pd.testing.assert_frame_equal(back.consensus_curve, model.consensus_curve, check_dtype=False)
    with np.load(path, allow_pickle=False) as npz:  # plain arrays + a JSON header, no pickle
        header = json.loads(str(npz["header"]))
    assert header["kind"] == "cytopipe.flowsom" and header["format_version"] == 1
    assert header["grid"] == {"xdim": 6, "ydim": 6, "topology": "rectangular", "distance": "chebyshev"}
    assert header["seed"] == 11 and header["cytopipe_version"]
    # scaled models keep their centring and scaling
    data = {"a": np.random.default_rng(0).normal(size=(500, 2)).astype(np.float32) * [1, 100]}
    scaled = cluster.train_model(
        data, ["x", "y"], cluster.ClusterSettings(xdim=3, ydim=3, n_metaclusters=2, scale=True)
    )
    back = cluster.load_model(cluster.save_model(scaled, tmp_path / "s.npz"))
    assert np.array_equal(back.scale, scaled.scale) and back.scale[1] > 50
    assert np.array_equal(cluster.map_events(back, data["a"])[0], cluster.map_events(scaled, data["a"])[0])


def _rewrite(src, dst, header=None, arrays=None):
    with np.load(src, allow_pickle=False) as npz:
        content = {name: npz[name] for name in npz.files}
    if header is not None:
        h = json.loads(str(content["header"]))
        header(h)
        content["header"] = np.array(json.dumps(h))
    if arrays is not None:
        arrays(content)
    with open(dst, "wb") as fh:
        np.savez(fh, **content)


def test_corrupt_or_edited_model_files_are_refused(model, tmp_path):
    good = cluster.save_model(model, tmp_path / "good.npz")
    raw = good.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ClusteringError, match="corrupt or unreadable") as exc:
        cluster.load_model(tmp_path / "trunc.npz")
    assert exc.value.context["file"] == tmp_path / "trunc.npz"

    def nudge(c):
        c["codes"] = c["codes"].copy()
        c["codes"][0, 0] += 1e-3

    _rewrite(good, tmp_path / "codes.npz", arrays=nudge)
    with pytest.raises(ClusteringError, match="hash does not match"):
        cluster.load_model(tmp_path / "codes.npz")
    _rewrite(good, tmp_path / "markers.npz", header=lambda h: h["markers"].reverse())
    with pytest.raises(ClusteringError, match="hash does not match"):
        cluster.load_model(tmp_path / "markers.npz")
    _rewrite(good, tmp_path / "future.npz", header=lambda h: h.update(format_version=99))
    with pytest.raises(ClusteringError, match="newer than this cytopipe supports"):
        cluster.load_model(tmp_path / "future.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ClusteringError, match="corrupt or unreadable"):
        cluster.load_model(tmp_path / "text.npz")
    with open(tmp_path / "other.npz", "wb") as fh:
        np.savez(fh, x=np.arange(3))
    with pytest.raises(ClusteringError, match="not a cytopipe clustering model"):
        cluster.load_model(tmp_path / "other.npz")
    with pytest.raises(ClusteringError, match="not found"):
        cluster.load_model(tmp_path / "missing.npz")
    assert zipfile.is_zipfile(good)


def test_missing_marker_is_named(model):
    ev, _ = make_sample(100, seed=5)
    channels = [c if c != "CD56" else "CD57" for c in CHANNELS]
    with pytest.raises(ClusteringError, match="'CD56' is missing") as exc:
        cluster.map_events(model, ev, channels, sample_id="P09_W04")
    assert exc.value.context == {"sample": "P09_W04", "marker": "CD56"}
    assert "P09_W04" in str(exc.value) and "CD57" in str(exc.value)
    # case-insensitive match when unambiguous
    lower = [c.lower() for c in CHANNELS]
    assert np.array_equal(cluster.map_events(model, ev, lower)[0], cluster.map_events(model, ev, CHANNELS)[0])
    with pytest.raises(ClusteringError, match="matches several columns"):
        cluster.map_events(model, np.hstack([ev, ev[:, :1]]), [*lower, "Cd3"])
    with pytest.raises(ClusteringError, match="9 columns but 6 markers"):
        cluster.map_events(model, ev)
    bad = ev.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ClusteringError, match="NaN") as exc:
        cluster.map_events(model, bad, CHANNELS, sample_id="S")
    assert exc.value.context["sample"] == "S"


def test_abundance_table_counts_and_medians(cohort, model):
    frames = []
    for sid, (ev, _) in cohort.items():
        _, mc = cluster.map_events(model, ev, CHANNELS)
        frames.append(cluster.sample_abundance(model, sid, mc, ev, CHANNELS, markers=[*MARKERS, "FSC-A"]))
        # medians equal pandas' per-group median
        ref = pd.DataFrame(ev, columns=CHANNELS).groupby(mc)[MARKERS].median()
        got = frames[-1].set_index("metacluster")
        np.testing.assert_allclose(
            got.loc[ref.index, [f"median_{m}" for m in MARKERS]].to_numpy(), ref.to_numpy(), rtol=1e-6
        )
    table = cluster.abundance_table(reversed(frames))
    assert list(table.columns[:7]) == [
        "sample_id", "population", "parent", "metacluster", "count", "parent_count", "pct_parent",
    ]  # fmt: skip
    assert "median_FSC-A" in table.columns
    assert len(table) == 4 * model.n_metaclusters
    assert table["sample_id"].is_monotonic_increasing
    per = table.groupby("sample_id").agg(total=("count", "sum"), parent=("parent_count", "first"))
    assert (per["total"] == per["parent"]).all()
    assert table.groupby("sample_id")["pct_parent"].sum().round(9).eq(100).all()
    assert set(table["population"]) == {f"MC0{i}" for i in range(1, 6)}
    assert (table["parent"] == "Live").all()


def test_empty_metaclusters_keep_a_zero_row(model):
    mc = np.ones(10, dtype=np.int16)
    ev = np.zeros((10, 6), np.float32)
    t = cluster.sample_abundance(model, "S", mc, ev)
    assert t["count"].tolist() == [10, 0, 0, 0, 0]
    assert t["pct_parent"].tolist() == [100.0, 0, 0, 0, 0]
    assert np.isnan(t.loc[1, "median_CD3"]) and t.loc[0, "median_CD3"] == 0
    assert cluster.sample_abundance(model, "S", mc)["count"].sum() == 10
    # a sample with no parent events still gets its k rows (count 0, % undefined)
    none = cluster.sample_abundance(model, "E", np.zeros(0, np.int16), np.zeros((0, 6), np.float32))
    assert none["count"].tolist() == [0] * 5 and none["parent_count"].eq(0).all()
    assert none["pct_parent"].isna().all()


def test_concordance_measures():
    clusters = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 4])
    labels = np.array(["A", "A", "B", "B", "B", "A", "A", "A", "U", "B"])
    t = cluster.f_measure_table(clusters, labels, exclude=["U"])
    row = t[(t.population == "A") & (t.cluster == 3)].iloc[0]
    # cluster 3 without the excluded event: 3 cells, all A; A has 5 cells
    assert (row.n_cluster, row.n_population, row.n_both) == (3, 5, 3)
    assert row.precision == 1 and row.recall == pytest.approx(0.6) and row.f1 == pytest.approx(0.75)
    best = cluster.best_matches(t).set_index("population")
    assert best.loc["A", "cluster"] == 3 and best.loc["B", "cluster"] == 2
    unions = cluster.best_unions(clusters, labels, exclude=["U"]).set_index("population")
    assert unions.loc["A", "clusters"] == (1, 3)
    assert unions.loc["A", "f1"] == pytest.approx(2 * 5 / (6 + 5))
    assert cluster.mean_best_f1(clusters, labels, exclude=["U"]) == pytest.approx(best["f1"].mean())
    # boolean masks (nested gates) work the same way
    masks = {"A": labels == "A", "A or B": np.isin(labels, ["A", "B"])}
    s = cluster.concordance_summary(clusters, masks).set_index("population")
    # no exclusion with masks: cluster 3 holds the U event, still worth adding (F1 18/19 > 12/15)
    assert s.loc["A or B", "union_clusters"] == "1+2+3+4"
    assert s.loc["A or B", "union_f1"] == pytest.approx(2 * 9 / (10 + 9))


def test_concordance_from_per_sample_counts_equals_the_pooled_events():
    """What the pipeline does: each sample's contingency counts (no events) summed at the client give
    exactly the F-measures and best matches/unions of all events pooled."""
    rng = np.random.default_rng(7)
    samples = []
    for n in (300, 50, 0, 420):
        clusters = rng.integers(1, 6, size=n)  # clusters 1..5; some samples lack some clusters
        clusters[clusters == 5] = 4 if n == 50 else 5
        in_a = rng.random(n) < np.array([0.0, 0.9, 0.6, 0.2, 0.05, 0.0])[clusters]
        in_b = in_a & (rng.random(n) < 0.5)  # nested, like Treg in CD4 T
        samples.append((clusters, {"A": in_a, "B": in_b}))
    counts = [cluster.contingency_counts(c, m, cluster_ids=range(1, 6)) for c, m in samples]
    assert all(len(t) == 2 * 5 for t in counts)  # every population x cluster, zeros included
    total = cluster.sum_counts(counts)
    pooled_c = np.concatenate([c for c, _ in samples])
    pooled_m = {p: np.concatenate([m[p] for _, m in samples]) for p in ("A", "B")}
    expected = cluster.f_measure_table(pooled_c, pooled_m)
    pd.testing.assert_frame_equal(cluster.f_measure_from_counts(total), expected)
    pd.testing.assert_frame_equal(
        cluster.concordance_from_counts(total), cluster.concordance_summary(pooled_c, pooled_m)
    )
    with pytest.raises(ClusteringError, match="not among cluster_ids"):
        cluster.contingency_counts(np.array([1, 7]), {"A": np.array([True, False])}, cluster_ids=range(1, 6))


def test_best_union_is_the_best_of_all_subsets():
    from itertools import combinations

    rng = np.random.default_rng(4)
    clusters = rng.integers(0, 7, size=400)
    pop = (rng.random(400) < np.array([0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.0])[clusters]).astype(int)
    labels = np.where(pop == 1, "P", "Q")
    got = cluster.best_unions(clusters, labels).set_index("population").loc["P", "f1"]
    in_p = labels == "P"
    best = 0.0
    for r in range(1, 8):
        for subset in combinations(range(7), r):
            sel = np.isin(clusters, subset)
            best = max(best, 2 * (sel & in_p).sum() / (sel.sum() + in_p.sum()))
    assert got == pytest.approx(best)


def test_model_medians_and_settings_round_trip(model):
    med = cluster.model_medians(model)
    assert list(med.columns) == ["count", *MARKERS]
    assert med["count"].sum() == model.training["n_cells"]
    s = cluster.ClusterSettings.from_dict(model.settings.to_dict())
    assert s == model.settings
    with pytest.raises(ClusteringError, match="unknown clustering settings: xdimm"):
        cluster.ClusterSettings.from_dict({"xdimm": 3})
    with pytest.raises(ClusteringError, match="unknown linkage"):
        cluster.ClusterSettings(linkage="single")


def test_map_sample_is_one_pipeline_task(cohort, model, tmp_path):
    ev, truth = cohort["P01_W00"]
    mask = truth != "B"  # e.g. the parent gate
    extra = [*MARKERS, "SSC-A"]
    res = cluster.map_sample(model, "P01_W00", ev, CHANNELS, parent_mask=mask, markers=extra, parent="non-B")
    nodes, mc = cluster.map_events(model, ev[mask], CHANNELS)
    assert np.array_equal(res.nodes, nodes) and np.array_equal(res.metaclusters, mc)
    expected = cluster.sample_abundance(
        model, "P01_W00", mc, ev[mask], CHANNELS, markers=extra, parent="non-B"
    )
    pd.testing.assert_frame_equal(res.abundance, expected)
    assert res.abundance["parent_count"].iloc[0] == mask.sum()
    assert np.array_equal(res.node_counts, np.bincount(nodes, minlength=model.n_nodes))
    with pytest.raises(ClusteringError, match="parent mask has 3 entries"):
        cluster.map_sample(model, "P01_W00", ev, CHANNELS, parent_mask=np.ones(3, bool))
    # workers load the model once per file version
    path = cluster.save_model(model, tmp_path / "m.npz")
    assert cluster.load_model_cached(path) is cluster.load_model_cached(str(path))
    with pytest.raises(ClusteringError, match="not found"):
        cluster.load_model_cached(tmp_path / "nope.npz")


def _map_path(args):
    path, events = args
    return cluster.map_events(cluster.load_model_cached(path), events, CHANNELS)[0]


def test_parallel_workers_give_the_same_assignments(cohort, model, tmp_path):
    """1 or 2 workers, threads or processes, any completion order: identical per-event nodes."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    path = str(cluster.save_model(model, tmp_path / "m.npz"))
    samples = [ev for ev, _ in cohort.values()]
    serial = [cluster.map_events(model, ev, CHANNELS)[0] for ev in samples]
    with ThreadPoolExecutor(2) as pool:
        threaded = list(pool.map(lambda ev: cluster.map_events(model, ev, CHANNELS)[0], samples))
    with ProcessPoolExecutor(2) as pool:
        processes = list(pool.map(_map_path, [(path, ev) for ev in samples]))
    for a, b, c in zip(serial, threaded, processes):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_importing_the_package_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, cytopipe.cluster as c; c.train_model; c.map_events; c.concordance_summary; "
        "heavy = [m for m in ('umap', 'matplotlib', 'networkx', 'flowsom') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_group_medians_equal_numpys_median_bit_for_bit():
    """The metacluster medians (a histogram selection for float32 columns) are np.median's values
    exactly: ties, signed zeros, huge and infinite values, a NaN in a column, empty groups."""
    from cytopipe.cluster.abundance import group_medians

    rng = np.random.default_rng(20261203)
    for trial in range(60):
        n, kind = int(rng.integers(1, 2500)), trial % 5
        shape = (n, 6)
        if kind == 0:
            x = rng.normal(0, 1000, shape)
        elif kind == 1:
            x = rng.integers(-3, 4, shape).astype(float)  # ties and zeros
        elif kind == 2:
            x = rng.lognormal(5, 3, shape) * rng.choice([-1, 1], shape)
        elif kind == 3:
            x = np.where(rng.random(shape) < 0.3, -0.0, rng.normal(0, 1, shape))  # -0.0 ties 0.0
        else:
            x = rng.normal(1e30, 1e30, shape)
        x = x.astype(np.float32)
        x[rng.integers(0, n), 2] = np.nan if trial % 3 == 0 else np.inf
        labels = rng.integers(1, 16, n)  # some of the 16 groups stay empty
        cols = np.array([0, 2, 3, 5])
        counts, med = group_medians(x, cols, labels, 16)
        for g in range(16):
            rows = np.flatnonzero(labels == g + 1)
            assert counts[g] == len(rows)
            want = np.median(x[np.ix_(rows, cols)], axis=0) if len(rows) else np.full(len(cols), np.nan)
            assert med[g].tobytes() == np.asarray(want, dtype=np.float64).tobytes(), (trial, g)
