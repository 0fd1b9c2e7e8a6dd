"""The seed formulas are part of the on-disk contract: an entry is regenerated from its seed by
exactly these numbers. The expected values were computed by the code that made the entries
already submitted (before the package was split into stages), so a change to any formula fails
here before it breaks a reproduction."""

import pytest

from syntagen_st.core.layout import Step, final_step, fold_step, round_step, round_tasks
from syntagen_st.core.seeds import derived_seed, hash_seed, parse_sample_id, sample_id, sample_seed
from syntagen_st.prompts.records import make_records
from syntagen_st.selftrain.pool import assign_folds


def test_sample_and_training_seeds_are_the_ones_entries_were_made_with():
    assert sample_seed(0, "r00_000000") == 272294909726300607
    assert sample_seed(12345, "r02_000017") == 7966296587088714413
    assert derived_seed(0, "r0k1") == 4255169429  # four bytes, as the fold and final models always had
    assert derived_seed(7, "final") == 1487081109
    assert hash_seed("3:prompts:r1:from0:attempt0:batch0") == 2476793627438414765  # the LLM's batch seed


def test_folds_and_template_prompts_are_the_ones_entries_were_made_with():
    ids = [sample_id(0, i) for i in range(7)]
    assert assign_folds(ids, 3, 5) == {"r00_000003": 0, "r00_000005": 1, "r00_000001": 2, "r00_000002": 0,
                                       "r00_000004": 1, "r00_000000": 2, "r00_000006": 0}
    records = make_records(4, 1, range(3), ["dog", "cat", "sofa", "person"], {"dog": 3.0}, 3)
    assert [(r.id, r.prompt, r.classes, r.seed) for r in records] == [
        ("r01_000000", "a high quality photo of a sofa in an apartment, side view, under soft indoor light", ("sofa",),
         213328313170085258),
        ("r01_000001", "a high quality photo of a dog in a park, seen from above, at night", ("dog",), 9080655777133376360),
        ("r01_000002", "a high quality photo of a person in a living room, side view", ("person",), 7875233748765437870),
    ]


def test_sample_ids_and_step_names_round_trip():
    assert sample_id(3, 42) == "r03_000042" and parse_sample_id("r03_000042") == (3, 42)
    with pytest.raises(ValueError):
        parse_sample_id("r3_42")
    names = [round_step(1, t) for t in round_tasks(2)] + [final_step(3, "export")]
    assert names == ["round1/data", "round1/fold0", "round1/fold1", "round1/refine", "final3/export"]
    assert fold_step(2, 1) == "round2/fold1" and Step.parse("round2/fold1").fold == 1
    assert all(str(Step.parse(n)) == n for n in names)
    assert Step.parse("final3/train") == Step("final", 3, "train") and Step.parse("final3/train").fold is None
    with pytest.raises(ValueError):
        Step.parse("round/data")
