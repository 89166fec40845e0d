"""The house rules a reader relies on when reading the files top to bottom: imports flow one way,
in the rows the README lists (a file imports only from rows above its own, so there is no
cycle), and every script of the repository is in one of them."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("", "corpus", "lab", "serve")  # where the project's modules live


def readme_rows():
    """The import rows as the README lists them: the paragraph that starts "Imports flow one
    way", rows separated by "; then", file paths in backquotes (`lab/measure.py`)."""
    text = (ROOT / "README.md").read_text()
    paragraph = " ".join(text[text.index("Imports flow one way"):].split("\n\n")[0].split())
    rows = paragraph[paragraph.index(":") + 1:].split("; then")
    return [re.findall(r"`([\w/]+)\.py`", row) for row in rows]


def project_modules():
    """Every module of the project as a path without .py ("model", "lab/measure"); a package's
    __init__.py only when it holds more than its docstring."""
    found = set()
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            name = path.relative_to(ROOT).with_suffix("").as_posix()
            if path.stem == "__init__":
                body = ast.parse(path.read_text()).body
                if all(isinstance(n, ast.Expr) for n in body):
                    continue
                name = name.removesuffix("/__init__")
            found.add(name)
    return found


def project_imports(path, modules):
    """The project modules a file imports: import a.b, from a import b, from a.b import c."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name.replace(".", "/") for name in names}
    return found & modules


def test_every_file_is_in_a_row_and_imports_only_from_rows_above():
    rows = readme_rows()
    row_of = {name: i for i, row in enumerate(rows) for name in row}
    modules = project_modules()
    assert set(row_of) == modules, "the README's import rows and the repository's files differ"
    for name in sorted(modules):
        path = ROOT / f"{name}.py"
        if not path.exists():
            path = ROOT / name / "__init__.py"
        for imported in project_imports(path, modules):
            assert row_of[imported] < row_of[name], f"{name}.py imports {imported}.py from its " \
                                                    f"own row or a row below"
