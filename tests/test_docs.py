"""The README states facts kept in code once: its settings table is rendered from ``service.settings.Settings``."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings, settings_table

README = Path(__file__).resolve().parent.parent / "README.md"
TABLE_MARKERS = re.compile(r"<!-- settings-table -->\n(.*?)\n<!-- /settings-table -->", re.DOTALL)


def readme_settings_table() -> str:
    found = TABLE_MARKERS.findall(README.read_text())
    assert len(found) == 1, "README.md needs exactly one <!-- settings-table --> ... <!-- /settings-table --> block"
    return str(found[0]).strip()


def test_readme_settings_table_is_the_rendered_one() -> None:
    # A setting added, renamed or re-described without the README following fails here; the fix is to paste
    # `python -m service.settings` between the markers.
    assert readme_settings_table() == settings_table()


def test_settings_table_has_a_described_row_per_setting() -> None:
    rows = settings_table().splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [f"| `KDSEARCH_{name.upper()}`" for name in Settings.model_fields]
    undescribed = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert undescribed == []
    # Defaults are shown as written, never as computed on the machine rendering the table.
    assert str(Path.cwd()) not in settings_table()
    assert str(Path.home()) not in settings_table()
    assert "| `KDSEARCH_DATABASE_URL` | `sqlite:///./kdsearch.db` |" in settings_table()
    assert "| `KDSEARCH_PUBLIC_READ` | `false` |" in settings_table()
    assert "| `KDSEARCH_ENGINE` | (unset) |" in settings_table()


def test_readme_names_the_client_variables() -> None:
    # The CLI reads these itself (service/cli.py), outside Settings: the README lists them under the table.
    text = README.read_text()
    after_table = text[text.index("<!-- /settings-table -->"):]
    for variable in ("KDSEARCH_URL", "KDSEARCH_API_TOKEN"):
        assert variable in after_table[:2000]
