"""Text that came with a run or an upload (a run.json is hostile) shown as itself in Markdown: the
app's cards and the exported model's card."""
from __future__ import annotations

import html
import re

# Markdown's own punctuation, and what would turn into a link or formula of its own (a URL, www., an
# e-mail address, $…$): escaped, it shows as itself. (html.escape has already made < > & text.)
_MARKUP = re.compile(r"([\\`*_\[\]~|#!$@]|:(?=//)|(?<=www)\.)", re.IGNORECASE)


def plain(text: object) -> str:
    """`text` on one line, with no links, images, HTML, headings or emphasis of its own."""
    return _MARKUP.sub(r"\\\1", html.escape(" ".join(str(text).split()), quote=False))
