"""docs/configuration.md is generated from the config classes and fails here when it is stale."""

from dataclasses import dataclass, field

import pytest

from trl_resets import SRPOConfig
from trl_resets.app import config_reference
from trl_resets.config import ResetConfig


def test_the_page_is_current():
    assert config_reference.PAGE.read_text() == config_reference.render(), (
        "docs/configuration.md is stale: run `python -m trl_resets.app.config_reference`.")
    assert config_reference.main(["--check"]) == 0


def test_every_added_field_has_its_entry_with_its_real_default():
    page = config_reference.render()
    added = {f for f in SRPOConfig.__dataclass_fields__} - set(ResetConfig.__mro__[1].__dataclass_fields__)
    assert added and all(f"| `{name}` |" in page for name in added)
    assert "| `localizer` | `'self'` | `'random'` |" in page


def test_a_field_without_a_docstring_entry_is_an_error(monkeypatch):
    @dataclass
    class Extended(ResetConfig):
        undocumented_knob: int = field(default=3)

    monkeypatch.setattr(config_reference.reset_config, "ResetConfig", Extended)
    with pytest.raises(ValueError, match="undocumented_knob"):
        config_reference.render()
