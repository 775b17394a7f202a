"""The settings documentation is in step with common/config.py's table of settings.

docs/configuration.md documents every setting in the section of its kind, with its true default;
README.md's settings table names only settings that exist (with their true defaults too).
"""

from __future__ import annotations

import re

import pytest

from common.config import SETTINGS, Settings
from testkit import REPO

# Setting.section -> the docs/configuration.md heading that documents it
DOC_SECTIONS = {"user": "Settings", "limits": "Limits", "tuning": "Tuning", "internal": "Set by the stack"}
VARIABLE = re.compile(r"^`([A-Z][A-Z0-9_]*)`$")


def sections(markdown: str) -> dict[str, str]:
    """``## heading`` -> the text under it."""
    parts = re.split(r"^## +(.+?) *$", markdown, flags=re.MULTILINE)
    return {heading: body for heading, body in zip(parts[1::2], parts[2::2], strict=True)}


def variable_rows(text: str) -> dict[str, list[str]]:
    """Rows of the markdown tables in ``text`` whose first cell is a `VARIABLE`: name -> cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            match = VARIABLE.match(cells[0])
            if match:
                rows[match.group(1)] = cells
    return rows


def check_default(name: str, cell: str) -> None:
    """The documented default is the Settings default (parsed like the variable's own value). An
    empty default may be documented by what it means (``ACCEL_CACHE_DIR``: the directory used)."""
    setting = next(s for s in SETTINGS if s.env == name)
    default = getattr(Settings(), setting.field)
    if cell == "empty":
        assert default in ("", ()), f"{name}: documented as empty, the default is {default!r}"
        return
    if default in ("", ()):
        return
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"{name}: default cell {cell!r} is neither `value` nor empty"
    documented = getattr(Settings.from_env({name: match.group(1)}), setting.field)
    assert documented == default, f"{name}: documented default {match.group(1)!r}, the code's {default!r}"


@pytest.fixture(scope="module")
def configuration_doc() -> dict[str, str]:
    return sections((REPO / "docs" / "configuration.md").read_text())


def test_every_section_is_documented(configuration_doc):
    assert {s.section for s in SETTINGS} <= set(DOC_SECTIONS)
    missing = [heading for heading in DOC_SECTIONS.values() if heading not in configuration_doc]
    assert not missing, f"docs/configuration.md has no section {missing}"


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.env for s in SETTINGS])
def test_every_setting_is_in_the_configuration_doc(configuration_doc, setting):
    heading = DOC_SECTIONS[setting.section]
    rows = variable_rows(configuration_doc.get(heading, ""))
    assert setting.env in rows, f"{setting.env} is not in the table of docs/configuration.md's '{heading}'"
    check_default(setting.env, rows[setting.env][1])


def test_the_configuration_doc_names_no_other_variable(configuration_doc):
    documented = {name for text in configuration_doc.values() for name in variable_rows(text)}
    assert documented == {s.env for s in SETTINGS}


def test_the_readme_table_names_real_settings_with_their_defaults():
    readme = (REPO / "README.md").read_text()
    tables = [text for text in sections(readme).values() if "| variable | default |" in text]
    assert len(tables) == 1, "README.md should have one settings table (| variable | default | ...)"
    rows = variable_rows(tables[0])
    assert rows, "README.md's settings table names no variable"
    unknown = set(rows) - {s.env for s in SETTINGS}
    assert not unknown, f"README.md's settings table names variables common.config does not read: {unknown}"
    for name, cells in rows.items():
        check_default(name, cells[1])

