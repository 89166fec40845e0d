"""The house rules a reader relies on when reading the files top to bottom: imports flow one way,
in the rows the README lists (a file imports only from rows above its own, so there is no
cycle), and every script of the repository is in one of them."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_rows():
    """The import rows as the README lists them: the paragraph that starts "Imports flow one
    way", rows separated by "; then", file names in backquotes."""
    text = (ROOT / "README.md").read_text()
    paragraph = " ".join(text[text.index("Imports flow one way"):].split("\n\n")[0].split())
    rows = paragraph[paragraph.index(":") + 1:].split("; then")
    return [re.findall(r"`(\w+)\.py`", row) for row in rows]


def project_imports(path, modules):
    """The project modules a file imports (import x, from x import y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found & modules


def test_every_file_is_in_a_row_and_imports_only_from_rows_above():
    rows = readme_rows()
    row_of = {name: i for i, row in enumerate(rows) for name in row}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert set(row_of) == modules, "the README's import rows and the repository's files differ"
    for name in sorted(modules):
        for imported in project_imports(ROOT / f"{name}.py", modules):
            assert row_of[imported] < row_of[name], f"{name}.py imports {imported}.py from its " \
                                                    f"own row or a row below"
