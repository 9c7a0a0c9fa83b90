"""Clinical table: validation errors and endpoints on hand-computed examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cytopipe.clinical import (
    REQUIRED_COLUMNS,
    ClinicalSettings,
    check_clinical,
    derive_endpoints,
    load_clinical,
    response_rates,
    validate_clinical,
)
from cytopipe.errors import ClinicalDataError


def _visit(pid, visit, arm="placebo", **items):
    row = {
        "patient_id": pid,
        "visit": visit,
        "arm": arm,
        "sledai": 10,
        "pga": 2.0,
        "bilag_new_a": 0,
        "bilag_new_b": 0,
        "anti_dsdna": 50.0,
        "c3": 80.0,
        "c4": 12.0,
        "proteinuria": 1.0,
        "prednisone_mg": 10.0,
    }
    row.update(items)
    return row


def hand_table() -> pd.DataFrame:
    """Patients whose week-12 endpoints are worked out by hand in the tests below."""
    rows = [
        # P1: SLEDAI 10 -> 6 (drop 4), PGA +0.2, 1 new B: SRI-4 yes, SRI-5 no. Proteinuria 1.0 -> 0.4:
        # complete. anti-dsDNA 50 -> 20 and C3 80 -> 95 normalise; C4 12 -> 15 stays low.
        _visit("P1", 0),
        _visit(
            "P1", 12, sledai=6, pga=2.2, bilag_new_b=1, proteinuria=0.4, anti_dsdna=20.0, c3=95.0, c4=15.0
        ),
        # P2: SLEDAI drop 4, but PGA 1.0 -> 1.3 (+0.3, binary 0.30000000000000004): PGA component fails.
        # Proteinuria 2.0 -> 0.9: 55% fall, < 3 g: partial. C4 12 -> 16 exactly: normal (>= 16).
        _visit("P2", 0, pga=1.0, proteinuria=2.0),
        _visit("P2", 12, sledai=6, pga=1.3, proteinuria=0.9, c4=16.0, anti_dsdna=30.0),
        # P3: SLEDAI drop 8 but one new BILAG A. Baseline proteinuria 0.3: not renal-evaluable.
        _visit("P3", 0, arm="IL-2 1.0 MIU", proteinuria=0.3),
        _visit("P3", 12, arm="IL-2 1.0 MIU", sledai=2, bilag_new_a=1, proteinuria=0.2),
        # P4: two new BILAG B. Proteinuria 4.0 -> 2.5 (37.5% fall): no renal response.
        _visit("P4", 0, arm="IL-2 1.0 MIU", proteinuria=4.0),
        _visit("P4", 12, arm="IL-2 1.0 MIU", sledai=2, bilag_new_b=2, proteinuria=2.5),
        # P5: no week-12 visit at all (has week 4): imputed under NRI.
        _visit("P5", 0, arm="IL-2 1.0 MIU"),
        _visit("P5", 4, arm="IL-2 1.0 MIU", sledai=8),
        # P6: SLEDAI drop 5, PGA missing: undecidable -> imputed. Proteinuria 1.0 -> 0.5: not < 0.5, but a
        # 50% fall to < 3 g: partial.
        _visit("P6", 0),
        _visit("P6", 12, sledai=5, pga=np.nan, proteinuria=0.5),
        # P7: SLEDAI drop 2 (fails) and PGA missing: a definite non-responder, not imputed.
        _visit("P7", 0),
        _visit("P7", 12, sledai=8, pga=np.nan, proteinuria=np.nan),
    ]
    return pd.DataFrame(rows)


def week(endpoints: pd.DataFrame, visit: int = 12) -> pd.DataFrame:
    return endpoints[endpoints["visit"] == visit].set_index("patient_id")


# ------------------------------------------------------------------------------------------------
# endpoints
# ------------------------------------------------------------------------------------------------
def test_sledai_change_and_sri4_components_by_hand():
    ep = week(derive_endpoints(hand_table(), {"sri_thresholds": (4, 5)}))
    assert ep.loc["P1", "sledai_change"] == -4
    assert ep.loc["P3", "sledai_change"] == -8
    assert ep.loc["P1", "pga_change"] == pytest.approx(0.2)
    # P1: all three components hold -> responder at SRI-4, not at SRI-5
    assert (ep.loc["P1", "sri4_sledai"], ep.loc["P1", "sri_bilag"], ep.loc["P1", "sri_pga"]) == (
        True,
        True,
        True,
    )
    assert ep.loc["P1", "sri4"] == True  # noqa: E712 (nullable boolean)
    assert ep.loc["P1", "sri5_sledai"] == False and ep.loc["P1", "sri5"] == False  # noqa: E712
    # P2: a PGA rise of exactly 0.3 counts as worsening, despite binary floating point
    assert ep.loc["P2", "sri4_sledai"] == True and ep.loc["P2", "sri_pga"] == False  # noqa: E712
    assert ep.loc["P2", "sri4"] == False  # noqa: E712
    # P3: one new BILAG A fails; P4: two new BILAG B fail
    assert ep.loc["P3", "sri_bilag"] == False and ep.loc["P3", "sri4"] == False  # noqa: E712
    assert ep.loc["P4", "sri_bilag"] == False and ep.loc["P4", "sri4"] == False  # noqa: E712
    assert not ep.loc[["P1", "P2", "P3", "P4"], "sri4_imputed"].any()


def test_non_responder_imputation_marks_what_it_imputed():
    ep = week(derive_endpoints(hand_table()))
    # P5 missed week 12, P6's PGA is missing with the other components met: NRI -> non-responders
    assert not ep.loc["P5", "observed"] and ep.loc["P6", "observed"]
    assert ep.loc["P5", "sri4"] == False and ep.loc["P5", "sri4_imputed"]  # noqa: E712
    assert ep.loc["P6", "sri4"] == False and ep.loc["P6", "sri4_imputed"]  # noqa: E712
    assert pd.isna(ep.loc["P6", "sri_pga"])
    # P7 fails SLEDAI outright: non-responder without imputation
    assert ep.loc["P7", "sri4"] == False and not ep.loc["P7", "sri4_imputed"]  # noqa: E712
    # the patient-visit grid is complete: every patient has a row at weeks 4 and 12
    full = derive_endpoints(hand_table())
    assert sorted(full["visit"].unique()) == [4, 12]
    assert full.groupby("visit").size().tolist() == [7, 7]


def test_imputation_none_leaves_missing_values_missing():
    ep = week(derive_endpoints(hand_table(), {"imputation": "none"}))
    assert pd.isna(ep.loc["P5", "sri4"]) and pd.isna(ep.loc["P6", "sri4"])
    assert not ep["sri4_imputed"].any()
    assert ep.loc["P7", "sri4"] == False  # noqa: E712  (decided without the missing PGA)
    assert pd.isna(ep.loc["P5", "renal_response"])  # eligible (1.0 g) but unobserved


def test_renal_response_by_hand():
    ep = week(derive_endpoints(hand_table()))
    assert ep.loc["P1", "renal_response"] == "complete"
    assert ep.loc["P2", "renal_response"] == "partial"
    assert ep.loc["P6", "renal_response"] == "partial"  # 0.5 is not < 0.5 but is a 50% fall
    assert ep.loc["P4", "renal_response"] == "none"
    assert pd.isna(ep.loc["P3", "renal_response"]) and ep.loc["P3", "renal_eligible"] == False  # noqa: E712
    # missing proteinuria in an eligible patient: NRI "none", flagged
    assert ep.loc["P7", "renal_response"] == "none" and ep.loc["P7", "renal_imputed"]
    assert ep.loc["P5", "renal_response"] == "none" and ep.loc["P5", "renal_imputed"]
    assert ep.loc["P1", "renal_complete"] == True and ep.loc["P2", "renal_any"] == True  # noqa: E712
    assert ep.loc["P2", "renal_complete"] == False  # noqa: E712
    # stricter, configurable thresholds: complete needs < 0.3 g, partial needs a 60% fall
    strict = week(derive_endpoints(hand_table(), {"renal_complete": 0.3, "renal_partial_reduction": 0.6}))
    assert strict.loc["P1", "renal_response"] == "partial"  # 0.4 g, a 60% fall from 1.0
    assert strict.loc["P2", "renal_response"] == "none"  # 55% fall < 60%


def test_serology_flags_by_hand():
    ep = week(derive_endpoints(hand_table()))
    assert ep.loc["P1", "anti_dsdna_normal"] == True and ep.loc["P1", "anti_dsdna_normalised"] == True  # noqa: E712
    assert ep.loc["P2", "anti_dsdna_normal"] == False  # noqa: E712  (30 is not < 30)
    assert ep.loc["P1", "c3_normalised"] == True and ep.loc["P1", "c4_normalised"] == False  # noqa: E712
    assert ep.loc["P2", "c4_normal"] == True and ep.loc["P2", "c4_normalised"] == True  # noqa: E712  (16 >= 16)
    # a patient normal at baseline has no normalisation endpoint
    table = hand_table()
    table.loc[table["patient_id"] == "P1", "c3"] = 100.0
    ep2 = week(derive_endpoints(table))
    assert pd.isna(ep2.loc["P1", "c3_normalised"]) and ep2.loc["P1", "c3_normal"] == True  # noqa: E712
    # cut-offs are configurable
    ep3 = week(derive_endpoints(hand_table(), {"c4_normal_at_least": 14.0}))
    assert ep3.loc["P1", "c4_normalised"] == True  # noqa: E712


def test_response_rates_with_wilson_interval():
    ep = derive_endpoints(hand_table())
    rates = response_rates(ep, "sri4").set_index(["arm", "visit"])
    placebo = rates.loc[("placebo", 12)]
    # placebo week 12: P1 responds; P2, P6 (imputed), P7 do not
    assert (placebo["responders"], placebo["n"], placebo["imputed"]) == (1, 4, 1)
    assert placebo["rate"] == pytest.approx(0.25)
    assert placebo["ci_low"] < 0.25 < placebo["ci_high"]


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def test_valid_table_passes_and_is_typed():
    table = hand_table()
    table["visit"] = table["visit"].astype(float)
    table["site"] = "Beijing"  # extra columns are allowed and kept
    out = validate_clinical(table, patients=["P1", "P2"])
    assert out["visit"].dtype == "int64" and "site" in out.columns
    assert check_clinical(hand_table()) == []


def test_missing_required_column_is_named():
    with pytest.raises(ClinicalDataError) as info:
        validate_clinical(hand_table().drop(columns=["pga"]))
    assert info.value.context["column"] == "pga" and "pga" in str(info.value)


@pytest.mark.parametrize(
    ("column", "value", "words"),
    [
        ("pga", 3.5, "0-3"),
        ("pga", -0.1, "0-3"),
        ("sledai", -2, "SLEDAI"),
        ("sledai", 4.5, "integer"),
        ("proteinuria", -0.1, "proteinuria"),
        ("bilag_new_b", 1.5, "integer"),
        ("c3", "low", "not a number"),
        ("visit", 4.5, "not a whole study week"),
        ("visit", "M3", "months are no whole number of weeks"),  # wk4 is week 4 since text visits are read
    ],
)
def test_out_of_range_values_name_row_and_column(column, value, words):
    table = hand_table()
    table[column] = table[column].astype(object)
    table.loc[3, column] = value
    problems = check_clinical(table)
    assert problems, f"{column}={value!r} should be rejected"
    first = problems[0]
    assert first.context["row"] == 3 and first.context["column"] == column
    assert words in str(first)


def test_duplicate_patient_visit_names_both_rows():
    table = pd.concat([hand_table(), pd.DataFrame([_visit("P1", 12)])], ignore_index=True)
    with pytest.raises(ClinicalDataError) as info:
        validate_clinical(table)
    assert "P1" in str(info.value) and "[1, 14]" in str(info.value)
    assert info.value.context["row"] == 14


def test_arm_change_no_baseline_and_missing_patients():
    table = hand_table()
    table.loc[1, "arm"] = "IL-2 0.5 MIU"  # P1 switches arm at week 12
    table = table[~((table["patient_id"] == "P4") & (table["visit"] == 0))]  # P4 loses its baseline
    manifest = pd.DataFrame(
        {"patient_id": ["P1", "P2", "P3", "P9"], "arm": ["placebo", "placebo", "placebo", "x"]}
    )
    problems = check_clinical(table, manifest)
    text = "\n".join(str(p) for p in problems)
    assert "changes arm" in text and "'P1'" in text
    assert "'P4' has no baseline visit" in text
    assert "'P9' has flow data but no clinical rows" in text
    assert "'P3' is in arm 'IL-2 1.0 MIU' in the clinical table but in arm 'placebo'" in text
    # collect-all: one raised error lists every problem and keeps them
    with pytest.raises(ClinicalDataError) as info:
        validate_clinical(table, manifest)
    assert len(info.value.problems) == len(problems) == 4
    assert f"{len(problems)} problems" in str(info.value)


def test_load_clinical_reports_csv_lines(tmp_path):
    table = hand_table()
    table.loc[4, "pga"] = 7
    path = tmp_path / "clinical.csv"
    table.to_csv(path, index=False)
    with pytest.raises(ClinicalDataError) as info:
        load_clinical(path)
    # data row 4 is CSV line 6 (line 1 = header)
    assert info.value.context == {"file": path, "row": 6, "column": "pga"}
    assert str(info.value).startswith(f"file '{path}', row 6, column 'pga'")
    table.loc[4, "pga"] = 1.0
    table["patient_id"] = ["007" if p == "P1" else p for p in table["patient_id"]]
    table.to_csv(path, index=False)
    loaded = load_clinical(path, patients=["007"])
    assert "007" in set(loaded["patient_id"])  # ids stay text
    with pytest.raises(ClinicalDataError, match="not found"):
        load_clinical(tmp_path / "missing.csv")


def test_settings_reject_unknown_keys():
    with pytest.raises(ClinicalDataError, match="unknown clinical setting"):
        ClinicalSettings.from_any({"sri_threshold": 4})
    with pytest.raises(ClinicalDataError, match="imputation"):
        ClinicalSettings(imputation="locf")
    assert set(REQUIRED_COLUMNS) >= {"patient_id", "visit", "arm", "sledai", "pga"}


def test_pga_rise_of_exactly_03_fails_despite_rounding_down():
    # 2.3 - 2.0 is 0.2999999999999998 in binary floating point; it is still a rise of 0.3
    assert 2.3 - 2.0 < 0.3
    table = pd.DataFrame([_visit("P1", 0, pga=2.0), _visit("P1", 12, sledai=2, pga=2.3)])
    ep = week(derive_endpoints(table))
    assert ep.loc["P1", "sri_pga"] == False and ep.loc["P1", "sri4"] == False  # noqa: E712
    table.loc[1, "pga"] = 2.29
    assert week(derive_endpoints(table)).loc["P1", "sri4"] == True  # noqa: E712


def test_bilag_component_is_decided_by_either_count():
    table = pd.DataFrame(
        [
            _visit("P1", 0),
            _visit("P1", 12, sledai=2, bilag_new_a=1, bilag_new_b=np.nan),  # a new A decides: fails
            _visit("P2", 0),
            _visit("P2", 12, sledai=2, bilag_new_a=0, bilag_new_b=np.nan),  # unknown B: undecided
        ]
    )
    ep = week(derive_endpoints(table))
    assert ep.loc["P1", "sri_bilag"] == False and not ep.loc["P1", "sri4_imputed"]  # noqa: E712
    assert pd.isna(ep.loc["P2", "sri_bilag"]) and ep.loc["P2", "sri4_imputed"]


@pytest.mark.parametrize(("sep", "name"), [(";", "semicolons"), ("\t", "tabs")])
def test_a_table_saved_with_another_separator_says_so(tmp_path, sep, name):
    """A spreadsheet saved with a European locale separates with semicolons: the header reads as
    one column; the error says what the separator is and what to save instead."""
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "sample_data" / "clinical.csv"
    path = tmp_path / "clinical.csv"
    path.write_text(sample.read_text().replace(",", sep))
    with pytest.raises(
        ClinicalDataError, match=f"separates its columns with {name}: save the table as comma-separated"
    ):
        load_clinical(path)
    load_clinical(sample)  # the comma-separated original loads


def test_a_clinical_table_with_text_visits_loads_as_the_one_with_weeks(tmp_path):
    """The sample study's clinical table with its visits written BL, W04, Week 12 and D168 reads as
    the committed one (weeks 0, 4, 12, 24); a month is an error naming the file, line and value."""
    from pathlib import Path

    original = Path(__file__).resolve().parents[1] / "sample_data" / "clinical.csv"
    raw = pd.read_csv(original, dtype=str, keep_default_na=False)
    raw["visit"] = raw["visit"].map({"0": "BL", "4": "W04", "12": "Week 12", "24": "D168"})
    assert raw["visit"].notna().all()
    words = tmp_path / "clinical.csv"
    raw.to_csv(words, index=False)
    pd.testing.assert_frame_equal(load_clinical(words), load_clinical(original))

    raw.loc[5, "visit"] = "M3"
    raw.to_csv(words, index=False)
    with pytest.raises(ClinicalDataError) as exc:
        load_clinical(words)
    assert exc.value.context["row"] == 7 and exc.value.context["column"] == "visit"  # CSV line 7
    assert str(words) in str(exc.value) and "visit is 'M3': months are no whole number of weeks" in str(
        exc.value
    )
