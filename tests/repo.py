"""The checkout the tests run from: its root folder, and the README's Python API example."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    """The first ```python block of the README's "Python API" section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Python API"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md: the Python API section has no ```python block"
    return match.group(1)
