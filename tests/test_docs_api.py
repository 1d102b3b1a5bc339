"""docs/api.md's python snippets run as they are, in order, in one namespace."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_snippets_run(capsys):
    snippets = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(snippets) >= 4
    namespace: dict = {}
    for i, code in enumerate(snippets):
        exec(compile(code, f"{DOC.name} snippet {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "needs each sample's dataset index" in out and "accumulated step" in out
