"""docs/operations.md's settings reference is the one `branchwise settings` makes from the
Settings class: a setting added or changed without its page fails here."""

from __future__ import annotations

import re
import subprocess
import sys

from branchwise.settings import Settings, UpstreamConfig, reference

from .conftest import ROOT

PAGE = ROOT / "docs" / "operations.md"
BLOCK = re.compile(r"<!-- settings:begin[^>]*-->\n(.*?)<!-- settings:end -->", re.S)


def test_every_setting_has_a_meaning():
    missing = [n for n, f in {**Settings.model_fields, **UpstreamConfig.model_fields}.items() if not f.description]
    assert not missing, f"settings without a docstring (the reference's 'meaning'): {missing}"


def test_operations_page_has_the_generated_reference():
    found = BLOCK.search(PAGE.read_text())
    assert found, "docs/operations.md lost its settings markers"
    assert found.group(1) == reference(), ("docs/operations.md's settings table is out of date: replace the "
                                           "block between the markers with the output of `branchwise settings`")


def test_the_command_prints_it():
    r = subprocess.run([sys.executable, "-m", "branchwise", "settings"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == reference()
