"""Imports point one way: tools and training import the serving core, never the reverse; one Kafka client factory."""

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


# ---- the stream package: core <- worker <- tools, each folder one role ----------------------------

STREAM = ROOT / "stream"
# What serves traffic: the pure core, the worker, and the Kafka client factory and settings they share.
SERVING = [*sorted((STREAM / "core").rglob("*.py")), *sorted((STREAM / "worker").rglob("*.py")),
           STREAM / "kafka.py", STREAM / "settings.py"]
PEOPLE_FACING = ("stream.tools", "stream.dashboard", "stream.cli")


def _offenders(paths, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for path in paths:
        bad = sorted(m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden))
        if bad:
            out[str(path.relative_to(ROOT))] = bad
    return out


def test_core_and_worker_never_import_tools_dashboard_or_cli():
    offenders = _offenders(SERVING, PEOPLE_FACING)
    assert not offenders, f"the serving side imports a tool, the dashboard or the CLI: {offenders}"


def test_the_dashboard_reads_the_core_never_the_worker_or_a_tool():
    offenders = _offenders(sorted((STREAM / "dashboard").rglob("*.py")), ("stream.tools", "stream.worker", "stream.cli"))
    assert not offenders, f"the dashboard imports the worker, a tool or the CLI: {offenders}"


def test_core_is_pure_no_kafka_redis_faust_or_worker():
    offenders = _offenders(sorted((STREAM / "core").rglob("*.py")),
                           ("faust", "aiokafka", "redis", "stream.worker", "stream.kafka", "stream.settings", *PEOPLE_FACING))
    assert not offenders, f"stream/core imports I/O or a layer above it: {offenders}"


KAFKA_CLIENTS = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"}


def test_every_kafka_client_is_built_by_the_one_factory():
    """Producers, consumers and admin clients of stream/ and tests/ come from stream/kafka.py (its
    security options, bootstrap list and defaults); nothing else calls their constructors."""
    offenders = []
    for path in sorted([*STREAM.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        if path == STREAM / "kafka.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in KAFKA_CLIENTS:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}(...)")
    assert not offenders, f"build Kafka clients with stream.kafka.producer/consumer/admin: {offenders}"
