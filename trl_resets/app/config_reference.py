"""Writes docs/configuration.md, the configuration reference, from the config classes themselves:

    python -m trl_resets.config_reference          # rewrite docs/configuration.md
    python -m trl_resets.config_reference --check  # exit 1 when the page is stale

Each field the package adds is documented once, in `ResetConfig`'s docstring (TRL's style: a ``> Heading``, then
``name (`type`, defaults to ...):`` and an indented description); this module lays those entries out with the
field's real defaults, and lists how each option of TRL's GRPOConfig stands (`options.py`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from trl import GRPOConfig

from .. import config as reset_config
from .. import options

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
_HEADING = re.compile(r"^ {4}> (.+)$")
_ENTRY = re.compile(r"^ {4}(\w+) \(`([^`]+)`(?: or `([^`]+)`)?, defaults to (.+)\):$")


def docstring_entries(cls) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(heading, [(field, description)])] in the docstring's order."""
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    current: list[str] | None = None
    for line in (cls.__doc__ or "").splitlines():
        if heading := _HEADING.match(line):
            sections.append((heading.group(1), []))
            current = None
        elif entry := _ENTRY.match(line):
            if not sections:
                raise ValueError(f"{cls.__name__}'s docstring documents {entry.group(1)!r} before any > heading.")
            current = [entry.group(1), ""]
            sections[-1][1].append(current)
        elif current is not None and line.startswith(" " * 8):
            current[1] = f"{current[1]} {line.strip()}".strip()
        elif line.strip():
            current = None
    return [(h, [tuple(e) for e in entries]) for h, entries in sections]


def _default(cls, name: str) -> str:
    field = next(f for f in fields(cls) if f.name == name)
    value = field.default if field.default is not MISSING else field.default_factory()  # type: ignore[misc]
    text = repr(value)
    return f"`{text}`" if len(text) <= 40 else "the package's text (see `trl_resets`)"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    srpo, rrpo, base = reset_config.SRPOConfig, reset_config.RRPOConfig, reset_config.ResetConfig
    documented = {name for _, entries in docstring_entries(base) for name, _ in entries}
    grpo_fields = {f.name for f in fields(GRPOConfig)}
    added = [f.name for f in fields(base) if f.name not in grpo_fields or f.name in documented]
    missing = sorted(set(added) - documented)
    if missing:
        raise ValueError(f"ResetConfig fields without a docstring entry: {missing}; document them in config.py.")
    lines = [
        "# Configuration reference",
        "",
        ("<!-- Written by `python -m trl_resets.config_reference` from the config classes; edit config.py, not this "
        "page. -->"),
        "",
        ("`SRPOConfig` and `RRPOConfig` are TRL's `GRPOConfig` plus the fields below; every field is also a "
        "command-line flag of the training scripts (`--name value`) and a recipe key. They differ only in the "
        "defaults shown in both columns."),
        "",
    ]
    for heading, entries in docstring_entries(base):
        lines += [f"## {heading}", "", "| field | SRPOConfig default | RRPOConfig default | what it does |",
                  "|---|---|---|---|"]
        for name, text in entries:
            lines.append(f"| `{name}` | {_cell(_default(srpo, name))} | {_cell(_default(rrpo, name))} | {_cell(text)} |")
        lines.append("")
    lines += [
        "## How each GRPOConfig option stands",
        "",
        ("Every other field is `GRPOConfig`'s, with TRL's meaning. The fields of transformers' `TrainingArguments` "
         "(optimizer, schedule, logging, saving) act as in any Trainer; each option that `GRPOConfig` adds stands in "
         "one of these ways (`trl_resets.options`, which the config and the trainers check when they are built):"),
        "",
        "| stands | meaning |",
        "|---|---|",
        *(f"| {label} | {meaning} |" for label, meaning in options.STANDS.items()),
        "",
        ("A value that cannot be honoured raises a `ValueError` naming the option and the fix when the config is "
         "built, before any compute."),
        "",
        "| option | stands | values refused | notes |",
        "|---|---|---|---|",
    ]
    for name in sorted(options.OPTIONS):
        option = options.OPTIONS[name]
        refused = "all but the default" if option.stands == "refused" else ("some" if option.refuse else "none")
        lines.append(f"| `{name}` | {option.stands} | {refused} | {_cell(option.note)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    page = render()
    if "--check" in argv:
        if not PAGE.exists() or PAGE.read_text() != page:
            print(f"{PAGE} is stale: run `python -m trl_resets.config_reference`.", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
