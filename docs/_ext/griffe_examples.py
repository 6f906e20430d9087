"""A griffe extension for the docs: read ``Example:`` sections as ``Examples:``.

selectorch's docstrings head their doctest examples with ``Example:``; griffe's Google parser
only turns ``Examples:`` sections into code blocks (``Example:`` would be rendered as Markdown,
where ``>>>`` is a nested quote). This rewrites the heading when griffe loads each object.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headings to ``Examples:`` in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
