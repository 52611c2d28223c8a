"""MkDocs hooks. The home page is the README, its links rewritten for the site (one text, no copy to drift), and
the plots under results/ are served at results/... inside the site, so pages show the very files the benchmark
scripts wrote."""

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]


def home_page() -> str:
    text = (ROOT / "README.md").read_text()
    text = text.replace("](docs/", "](").replace("](CHANGELOG.md)", "](changelog.md)")
    return re.sub(r"`docs/reference/`", "[the reference pages](reference/models.md)", text)


def on_files(files, config):
    files.append(File.generated(config, "index.md", content=home_page()))
    for path in sorted((ROOT / "results").rglob("*.png")):
        uri = path.relative_to(ROOT).as_posix()
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
