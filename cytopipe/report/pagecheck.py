"""A blinded report's page, read for the leak check the way a reader reads it.

The page (cytopipe/report/html.py) is markup that the report's code writes around text. The check
(:func:`page_leaks`) reads what can carry the run's data, not the markup: the text of every element
but the style sheet (the page has no scripts; a script's text would be checked like any other), and
the value of every attribute but those the code writes as markup (``class``, ``style``, ``lang``,
``charset``, and ``<meta>``'s): a tag ``<b>`` or ``<a href>`` is not the arm ``B`` or ``A``, nor
``<li>`` the arm ``LI``, nor a rule ``nav.toc a { ... }`` of the style sheet. Figures (``data:``
URIs, where any short string occurs by chance) are checked from the texts they were drawn with,
apart (cytopipe/report/build.py). Each element's text is read on its own line, so that a text
starts where a reader sees it start (a table cell ``A`` is the arm, a sentence ``A gate is ...``
starts with the article: :func:`cytopipe.report.armnames.leak_pattern`).
"""

from __future__ import annotations

from collections.abc import Iterable
from html.parser import HTMLParser

from cytopipe.report.armnames import find_leaks

#: attributes the report's code writes as markup; every other attribute's value is checked
MARKUP_ATTRIBUTES = frozenset({"class", "style", "lang", "charset"})


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.attributes: list[str] = []
        self._style = 0  # inside <style>: the report's own style sheet (CSS), not data

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._style += tag == "style"
        if tag == "meta":  # the page's character set and viewport: markup
            return
        for name, value in attrs:
            if value and name not in MARKUP_ATTRIBUTES and not value.startswith("data:"):
                self.attributes.append(value)

    def handle_endtag(self, tag: str) -> None:
        self._style -= tag == "style" and self._style > 0

    def handle_data(self, data: str) -> None:
        if not self._style:
            self.text.append(data)


def page_texts(page: str) -> dict[str, str]:
    """The page's texts as the check reads them (see the module's docstring): ``report.html``
    (the elements' text, one per line) and ``report.html, attributes`` (one value per line)."""
    reader = _Reader()
    reader.feed(page)
    reader.close()
    return {"report.html": "\n".join(reader.text), "report.html, attributes": "\n".join(reader.attributes)}


def page_leaks(page: str, arms: Iterable[str]) -> list[str]:
    """``["where: arm name", ...]`` for every arm name the page shows:
    :func:`cytopipe.report.armnames.find_leaks` on :func:`page_texts`."""
    return find_leaks(page_texts(page), arms)
