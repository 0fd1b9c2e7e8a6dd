"""Prompt records: steering by class weights shifts what the next round generates."""

from collections import Counter

from syntagen_st.prompts.records import make_records

CLASSES = ["cat", "dog", "horse", "sheep"]


def _class_counts(records) -> Counter:
    return Counter(c for r in records for c in r.classes)


def test_skewed_weights_shift_template_class_frequencies():
    even = _class_counts(make_records(0, 1, range(400), CLASSES, None, max_classes=1))
    steered = _class_counts(make_records(0, 1, range(400), CLASSES, {"cat": 6.0, "dog": 1.0, "horse": 1.0, "sheep": 1.0},
                                         max_classes=1))
    assert all(70 <= even[c] <= 130 for c in CLASSES), even
    assert steered["cat"] > 2 * even["cat"] and steered["cat"] > 3 * max(steered[c] for c in CLASSES[1:]), steered


def test_skewed_weights_shift_prompt_file_lines():
    lines = [(f"a photo of a {c}", (c,)) for c in CLASSES]
    even = _class_counts(make_records(0, 1, range(400), CLASSES, None, prompt_file=lines))
    assert set(even.values()) == {100}  # unsteered: the lines in turn
    steered = _class_counts(make_records(0, 1, range(400), CLASSES, {"cat": 0.1, "dog": 3.0, "horse": 0.1, "sheep": 0.1},
                                         prompt_file=lines))
    assert steered["dog"] > 300 and steered["cat"] < 30, steered
