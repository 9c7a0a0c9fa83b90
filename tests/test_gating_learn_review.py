"""Diagonal gates (CD56bright NK, the Treg CD25/CD127 diagonal AND FOXP3) reviewed in a run travel as
learned-gate examples: a reviewer's override of the CD56bright diagonal and an approved Treg gate
are exported as `cytopipe review --examples` writes them (``cytopipe.review.examples``) and gated
again by `cytopipe gate --examples` (a real subprocess) on the run's own files."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import yaml

from cytopipe.gating import load_template
from cytopipe.gating.gates import PolygonGate
from cytopipe.gating.landmarks import AllOfGate
from cytopipe.gating.learn import LEARNED, read_examples
from cytopipe.review.decisions import Decision, ReviewState
from cytopipe.review.examples import examples, examples_text
from cytopipe.review.regate import apply_review, current_params, forget
from tests.pipeline_support import REPO, TEMPLATE

KEY = ["sample_id", "population"]
BRIGHT = "CD56bright NK"


def test_a_reviewed_diagonal_override_round_trips_through_review_export_and_gate_examples(
    serve_trial, serve_reference, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(serve_reference, run_dir)
    forget()
    try:
        before = pd.read_parquet(run_dir / "population_stats.parquet").set_index(KEY)
        samples = sorted(before.index.get_level_values("sample_id").unique())
        sid, treg_sid = samples[2], samples[3]
        rv = pd.read_parquet(run_dir / "gate_review.parquet")
        numbers = current_params(rv, sid, BRIGHT, run_dir)
        assert {"CD56 mode", "CD56 SD", "CD16 mode", "CD16 SD", "diagonal >="} <= set(numbers)
        # the reviewer moves the diagonal into the CD56dim cloud's tail (3 robust SDs along the
        # diagonal from its centre): more CD56bright cells (the simulator's bright cells lie far out)
        moved = 3.0
        assert moved < numbers["diagonal >="] - 1.0
        state = ReviewState()
        state.add(Decision("override", sid, BRIGHT, "rita", params={"diagonal >=": moved},
                           reason="CD16 smear", category="poor staining", audit_entry=11))  # fmt: skip
        state.add(Decision("approve", treg_sid, "Treg", "rita", audit_entry=12))
        apply_review(run_dir, state, statistics=False, report=False)
        after = pd.read_parquet(run_dir / "population_stats.parquet").set_index(KEY)
        assert after.loc[(sid, BRIGHT), "pct_parent"] > before.loc[(sid, BRIGHT), "pct_parent"] + 1

        # the export: a diagonal entry carries its full gate (the panel shapes are clipped to the grid)
        path = tmp_path / "examples.yaml"
        path.write_text(examples_text(examples(run_dir, state), "yaml"), encoding="utf-8")
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        by = {(e["sample_id"], e["population"]): e for e in doc["examples"]}
        assert by[(sid, BRIGHT)]["status"] == "overridden"
        assert by[(sid, BRIGHT)]["params"]["diagonal >="] == moved
        assert by[(sid, BRIGHT)]["gate"]["type"] == "polygon"
        assert by[(treg_sid, "Treg")]["gate"]["type"] == "all_of"  # CD25/CD127 half-plane AND FOXP3 >=

        # read back: exactly the half-plane the override applied, on the template's axes
        template = load_template(TEMPLATE)
        got = {(e.sample_id, p): g for e in read_examples(path, template) for p, g in e.gates.items()}
        bright = got[(sid, BRIGHT)]
        tg = template[BRIGHT].gate
        want = tg.realize(tg.params_from_numbers({**numbers, "diagonal >=": moved}))
        assert isinstance(bright, PolygonGate) and bright.dims == tg.dims[:2]
        np.testing.assert_allclose(bright.vertices, want.vertices, rtol=1e-9)
        treg = got[(treg_sid, "Treg")]
        assert isinstance(treg, AllOfGate) and [d.name for d in treg.dims] == ["CD25", "CD127", "FOXP3"]
        # the same numbers without the `gate` field (an export written before it existed) give the same gate
        for e in doc["examples"]:
            e.pop("gate")
        old = tmp_path / "old_examples.yaml"
        old.write_text(yaml.safe_dump(doc), encoding="utf-8")
        again = {(e.sample_id, p): g for e in read_examples(old, template) for p, g in e.gates.items()}
        np.testing.assert_allclose(again[(sid, BRIGHT)].vertices, want.vertices, rtol=1e-9)

        # `cytopipe gate --examples` on the run's files: the reviewed sample gets its reviewed
        # diagonal, the others the diagonal moved onto their own CD56/CD16 densities
        manifest = serve_trial / "serve_manifest.csv"
        m = pd.read_csv(manifest, dtype=str).set_index("sample_id")
        targets = [s for s in samples[:6] if s not in (sid, treg_sid)]
        files = [str(serve_trial / m.loc[s, "file"]) for s in (sid, treg_sid, *targets)]
        out = tmp_path / "gated"
        cmd = [sys.executable, "-m", "cytopipe", "gate", *files, "--manifest", str(manifest), "--template",
               str(TEMPLATE), "--examples", str(path), "--out", str(out), "--quiet", "--no-pool"]  # fmt: skip
        env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ps = pd.read_parquet(out / "population_stats.parquet").set_index(KEY)
        assert set(ps.loc[ps.index.get_level_values("population") == BRIGHT, "gate_source"]) == {LEARNED}
        assert set(ps.loc[ps.index.get_level_values("population") == "Treg", "gate_source"]) == {LEARNED}
        print(f"\n{BRIGHT} % of NK: run's own fit -> review override -> `cytopipe gate --examples`")
        for s in (sid, *targets):
            print(f"  {s}: {before.loc[(s, BRIGHT), 'pct_parent']:.2f} -> {after.loc[(s, BRIGHT), 'pct_parent']:.2f}"
                  f" -> {ps.loc[(s, BRIGHT), 'pct_parent']:.2f}")  # fmt: skip
        # the reviewed sample: its override (the run removed a few events in QC and gated on the
        # study's locked cofactors, `cytopipe gate` on each file's own: close, not identical)
        assert abs(ps.loc[(sid, BRIGHT), "pct_parent"] - after.loc[(sid, BRIGHT), "pct_parent"]) <= 0.5
        # every other sample: the moved-in diagonal keeps more CD56bright cells than its own fit
        for s in targets:
            assert ps.loc[(s, BRIGHT), "pct_parent"] > before.loc[(s, BRIGHT), "pct_parent"], s
    finally:
        forget()
