"""Deployment files, checked by parsing (no Docker engine, no cluster needed).

compose.yaml, deploy/Dockerfile, deploy/Dockerfile.cuda, .dockerignore and deploy/k8s/*.yaml are
read as data and checked for the structure the worker relies on, and against each other:
environment variable names against the settings object, probe ports against the configured web
port, selectors against pod labels, KEDA's target against the Deployment and the topic's
partition count. Running the images and the manifests is not tested here (deploy/README.md).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from model.encoders import ENV_VARS
from stream.kafka import bootstrap_servers
from stream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile", "cuda": DEPLOY / "Dockerfile.cuda"}
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_README = DEPLOY / "README.md"

PREFIX = "EMOTION_MONITOR_"
# The worker's Settings, plus the model package's own variables (base-encoder folders, cache).
SETTINGS_ENV = {PREFIX + name.upper() for name in Settings.model_fields} | set(ENV_VARS)
# A name needs at least one character after the prefix, so `EMOTION_MONITOR_*` in prose is no match.
ENV_NAME = re.compile(r"(?<![A-Za-z0-9_])EMOTION_MONITOR_[A-Z0-9_]*[A-Z0-9]")

WORKER_SERVICES = ("worker", "worker-cpu")
NAME_LABEL = "app.kubernetes.io/name"
# Kafka SASL keys of the example Secret: each must be a setting the worker reads.
KAFKA_SECRET_KEYS = {"EMOTION_MONITOR_KAFKA_SASL_MECHANISM", "EMOTION_MONITOR_KAFKA_SASL_USERNAME",
                     "EMOTION_MONITOR_KAFKA_SASL_PASSWORD"}


def default(field: str):
    return Settings.model_fields[field].default


# ----------------------------------------------------------------------------------------------
# loading helpers
# ----------------------------------------------------------------------------------------------

def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose() -> dict:
    return load_yaml(COMPOSE)


def service(name: str) -> dict:
    return compose()["services"][name]


_INTERP = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value) -> str:
    """A compose value as compose sees it with no variables set: `${X:-d}` -> d, `$$` -> `$`."""
    text = str(value)

    def repl(m: re.Match) -> str:
        if m.group("op") in (":-", "-"):
            return m.group("arg")
        raise AssertionError(f"{m.group(0)} has no default: `docker compose up` needs it set")

    return _INTERP.sub(repl, text.replace("$$", "\0")).replace("\0", "$")


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # KEY=value list form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: interpolate(v) for k, v in env.items()}


def command_text(cmd) -> str:
    return " ".join(cmd) if isinstance(cmd, list) else str(cmd or "")


def healthcheck_text(svc: dict) -> str:
    test = (svc.get("healthcheck") or {}).get("test")
    return command_text(test)


def k8s_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def k8s_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def k8s_object(kind: str, name: str | None = None) -> dict:
    found = [d for p in k8s_files() if p.name != "kustomization.yaml" for d in k8s_docs(p)
             if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def deployment(component: str) -> dict:
    found = [d for p in k8s_files() for d in k8s_docs(p) if d.get("kind") == "Deployment"
             and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one Deployment with component={component}, found {len(found)}"
    return found[0]


def only_container(dep: dict) -> dict:
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{dep['metadata']['name']}: expected one container"
    return containers[0]


def configmap_data() -> dict[str, str]:
    return k8s_object("ConfigMap")["data"]


def configured(data: dict[str, str], field: str) -> str:
    return str(data.get(PREFIX + field.upper(), default(field)))


def probe_port(probe: dict, container: dict) -> int:
    """The port a probe checks: httpGet/tcpSocket port (named ports resolved) or the URL of an exec."""
    for kind in ("httpGet", "tcpSocket", "grpc"):
        if kind in probe:
            port = probe[kind]["port"]
            if isinstance(port, str) and not port.isdigit():
                named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
                assert port in named, f"probe port {port!r} is not a named container port"
                return int(named[port])
            return int(port)
    if "exec" in probe:
        m = re.search(r"(?:localhost|127\.0\.0\.1):(\d+)/", " ".join(probe["exec"]["command"]))
        assert m, f"exec probe does not name a local URL: {probe['exec']['command']}"
        return int(m.group(1))
    raise AssertionError(f"probe of an unknown kind: {probe}")


def probe_path(probe: dict) -> str:
    if "httpGet" in probe:
        return probe["httpGet"].get("path", "/")
    m = re.search(r"(?:localhost|127\.0\.0\.1):\d+(/[^'\"\s]*)", " ".join(probe["exec"]["command"]))
    assert m, f"no URL path in {probe}"
    return m.group(1)


def subset(small: dict, big: dict) -> bool:
    return all(big.get(k) == v for k, v in small.items())


# ---- Dockerfiles ---------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, f"{path.name}: dangling line continuation"
    return out


def exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def index_of(instructions, predicate, what: str, path: Path) -> int:
    hits = [i for i, ins in enumerate(instructions) if predicate(ins)]
    assert hits, f"{path.name}: no {what}"
    return hits[0]


def is_torch_install(ins) -> bool:
    return ins[0] == "RUN" and re.search(r"pip install\s+(\S+\s+)*[\"']?torch==", ins[1]) is not None


def is_project_install(ins) -> bool:
    # `pip install ... .` or `pip install ... ".[extra]"` (the project from the build context)
    return ins[0] == "RUN" and re.search(r"pip install\b[^&;]*\s[\"']?\.(\[[\w,-]+\])?[\"']?(\s|$)", ins[1]) is not None


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern excludes a folder and its content."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!")
        candidates = [pat]
        if pat.startswith("**/"):
            candidates.append(pat[3:])
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates) or (
            pat.startswith("**/") and any(fnmatch.fnmatchcase(part, pat[3:]) for part in parts)):
            excluded = not negate
    return excluded


# ----------------------------------------------------------------------------------------------
# every file parses
# ----------------------------------------------------------------------------------------------

def test_every_yaml_file_parses():
    paths = [COMPOSE, *sorted(DEPLOY.rglob("*.yaml")), *sorted(DEPLOY.rglob("*.yml"))]
    assert len(paths) >= 10, "compose.yaml and the deploy/k8s manifests are missing"
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        assert docs, f"{path.relative_to(ROOT)} holds no YAML document"
        assert all(isinstance(d, dict) for d in docs), f"{path.relative_to(ROOT)}: a document is not a mapping"


# ----------------------------------------------------------------------------------------------
# settings names and values
# ----------------------------------------------------------------------------------------------

def scanned_files() -> list[Path]:
    return [COMPOSE, *DOCKERFILES.values(), *k8s_files(), DEPLOY_README]


def test_every_emotion_monitor_variable_is_a_setting():
    used: dict[str, set[str]] = {}
    for path in scanned_files():
        for name in ENV_NAME.findall(path.read_text(encoding="utf-8")):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    # The scan itself must see the variables the stack cannot run without.
    for needed in ("EMOTION_MONITOR_BROKERS", "EMOTION_MONITOR_REDIS_URL", "EMOTION_MONITOR_REDIS_PASSWORD"):
        assert needed in used, f"{needed} is not set anywhere in the deployment files"
    unknown = {name: sorted(files) for name, files in used.items() if name not in SETTINGS_ENV}
    assert not unknown, f"not in stream.settings.Settings (typo, or a setting still to add): {unknown}"


def test_the_name_scan_rejects_a_typo():
    # Guards the check above: a misspelt variable is found and is not a setting.
    text = "environment:\n  EMOTION_MONITOR_REDIS_PASSWROD: x\n  see EMOTION_MONITOR_* for all\n"
    found = ENV_NAME.findall(text)
    assert found == ["EMOTION_MONITOR_REDIS_PASSWROD"]
    assert found[0] not in SETTINGS_ENV


def settings_from(env: dict[str, str], monkeypatch) -> Settings:
    import os

    for key in list(os.environ):
        if key.startswith(PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(PREFIX):
            monkeypatch.setenv(key, value)
    return Settings()


@pytest.mark.parametrize("name", [*WORKER_SERVICES, "dashboard"])
def test_compose_environment_is_valid_settings(name, monkeypatch):
    s = settings_from(env_of(service(name)), monkeypatch)  # raises on a value of the wrong type
    assert s.broker_list == ["kafka://kafka:9092"]


def test_k8s_environment_is_valid_settings(monkeypatch):
    env = dict(configmap_data())
    env.update({e["name"]: e["value"] for e in only_container(deployment("dashboard")).get("env", []) if "value" in e})
    s = settings_from(env, monkeypatch)
    assert s.web_port == 6066 and s.dashboard_host == "0.0.0.0"


# ----------------------------------------------------------------------------------------------
# compose.yaml
# ----------------------------------------------------------------------------------------------

def compose_spec_schema() -> dict:
    """The Compose Specification's JSON Schema, as vendored by check-jsonschema (read, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("check-jsonschema is not installed (dev extra): no Compose Specification schema")
    path = Path(next(iter(spec.submodule_search_locations))) / "builtin_schemas" / "vendor" / "compose-spec.json"
    assert path.is_file(), f"check-jsonschema no longer ships {path}"
    return json.loads(path.read_text(encoding="utf-8"))


def test_compose_follows_the_compose_specification():
    import jsonschema

    schema = compose_spec_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    # and the schema does catch a misspelt key
    broken = compose()
    broken["services"]["redis"]["healthchek"] = broken["services"]["redis"].pop("healthcheck")
    assert list(validator.iter_errors(broken))


def test_compose_has_the_services():
    assert {"kafka", "topics", "redis", "worker", "worker-cpu", "dashboard"} <= set(compose()["services"])


def test_long_running_services_have_healthchecks():
    for name, svc in compose()["services"].items():
        if name == "topics":
            assert svc.get("restart") in (None, "no"), "topics is one-shot: it must not be restarted"
            continue
        hc = svc.get("healthcheck") or {}
        assert not hc.get("disable"), f"{name}: healthcheck disabled"
        assert healthcheck_text(svc).strip() not in ("", "NONE"), f"{name}: no healthcheck test"


def test_depends_on_uses_conditions_that_can_be_met():
    services = compose()["services"]
    for name in (*WORKER_SERVICES, "dashboard", "topics"):
        deps = services[name].get("depends_on")
        assert isinstance(deps, dict), f"{name}: depends_on must name conditions, not just services"
        for target, spec in deps.items():
            assert target in services, f"{name} depends on unknown service {target}"
            cond = spec.get("condition")
            assert cond in ("service_healthy", "service_completed_successfully", "service_started"), (name, target)
            if cond == "service_healthy":
                assert services[target].get("healthcheck"), f"{name} waits for {target} to be healthy; it has no healthcheck"
            if cond == "service_completed_successfully":
                assert services[target].get("restart") in (None, "no"), f"{target} restarts, so it never completes"
    for name in WORKER_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["kafka"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["topics"]["condition"] == "service_completed_successfully"
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_kafka_runs_in_kraft_mode_and_is_reachable_as_kafka_9092():
    kafka = service("kafka")
    assert kafka["image"].startswith("apache/kafka:")
    env = env_of(kafka)
    assert {"broker", "controller"} <= set(env["KAFKA_PROCESS_ROLES"].split(","))
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in env and "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert "://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    hc = healthcheck_text(kafka)
    assert "/opt/kafka/bin/kafka-topics.sh" in hc and "--bootstrap-server localhost:9092" in hc and "--list" in hc


def test_topics_service_creates_every_topic_the_monitor_uses():
    topics = service("topics")
    script = command_text(topics.get("entrypoint")) + "\n" + command_text(topics.get("command"))
    assert "/opt/kafka/bin/kafka-topics.sh" in script and "kafka:9092" in script and "--if-not-exists" in script
    created = dict(re.findall(r"^\s*create\s+([\w.-]+)\s+(\d+)\s*$", script, flags=re.MULTILINE))
    wanted = {default(f) for f in ("utterances_topic", "emotions_topic", "dlq_topic", "alerts_topic", "summaries_topic")}
    assert set(created) == wanted
    for name in WORKER_SERVICES:
        partitions = env_of(service(name)).get(PREFIX + "PARTITIONS", str(default("partitions")))
        assert created[default("utterances_topic")] == partitions, f"{name}: EMOTION_MONITOR_PARTITIONS != partitions of utterances"


def test_redis_persists_and_requires_the_workers_password():
    redis = service("redis")
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    cmd = command_text(redis["command"])
    assert "--appendonly yes" in cmd
    assert "--requirepass" in cmd
    assert any(str(v).split(":")[1] == "/data" for v in redis.get("volumes", [])), "no volume for /data"
    hc = healthcheck_text(redis)
    assert "redis-cli" in hc and "ping" in hc and "-a " in hc
    assert "PONG" in hc, "redis-cli exits 0 on NOAUTH: the check must look for PONG"
    password = env_of(redis)["REDIS_PASSWORD"]
    assert password, "REDIS_PASSWORD needs a local default"
    for name in WORKER_SERVICES:
        assert env_of(service(name))[PREFIX + "REDIS_PASSWORD"] == password, f"{name}: not the Redis password"


@pytest.mark.parametrize("name", WORKER_SERVICES)
def test_workers_reach_kafka_and_redis_and_check_the_faust_web_port(name):
    svc = service(name)
    env = env_of(svc)
    assert env[PREFIX + "BROKERS"] == "kafka://kafka:9092"
    assert env[PREFIX + "REDIS_URL"] == "redis://redis:6379/0"
    port = env.get(PREFIX + "WEB_PORT", str(default("web_port")))
    assert f"localhost:{port}/" in healthcheck_text(svc) or f"127.0.0.1:{port}/" in healthcheck_text(svc)
    assert command_text(svc.get("command")) in ("", "worker")
    assert "ports" not in svc, "workers publish no host port: `--scale` would clash"


def test_gpu_worker_reserves_an_nvidia_gpu_and_cpu_worker_does_not():
    worker, cpu = service("worker"), service("worker-cpu")
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and int(d.get("count", 0)) == 1 and "gpu" in d.get("capabilities", [])
               for d in devices), devices
    assert worker["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    assert cpu["build"]["dockerfile"] == "deploy/Dockerfile"
    for svc in (worker, cpu, service("dashboard")):
        assert (ROOT / svc["build"].get("context", ".") / svc["build"]["dockerfile"]).is_file()
    assert env_of(worker)[PREFIX + "DEVICE"] == "cuda" and env_of(cpu)[PREFIX + "DEVICE"] == "cpu"


def test_dashboard_listens_on_all_interfaces_on_8088():
    dash = service("dashboard")
    env = env_of(dash)
    assert env[PREFIX + "DASHBOARD_HOST"] == "0.0.0.0"
    port = env.get(PREFIX + "DASHBOARD_PORT", str(default("dashboard_port")))
    assert port == "8088"
    assert any(str(p).endswith(f":{port}") for p in dash["ports"]), dash["ports"]
    assert command_text(dash["command"]) == "dashboard"
    assert dash["build"]["dockerfile"] == "deploy/Dockerfile", "the dashboard needs no GPU image"
    assert f":{port}/" in healthcheck_text(dash)


# ----------------------------------------------------------------------------------------------
# Dockerfiles and .dockerignore
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_installs_torch_first_and_runs_emotion_monitor_as_non_root(flavor):
    path = DOCKERFILES[flavor]
    ins = dockerfile_instructions(path)
    assert ins[0][0] in ("FROM", "ARG")
    torch_at = index_of(ins, is_torch_install, "`pip install torch==...`", path)
    project_at = index_of(ins, is_project_install, "`pip install .`", path)
    assert torch_at < project_at, f"{path.name}: torch must be installed before the project"
    user_at = index_of(ins, lambda i: i[0] == "USER", "USER", path)
    user = ins[user_at][1].split(":")[0]
    assert user not in ("root", "0"), f"{path.name}: runs as root"
    assert user_at > project_at, f"{path.name}: the installs run before USER drops root"
    entry = [a for w, a in ins if w == "ENTRYPOINT"]
    assert entry and exec_form(entry[-1]) == ["emotion-monitor"], f"{path.name}: ENTRYPOINT {entry}"
    cmd = [a for w, a in ins if w == "CMD"]
    assert cmd and exec_form(cmd[-1]) == ["worker"]
    health = [a for w, a in ins if w == "HEALTHCHECK"]
    assert health and "CMD" in health[-1] and ("6066" in health[-1] or "WEB_PORT" in health[-1])


def test_cpu_image_takes_torch_from_the_cpu_index_and_cuda_image_adds_tensorrt():
    cpu = dockerfile_instructions(DOCKERFILES["cpu"])
    torch_cpu = next(i for i in cpu if is_torch_install(i))
    assert "download.pytorch.org/whl/cpu" in torch_cpu[1]
    assert cpu[index_of(cpu, lambda i: i[0] == "FROM", "FROM", DOCKERFILES["cpu"])][1].startswith("python:3.11-slim")
    cuda = dockerfile_instructions(DOCKERFILES["cuda"])
    assert "/whl/cpu" not in next(i for i in cuda if is_torch_install(i))[1]
    assert re.search(r"[\"']?\.\[tensorrt\][\"']?", next(i for i in cuda if is_project_install(i))[1])
    base = "\n".join(a for w, a in cuda if w in ("FROM", "ARG"))
    assert "nvidia/cuda:" in base or "pytorch/pytorch:" in base


def test_dockerfiles_pin_the_torch_version_of_the_makefile():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    pinned = re.search(r"torch==([\w.+]+)", makefile)
    if not pinned:
        pytest.skip("the Makefile pins no torch version")
    for path in DOCKERFILES.values():
        arg = re.search(r"^ARG\s+TORCH_VERSION=(\S+)", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
        assert arg, f"{path.name}: no ARG TORCH_VERSION"
        assert arg.group(1) == pinned.group(1), f"{path.name}: torch {arg.group(1)}, the Makefile installs {pinned.group(1)}"


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_copies_the_whole_distribution(flavor):
    path = DOCKERFILES[flavor]
    patterns = dockerignore_patterns()
    copied: set[str] = set()
    for word, args in dockerfile_instructions(path):
        if word in ("COPY", "ADD"):
            srcs = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
            for src in srcs:
                assert (ROOT / src).exists(), f"{path.name}: COPY source {src} does not exist"
                assert not dockerignored(src, patterns), f"{path.name}: COPY source {src} is in .dockerignore"
                copied.add(src.rstrip("/"))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    roots = {p.rstrip("*").rstrip(".") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = {"pyproject.toml", pyproject["project"]["readme"], *roots}
    assert needed <= copied, f"{path.name}: the build needs {sorted(needed - copied)} too"


def test_dockerignore_keeps_local_state_out_and_the_sources_in():
    patterns = dockerignore_patterns()
    for out in (".venv", ".git", "runs", ".devcarry", ".env", ".pytest_cache", "emotion-monitor-data",
                "stream/__pycache__/x.pyc"):
        assert dockerignored(out, patterns), f".dockerignore lets {out} into the build context"
    for keep in ("pyproject.toml", "README.md", "model/modeling.py", "model/weights/meld-small/model.safetensors",
                 "stream/worker/batch.py", "stream/schemas/utterance.schema.json"):
        assert not dockerignored(keep, patterns), f".dockerignore drops {keep}, which the image needs"


def test_the_installed_project_carries_every_data_file(tmp_path):
    """The images `pip install .` (not editable): files outside package-data would be missing."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    roots = sorted({p.rstrip("*").rstrip(".") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]})
    for pkg in roots:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist")], cwd=src, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    data_files = sorted(str(p.relative_to(src)) for pkg in roots for p in (src / pkg).rglob("*")
                        if p.is_file() and p.suffix != ".py")
    assert data_files, "no data files found: the check would be empty"
    missing = [f for f in data_files if f not in in_wheel]
    assert not missing, ("not in the wheel the images install (add them to [tool.setuptools.package-data] "
                         f"in pyproject.toml): {missing}")


# ----------------------------------------------------------------------------------------------
# Kubernetes
# ----------------------------------------------------------------------------------------------

def test_every_k8s_object_has_identity_and_the_common_labels():
    files = [p for p in k8s_files() if p.name != "kustomization.yaml"]
    assert {p.name for p in files} >= {"namespace.yaml", "configmap.yaml", "secret.example.yaml", "worker-deployment.yaml",
                                       "keda-scaledobject.yaml", "pdb.yaml", "dashboard-deployment.yaml",
                                       "dashboard-service.yaml"}
    for path in files:
        for doc in k8s_docs(path):
            assert doc.get("apiVersion") and doc.get("kind"), path.name
            assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} without metadata.name"
            labels = doc["metadata"].get("labels", {})
            assert labels.get(NAME_LABEL) == "emotion-monitor", f"{path.name}: {NAME_LABEL} missing"
            assert labels.get("app.kubernetes.io/part-of") == "emotion-monitor", path.name


def test_deployment_selectors_match_their_pods():
    for component in ("worker", "dashboard"):
        dep = deployment(component)
        sel = dep["spec"]["selector"]["matchLabels"]
        pod = dep["spec"]["template"]["metadata"]["labels"]
        assert subset(sel, pod), f"{component}: selector {sel} does not select its pods {pod}"
        assert subset(dep["metadata"]["labels"], pod) or subset(sel, dep["metadata"]["labels"])


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kust = load_yaml(K8S / "kustomization.yaml")
    assert kust["kind"] == "Kustomization"
    listed = kust["resources"]
    for res in listed:
        assert (K8S / res).is_file(), f"kustomization.yaml lists missing file {res}"
    expected = {p.name for p in k8s_files()} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(listed) == expected, f"unlisted: {sorted(expected - set(listed))}, extra: {sorted(set(listed) - expected)}"
    images = {only_container(deployment(c))["image"].split(":")[0] for c in ("worker", "dashboard")}
    for entry in kust.get("images", []):
        assert entry["name"] in images, f"kustomize image {entry['name']} matches no container image {images}"
    assert kust["namespace"] == k8s_object("Namespace")["metadata"]["name"]


def test_kustomize_builds():
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if not (kubectl or kustomize):
        pytest.skip("neither kubectl nor kustomize is installed")
    argv = [kubectl, "kustomize", str(K8S)] if kubectl else [kustomize, "build", str(K8S)]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget",
                            "ScaledObject", "Service"])
    ns = k8s_object("Namespace")["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == ns for d in docs if d["kind"] != "Namespace")


def test_worker_deployment_reads_the_config_and_secret_and_holds_one_gpu():
    dep = deployment("worker")
    c = only_container(dep)
    refs = {next(iter(k for k in e if k.endswith("Ref"))): next(iter(v for k, v in e.items() if k.endswith("Ref")))["name"]
            for e in c["envFrom"]}
    assert refs["configMapRef"] == k8s_object("ConfigMap")["metadata"]["name"]
    assert refs["secretRef"] == k8s_object("Secret")["metadata"]["name"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert "memory" in c["resources"]["limits"] and "cpu" in c["resources"]["requests"]
    assert c.get("args", ["worker"]) == ["worker"]
    assert configured(configmap_data(), "device") == "cuda"


def test_worker_probes_target_the_faust_web_port():
    dep = deployment("worker")
    c = only_container(dep)
    port = int(configured(configmap_data(), "web_port"))
    assert port == 6066
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert kind in c, f"worker has no {kind}"
        assert probe_port(c[kind], c) == port, f"{kind} does not check port {port}"
    assert probe_path(c["livenessProbe"]) == "/healthz"
    assert probe_path(c["readinessProbe"]) == "/readyz"


def test_pods_run_non_root_on_a_read_only_root_with_writable_scratch():
    uids = {int(re.search(r"--uid\s+(\d+)", p.read_text(encoding="utf-8")).group(1)) for p in DOCKERFILES.values()}
    assert len(uids) == 1, f"the images disagree on the uid: {uids}"
    workdirs = {[a for w, a in dockerfile_instructions(p) if w == "WORKDIR"][-1] for p in DOCKERFILES.values()}
    assert len(workdirs) == 1, workdirs
    for component in ("worker", "dashboard"):
        dep = deployment(component)
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] in uids
        assert int(pod.get("terminationGracePeriodSeconds", 30)) >= 30
        c = only_container(dep)
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert all(name in volumes for name in mounts.values()), "a volumeMount names no volume"
        # faust's data directory and the caches live in the working directory; tempfiles in /tmp
        for path in (*workdirs, "/tmp"):
            assert path in mounts and "emptyDir" in volumes[mounts[path]], f"{component}: {path} is not writable"


def test_pdb_keeps_a_worker_and_only_selects_workers():
    pdb = k8s_object("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    sel = pdb["spec"]["selector"]["matchLabels"]
    assert subset(sel, deployment("worker")["spec"]["template"]["metadata"]["labels"])
    assert not subset(sel, deployment("dashboard")["spec"]["template"]["metadata"]["labels"])


def test_keda_scales_the_worker_on_the_lag_of_its_group_up_to_the_partition_count():
    so = k8s_object("ScaledObject")
    assert so["apiVersion"].startswith("keda.sh/")
    target = so["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == deployment("worker")["metadata"]["name"]
    data = configmap_data()
    (trigger,) = [t for t in so["spec"]["triggers"] if t["type"] == "kafka"]
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == configured(data, "app_id") == "emotion-monitor"
    assert meta["topic"] == configured(data, "utterances_topic") == "utterances"
    brokers = sorted(bootstrap_servers(configured(data, "brokers")).split(","))
    assert sorted(b.strip() for b in meta["bootstrapServers"].split(",")) == brokers
    assert 1 <= so["spec"]["minReplicaCount"], "no worker at zero lag means nobody finalises idle conversations"
    assert so["spec"]["maxReplicaCount"] <= int(configured(data, "partitions"))
    assert int(meta["lagThreshold"]) > 0


def test_dashboard_is_served_on_8088_by_its_service():
    dep = deployment("dashboard")
    c = only_container(dep)
    assert c.get("args") == ["dashboard"]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env.get(PREFIX + "DASHBOARD_HOST") == "0.0.0.0"
    port = int(configured({**configmap_data(), **env}, "dashboard_port"))
    for kind in ("livenessProbe", "readinessProbe"):
        assert probe_port(c[kind], c) == port
    svc = k8s_object("Service")
    assert subset(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
    assert not subset(svc["spec"]["selector"], deployment("worker")["spec"]["template"]["metadata"]["labels"])
    (svc_port,) = svc["spec"]["ports"]
    assert probe_port({"tcpSocket": {"port": svc_port["targetPort"]}}, c) == port
    assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})


def test_example_secret_holds_only_placeholders_and_the_documented_keys():
    secret = k8s_object("Secret")
    data = secret.get("stringData", {})
    assert PREFIX + "REDIS_PASSWORD" in data
    assert set(data) - {PREFIX + "REDIS_PASSWORD"} == KAFKA_SECRET_KEYS
    for key in data:  # a key the worker does not read would be silently ignored
        assert key.removeprefix(PREFIX).lower() in Settings.model_fields, key
    for key, value in data.items():
        if key.endswith(("PASSWORD", "USERNAME")):
            assert value == "change-me", f"{key}: an example Secret must not hold a real credential"
    assert "secret.example.yaml" not in load_yaml(K8S / "kustomization.yaml")["resources"]


def test_configmap_holds_no_secrets():
    data = configmap_data()
    assert not [k for k in data if "PASSWORD" in k or "SASL" in k or "TOKEN" in k]
    assert "@" not in configured(data, "redis_url"), "credentials in the Redis URL belong in the Secret"
