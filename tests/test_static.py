"""The README's statements about the layout and the C-STORE statuses, checked against the code.

The static checks (ruff lint and format, mypy, the import contracts of pyproject.toml) are a step of their own:
``bash .ci/static``, which CI runs before the tests (README, "Run the tests")."""

from __future__ import annotations

import re
from pathlib import Path

from dicom_node.ingest.statuses import ALL as STORE_STATUSES

REPO = Path(__file__).resolve().parents[1]


def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, f"README has no section '## {title}'"
    return m.group(1)


def test_readme_lists_every_cstore_status_the_node_answers():
    section = _readme_section("How it behaves")
    listed = dict(re.findall(r"`0x([0-9A-F]{4})` ([^;\n]+)", section))
    codes = {f"{s.code:04X}" for s in STORE_STATUSES}
    assert set(listed) == codes, f"README lists {sorted(listed)}, the node answers {sorted(codes)}"
    for s in STORE_STATUSES:
        assert s.meaning in section, f"README does not say what 0x{s.code:04X} means: {s.meaning!r}"


def test_readme_layout_matches_the_tree():
    block = re.search(r"```\n(.*?)```", _readme_section("Layout"), flags=re.S).group(1)
    named = set(re.findall(r"^\s*([\w/.]+/)\s", block, flags=re.M))
    on_disk = {f"{p.relative_to(REPO)}/" for p in REPO.glob("*/") if p.is_dir() and not p.name.startswith(".")}
    on_disk |= {
        f"{p.relative_to(REPO)}/"
        for pkg in ("dicom_node", "inference", "tests")
        for p in (REPO / pkg).glob("*/")
        if p.is_dir() and not p.name.startswith((".", "_"))
    }
    ignored = {"var/", "runs/", "build/", "dist/", "analysis/", "test-artefacts/"} | {
        p for p in on_disk if p.endswith(".egg-info/")
    }
    assert named == on_disk - ignored
