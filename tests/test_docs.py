"""The documentation cannot drift from the code: the code blocks marked `<!-- docs-test ... -->` in the README and
the docs pages run here (each page's blocks in order, in one namespace), the site builds with `mkdocs build
--strict` (broken links, pages missing from the navigation, unresolved API references fail), and the README stays
a front door whose links all lead somewhere."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- docs-test"
BLOCK = re.compile(re.escape(MARK) + r"[^\n]*-->\n```python\n(.*?)```", re.S)
PAGES = [path for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] if MARK in path.read_text()]


def test_some_blocks_are_marked_to_run():
    assert sum(len(BLOCK.findall(page.read_text())) for page in PAGES) >= 6
    for page in PAGES:  # a marker not followed by a python block would silently test nothing
        assert page.read_text().count(MARK) == len(BLOCK.findall(page.read_text())), page


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_the_marked_code_blocks_run(page, tmp_path, monkeypatch):
    from hf_mdm import STRATEGIES

    monkeypatch.chdir(tmp_path)
    registered = dict(STRATEGIES)  # a page may register a strategy of its own (the guide shows how): not for others
    namespace = {"__name__": "__docs__"}
    try:
        for index, block in enumerate(BLOCK.findall(page.read_text())):
            try:
                exec(compile(block, f"{page.name}[block {index}]", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"{page.relative_to(ROOT)}, code block {index} fails:\n{block}") from error
    finally:
        STRATEGIES.clear()
        STRATEGIES.update(registered)


def test_the_readme_is_a_front_door_whose_links_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "earlier version" not in text.lower()  # history goes to CHANGELOG.md
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (pip install 'hf_mdm[docs]'); CI installs it")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "models" / "index.html").read_text().count("MDMForMaskedDiffusion") > 3
