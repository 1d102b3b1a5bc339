"""Code size: every module of src/amorlip is at most MAX_FILE_LINES lines and every function at most
MAX_FUNCTION_LINES, so that a file is one layer a reader can hold and a function one step with a name. Read from
the files (line counts and the AST); imports nothing of the package."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "amorlip"

MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60
"""From the `def` line to the function's last line, its docstring included (decorators not counted)."""

# Empty, and it stays so: a file that grows past a bound is split, not listed.
ALLOWED: set[str] = set()


def modules() -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), p.read_text(encoding="utf-8")) for p in sorted(ROOT.rglob("*.py"))]


def long_files(max_lines: int) -> list[str]:
    return [f"{rel}: {len(text.splitlines())} lines" for rel, text in modules()
            if rel not in ALLOWED and len(text.splitlines()) > max_lines]


def long_functions(max_lines: int) -> list[str]:
    out = []
    for rel, text in modules():
        if rel in ALLOWED:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > max_lines:
                    out.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    return out


def test_the_checks_see_the_package():
    assert len(modules()) > 50 and all((ROOT / rel).is_file() for rel in ALLOWED)
    # with a bound every file and function exceeds, each is listed: the checks look at everything
    assert len(long_files(0)) == len(modules()) - len(ALLOWED)
    assert len(long_functions(1)) > 500


def test_every_file_is_at_most_450_lines():
    assert long_files(MAX_FILE_LINES) == [], "split these into modules that are one layer each:\n" + "\n".join(
        long_files(MAX_FILE_LINES))


def test_every_function_is_at_most_60_lines():
    assert long_functions(MAX_FUNCTION_LINES) == [], "split these into named steps:\n" + "\n".join(
        long_functions(MAX_FUNCTION_LINES))
