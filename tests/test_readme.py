"""The docs document what exists: every setting (docs/configuration.md), every CLI command (README)."""

import re
from pathlib import Path

from stream.cli import build_parser
from stream.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()  # the settings table lives here


def test_settings_table_lists_every_setting():
    documented = set(re.findall(r"^\| `EMOTION_MONITOR_([A-Z0-9_]+)` \|", CONFIGURATION, flags=re.M))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_every_cli_command_is_in_the_readme():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [cmd for cmd in sub.choices if f"emotion-monitor {cmd}" not in README]
    assert not missing, f"commands not described in README.md: {missing}"


def test_the_two_setup_commands_come_first():
    head = README[:800]
    assert "make demo" in head and "make test" in head
