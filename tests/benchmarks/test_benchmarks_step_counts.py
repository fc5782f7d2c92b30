"""benchmarks/step_counts.py: the per-operation-count breakdown of greedy answers."""

from benchmarks.step_counts import breakdown


def test_answers_are_counted_by_operations_passes_and_written_thoughts():
    rows = [{"ops": [1, 2]}, {"ops": [1, 2]}, {"ops": [1, 2, 3]}, {"ops": [1, 2, 3]}, {"ops": [1, 2, 3]}]
    texts = ["a</t>b</t>", "a</t>b</t>c</t>", "a</t>b</t>", "a</t>b</t>c</t>", "a</t>b</t>c</t>"]
    scores = [1.0, 0.0, 0.0, 0.0, 1.0]
    assert breakdown(rows, texts, scores, "</t>") == {
        "2": {"problems": 2, "passed": 1, "fewer_thoughts": 0, "more_thoughts": 1, "right_count_wrong_value": 0},
        "3": {"problems": 3, "passed": 1, "fewer_thoughts": 1, "more_thoughts": 0, "right_count_wrong_value": 1},
    }
    # an unscorable answer counts as not passed
    assert breakdown(rows[:1], texts[:1], [None], "</t>")["2"]["right_count_wrong_value"] == 1
