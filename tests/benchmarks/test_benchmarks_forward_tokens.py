"""benchmarks/forward_tokens.py counts the tokens of the trainer's row layout, packed and unpacked."""

from benchmarks.forward_tokens import GRPO_ROWS, count, layout


def test_counts_follow_the_row_layout_of_the_main_job():
    prompt, response, prefix, suffix = 60, 128, 40, 88
    srpo = count(layout(prompt, response, prefix, suffix))
    assert srpo["unpacked"] == 4 * (prompt + response) + 4 * (prompt + prefix + suffix)
    # base group: the prompt once (its last token repeated in each row); reset group: prompt + prefix likewise
    assert srpo["packed"] == srpo["unpacked"] - 3 * (prompt - 1) - 3 * (prompt + prefix - 1)
    assert srpo["packs"] == 2
    grpo = count(layout(prompt, response, prefix, suffix, split=(GRPO_ROWS, 0, 0)))
    assert grpo["packed"] == GRPO_ROWS * (prompt + response) - (GRPO_ROWS - 1) * (prompt - 1)
    assert count(layout(prompt, response, prefix, suffix), pair_cost=1.0)["packed"] == srpo["unpacked"]
