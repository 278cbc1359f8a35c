"""MkDocs hook: the site's home page is the repository's README, read at build time.

``docs/index.md`` holds a note for readers of the repository and the marker ``<!-- readme -->``; this
hook makes the page the text of ``README.md``, its links into ``docs/`` made relative to the site
(``docs/training.md`` → ``training.md``). The README's other relative links would point outside the
site, so ``mkdocs build --strict`` refuses them: the README links only into ``docs/`` and to web
addresses. The other pages link to the README as ``../README.md`` (which works on GitHub too); in the
site those links point at the home page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

MARKER = "<!-- readme -->"
PAGE = "index.md"
README = Path(__file__).resolve().parents[2] / "README.md"

# an inline link or image target: ](docs/x.md#anchor) in the README, ](../README.md#anchor) in a page
_DOCS_LINK = re.compile(r"\]\(docs/")
_README_LINK = re.compile(r"\]\(\.\./README\.md(?=[)#])")


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """The README as ``index.md``; links to the README on the other pages aimed at the home page."""
    if page.file.src_uri != PAGE:
        return _README_LINK.sub("](index.md", markdown)
    if MARKER not in markdown:
        raise PluginError(f"docs/{PAGE} lost its {MARKER} marker: the home page has no README to show")
    return _DOCS_LINK.sub("](", README.read_text(encoding="utf-8"))
