"""Imports point one way: tools and training import the serving core, never the reverse."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The serving core of the model package: what a worker loads. The CLI is a tool.
MODEL_TOOLS = {"cli.py", "__init__.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_model_serving_code_never_imports_training_or_stream():
    offenders = {}
    for path in sorted((ROOT / "model").glob("*.py")):
        if path.name in MODEL_TOOLS:
            continue
        bad = {m for m in imported_modules(path) if m.startswith(("model.training", "stream", "aiokafka", "faust", "redis"))}
        if bad:
            offenders[path.name] = sorted(bad)
    assert not offenders, f"serving modules import training or Kafka/Redis code: {offenders}"


def test_model_package_never_imports_stream():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "stream")
                 for p in (ROOT / "model").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}
