"""``trl-resets srpo|rrpo|grpo [--config recipe.yaml] [--field value ...]``: the harness from the command line, as
``trl grpo`` is TRL's. The flags are those of ``examples/train_<method>.py`` (``trl-resets srpo --help``)."""

from __future__ import annotations

import argparse
import sys

METHODS = {
    "srpo": "Self-Reset Policy Optimization: the policy localizes its seed's first wrong thought.",
    "rrpo": "Random-Reset Policy Optimization: the reset thought is uniform over the seed's thoughts.",
    "grpo": "The GRPO baseline on the same harness (num_reset_prefixes=0).",
}


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="trl-resets", description="Train with reset-based credit assignment on Hugging Face TRL.",
        epilog="Examples: trl-resets srpo --max_steps 10 (the CPU main job); trl-resets srpo --config RECIPE.yaml --print-config",
    )
    sub = parser.add_subparsers(dest="method", required=True, metavar="{" + ",".join(METHODS) + "}")
    for name, text in METHODS.items():
        sub.add_parser(name, help=text, add_help=False)
    method, rest = (argv[0], argv[1:]) if argv and argv[0] in METHODS else (None, argv)
    if method is None:
        parser.parse_args(rest)  # prints the usage (and exits) for --help, no method or an unknown one
    from .harness import main as run_harness  # imported late: `trl-resets --help` answers without loading torch

    return run_harness(method, rest)


if __name__ == "__main__":
    main()
