"""cytopipe.config.content_hash: the key of the report's figure cache and of the statistics' fit memo.

Its digests are pinned: a faster way of feeding a sequence of plain scalars (ints, floats, strings,
bools, None: one update for the whole sequence) must give the very bytes the values fed one by one gave, so that the figure
caches of existing run folders stay valid (their figures are not drawn again after an upgrade)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cytopipe.config import Unhashable, content_hash

#: digests of cytopipe 0.1.0 before the sequence fast path (26a37a4), value by value
PINNED = {
    "ints": ([0, 1, -7, 2**40], "b0f154997fcb22ea75ea4af59221166eb7f0f72fdc5b2c76e2de3d4a903bff82"),
    "floats": (
        [0.5, -0.0, float("inf"), 1e-300],
        "960cb296f3512a2fdb36b76df6d19f7e5189a448d59e1127567a572444467655",
    ),
    "rows": (
        [{"counts": [3, 0, 12], "x_range": [0.25, 4.5], "n": 15}],
        "7717e2b4aea154ccffd7405cf91dc2a35a3c6d2d8f51262dea502c04a7002b5a",
    ),
    "mixed": (
        [1, 1.0, True, None, "1", np.int64(1), np.float32(1.5)],
        "bb1b92142bfe7ce7aa33692b1782b468c8eea481d4c0e773761d75d520e5a02a",
    ),
    "frame": (
        pd.DataFrame({"a": [[1, 2], [3]], "b": [1.5, 2.5], "c": pd.array([1, None], dtype="Int64")}),
        "9be2b1997d68deeb3a81ae9e46e09659722ec093f64c1be119eb37d4174e41f6",
    ),
    # digests of the value-by-value encoding of strings, bools and None (before 2026-12-07 10:50 UTC)
    "strings": (
        ["CD4 T", "", "Treg", "ü µ 10⁴", "a" * 300],
        "4fbb47b54f5cd640f3265b34e360bad799d1821eacc8b1de377429354ef7e7d1",
    ),
    "texts and missing": (
        ["P001_W00", None, "placebo", True, False, 3, 2.5, None],
        "8348aa56b172731aa36e668f6c3161affde9f54aed3eed838978bd280aea3ed0",
    ),
    "string frame": (
        pd.DataFrame(
            {
                "sample_id": pd.array(["P001_W00", None, "P002_W04"], dtype="string"),
                "population": ["T cells", "CD4 T", "Treg"],
                "count": [10, 20, 30],
            }
        ),  # fmt: skip
        "f3914b44b55aeaadc2ee8c92c3f06d22895806092cd27dc1f6998f50156de541",
    ),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_digests_are_those_of_the_value_by_value_encoding(name):
    value, digest = PINNED[name]
    assert content_hash(value) == digest


def test_equal_content_is_equal_and_any_difference_of_value_type_or_order_is_not():
    counts = [int(v) for v in np.random.default_rng(3).integers(0, 500, 4096)]
    same = [int(v) for v in np.random.default_rng(3).integers(0, 500, 4096)]
    assert content_hash(counts) == content_hash(same)
    variants = [
        counts[:-1] + [counts[-1] + 1],  # one count
        counts[::-1],  # order
        [float(v) for v in counts],  # float, not int
        [np.int64(v) for v in counts],  # numpy ints
        np.asarray(counts, dtype=np.int64),  # an array
        tuple(counts),  # a tuple
        counts[:-1] + [True],  # a bool is not the int 1
        counts + [None],  # a missing value at the end
    ]
    digests = {content_hash(v) for v in variants}
    assert len(digests) == len(variants) and content_hash(counts) not in digests
    assert content_hash([0.1, 0.2]) != content_hash([0.1, 0.20000000000000004])  # last bit of a float
    assert content_hash([1, 2]) != content_hash([[1, 2]])  # nesting


def test_an_object_it_cannot_name_is_refused_not_hashed_by_identity():
    with pytest.raises(Unhashable):
        content_hash([1, 2, object()])
