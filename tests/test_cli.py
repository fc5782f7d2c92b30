"""The console script: ``trl-resets srpo|rrpo|grpo`` runs the harness with the method's flags and recipes."""

import pytest

from trl_resets.app import cli


def test_each_method_answers_help_with_its_own_config_fields(capsys):
    for method, field in (("srpo", "--localization_max_tokens"), ("rrpo", "--num_reset_generations"),
                          ("grpo", "--num_reset_prefixes")):
        with pytest.raises(SystemExit) as done:
            cli.main([method, "--help"])
        assert done.value.code == 0
        assert field in capsys.readouterr().out


def test_flags_reach_the_harness_parser():
    with pytest.raises(ValueError, match="num_reset_prefixes=0"):  # the GRPO baseline refuses reset groups
        cli.main(["grpo", "--num_reset_prefixes", "1", "--num_base_generations", "4", "--output_dir", "unused"])


@pytest.mark.parametrize("argv", [[], ["ppo"], ["--max_steps", "1"]])
def test_a_missing_or_unknown_method_prints_the_usage(argv, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2
    assert "{srpo,rrpo,grpo}" in capsys.readouterr().err
