"""mkdocs hook: the site's home page is README.md, so the two never drift apart.

docs/index.md holds only a pointer; on_page_markdown replaces it with README.md, its links
into docs/ made relative to the site (``](docs/compile.md)`` -> ``](compile.md)``).
"""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    return re.sub(r"\]\(docs/", "](", README.read_text())
