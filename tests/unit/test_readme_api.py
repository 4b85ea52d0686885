"""The README's Python API example keeps the lines its run on real servers replaces
(tests/real/test_readme_api_real.py), and compiles.
"""

from __future__ import annotations

import re

from repo import readme_example


def test_readme_has_a_python_api_example_with_the_names_the_test_sets() -> None:
    code = readme_example()
    for line in ('MODEL = "', 'EXECUTOR = "', "NODES = "):
        assert re.search(rf"^{re.escape(line)}", code, re.M), f"README example lost its {line.split()[0]} line"
    compile(code, "README.md", "exec")
