"""The core imports nothing outside itself: every module of nanoebm/ is read (as source, not
run) and each import, top-level or inside a function, must name the standard library, a
third-party package or nanoebm itself, never the lab, a script or the tests.

    uv run pytest tests/test_boundary.py
"""
import ast

from tests.conftest import REPO

CORE = REPO / "nanoebm"
# what the repository root holds besides the core: importing any of these from nanoebm/ is an
# arrow out of it (lab/, the scripts, the tests)
OUTSIDE = {p.stem for p in REPO.glob("*.py")} | {p.name for p in REPO.iterdir()
                                                 if p.is_dir() and (p / "__init__.py").exists()}


def imported_names(path) -> list[tuple[int, str]]:
    """(line, top-level module name) of every import in the file, relative ones as 'nanoebm'."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, "nanoebm" if node.level else node.module.split(".")[0]))
    return out


def test_the_outside_set_names_the_lab_and_the_scripts():
    assert {"lab", "tests", "train", "sample", "viz", "download_data"} <= OUTSIDE
    assert "nanoebm" not in OUTSIDE or (CORE / "__init__.py").exists()


def test_no_core_module_imports_the_lab_a_script_or_the_tests():
    arrows = [f"{p.relative_to(REPO)}:{line} imports {name}"
              for p in sorted(CORE.glob("*.py")) for line, name in imported_names(p)
              if name in OUTSIDE - {"nanoebm"}]
    assert not arrows, "\n".join(arrows)


def test_the_walker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef g():\n    from lab.scoring import masked_mean\n")
    assert imported_names(f) == [(1, "os"), (3, "lab")]
