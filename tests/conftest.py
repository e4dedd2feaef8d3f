"""Shared fixtures: a throwaway MLflow store, a Prefect test server, tiny datasets."""

from __future__ import annotations

import atexit
import functools
import gc
import gzip
import hashlib
import http.server
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
import torch
from torchvision import datasets
from torchvision.io import write_png

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect gives its temporary server 20 s to start; two loaded cores running a test and its scripts
# can take longer, and the run then fails for a reason that is not the test's.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# Servers the tests start store events every half second, not every 5 s (the promotion events).
os.environ.setdefault("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL", "0.5")
REPO = Path(__file__).resolve().parents[1]
# What the issue asks MLflow to hold for every epoch.
EPOCH_METRICS = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "epoch_seconds",
    "samples_per_second",
    "lr",
)
TRAIN_SCRIPT = REPO / "flows" / "train_flow.py"


# Prepended to a child script that reports its memory. A process's resident set counts the pages of
# torch's shared libraries that its imports map (0.5 to 1.1 GB here, with what the page cache holds),
# so the memory a test bounds is the anonymous part: the process's own data, sampled every 5 ms.
MEMORY_PROBE = """
import resource, threading

def status_bytes(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)

def peak_bytes():  # VmHWM: this process's own peak RSS; ru_maxrss keeps the peak of what exec'd it
    return status_bytes("VmHWM")

class AnonPeak:
    def __init__(self):
        self.peak, self.done = status_bytes("RssAnon"), threading.Event()
        threading.Thread(target=self.sample, daemon=True).start()

    def sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def stop(self):
        self.done.set()
        return max(self.peak, status_bytes("RssAnon"))
"""


# The modules that take longest, longest first (`--durations`): under --dist loadfile each is one
# unit of work, and one started last runs alone at the end while the other worker idles.
LONGEST_MODULES = (
    "test_team_deployment",
    "test_distributed",
    "test_faults",
    "test_predict_flow",
    "test_train_flow",
    "test_sweep_flow",
    "test_ray_training",
    "test_doc_commands",
    "test_serving",
    "test_cli",
)


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist sends loadfile's units out by number of tests, most first, unless told to keep
    # the collection's order (below): the four-test team module would then start last.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Runs the longest modules first, then the other modules with slow end-to-end tests (each
    module's tests still together, so its fixtures are made once): with -n 2 the quick ones then
    fill the gaps, rather than one worker finishing a long flow test alone at the end."""
    require_slow_marks(items)
    slow = {item.module for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, bool]:
        name = item.module.__name__.rpartition(".")[2]
        longest = LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)
        return longest, item.module not in slow

    items.sort(key=rank)


def run_train_script(
    cwd: Path, *flags: str, timeout: int = 600, script: Path = TRAIN_SCRIPT, seeded: bool = False
) -> subprocess.CompletedProcess:
    """Runs `python flows/train_flow.py FLAGS` (or another script) as a user would: its own
    temporary Prefect server, Prefect and MLflow state under `cwd` (see `script_env`)."""
    command = [sys.executable, str(script), *flags]
    env = script_env(cwd, seeded)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def script_env(cwd: Path, seeded: bool = False) -> dict[str, str]:
    """A user's shell in `cwd`: Prefect and MLflow state there, no Prefect server configured.

    `seeded`: `cwd` starts with a Prefect home and an MLflow store that already exist, as a user's
    do after their first run. Creating them is the first run's alone (about 7 s of CPU in the
    temporary server's and MLflow's migrations); seeded, a test process pays it once, not per run."""
    if seeded:
        cwd.mkdir(parents=True, exist_ok=True)
        for name, source in (("prefect", seeded_prefect_home()), ("mlflow.db", seeded_mlflow_db())):
            if not (cwd / name).exists():
                (shutil.copytree if source.is_dir() else shutil.copyfile)(source, cwd / name)
    env = {
        **os.environ,
        "PREFECT_HOME": str(cwd / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
    }
    env.pop("PREFECT_API_URL", None)
    return env


@functools.cache
def seeded_folder() -> Path:
    """Where this test process keeps the stores it seeds others from; removed when it exits."""
    folder = Path(tempfile.mkdtemp(prefix="seeded-stores-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@functools.cache
def seeded_mlflow_db() -> Path:
    """An MLflow SQLite store, created (its schema migrated) and otherwise empty."""
    from mlflow import MlflowClient

    path = seeded_folder() / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@functools.cache
def seeded_prefect_home() -> Path:
    """A Prefect home whose database a temporary server has created and filled, then left."""
    home = seeded_folder() / "prefect"
    # Prefect's client starts its temporary server when no API is set, and stops it at exit.
    program = (
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as client:\n"
        "    assert client.api_healthcheck() is None"
    )
    subprocess.run(
        [sys.executable, "-c", program], cwd=REPO, env={**os.environ, "PREFECT_HOME": str(home)}, check=True
    )
    return home


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real SQLite-backed MLflow tracking store and registry in a temporary folder (copied from
    an empty one: MLflow's migrations take a second per new store)."""
    shutil.copyfile(seeded_mlflow_db(), tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # MLflow's default artefact root ./mlruns lands here too
    return uri


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect server on 127.0.0.1 for the tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def prefect_artifacts(key: Optional[str] = None, flow_run_id: Optional[str] = None) -> list:
    """The artifacts the Prefect API holds, by key and/or flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    filters = {}
    if key:
        filters["artifact_filter"] = ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
    if flow_run_id:
        filters["flow_run_filter"] = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        return client.read_artifacts(**filters)


def write_image_folder(
    root: Path, count: int, size: int = 12, channels: int = 1, seed: int = 0
) -> list[tuple[str, int]]:
    """Writes `count` PNGs whose class (0 or 1) is their bright half: left or right."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        label = index % 2
        image = (torch.rand(channels, size, size, generator=generator) * 60).to(torch.uint8)
        half = slice(0, size // 2) if label == 0 else slice(size // 2, size)
        image[:, :, half] += 180
        name = f"img/{index:03d}.png"
        write_png(image, str(root / name))
        rows.append((name, label))
    return rows


def write_csv(path: Path, rows: list[tuple[str, object]], header: bool = True) -> Path:
    lines = (["image,label"] if header else []) + [f"{name},{label}" for name, label in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def png_dataset(tmp_path: Path) -> dict[str, Path]:
    """A folder of PNGs with train and test CSVs (string labels 'left'/'right')."""
    return write_png_dataset(tmp_path)


def write_png_dataset(root: Path) -> dict[str, Path]:
    """48 PNGs under `root`, with train (36) and test (12) CSVs labelled 'left'/'right'."""
    rows = [(name, ("left", "right")[label]) for name, label in write_image_folder(root, 48)]
    return {
        "image_root": root,
        "train_csv": write_csv(root / "train.csv", rows[:36]),
        "test_csv": write_csv(root / "test.csv", rows[36:]),
    }


def idx_bytes(tensor: torch.Tensor) -> bytes:
    """The original MNIST file format: magic, big-endian dims, raw uint8 data."""
    header = struct.pack(">I", 0x0800 | tensor.ndim) + b"".join(struct.pack(">I", d) for d in tensor.shape)
    return header + tensor.numpy().tobytes()


@pytest.fixture
def tiny_fashion(monkeypatch) -> dict[str, bytes]:
    """Gzipped idx files of a 20+10 image FashionMNIST lookalike, with matching md5s."""
    generator = torch.Generator().manual_seed(0)
    parts = {
        "train-images-idx3-ubyte.gz": torch.randint(
            0, 256, (20, 28, 28), dtype=torch.uint8, generator=generator
        ),
        "train-labels-idx1-ubyte.gz": torch.arange(20, dtype=torch.uint8) % 10,
        "t10k-images-idx3-ubyte.gz": torch.randint(
            0, 256, (10, 28, 28), dtype=torch.uint8, generator=generator
        ),
        "t10k-labels-idx1-ubyte.gz": torch.arange(10, dtype=torch.uint8),
    }
    files = {name: gzip.compress(idx_bytes(tensor), mtime=0) for name, tensor in parts.items()}
    resources = [(name, hashlib.md5(blob).hexdigest()) for name, blob in files.items()]
    monkeypatch.setattr(datasets.FashionMNIST, "resources", resources)
    return files


@dataclass
class FileServer:
    url: str
    corrupt: set[str] = field(default_factory=set)  # files to serve damaged
    failures_left: int = 0  # requests to answer with HTTP 503 first
    requests: list[str] = field(default_factory=list)


@contextmanager
def raw_server(respond: Callable[[http.server.BaseHTTPRequestHandler], None]) -> Iterator[str]:
    """Serves GETs on 127.0.0.1 with `respond(handler)` writing the whole answer itself (headers
    and body, at its own pace); yields the server's root URL, and stops it after."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            try:
                respond(self)
            except OSError:  # the client hung up: what a refused download does
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def http_files(answer: Callable[[str], tuple[int, bytes]]) -> AbstractContextManager[str]:
    """raw_server answering each GET with answer(the path's last part) -> (status, body)."""

    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        status, body = answer(handler.path.strip("/").split("/")[-1])
        if status != 200:
            handler.send_error(status)
            return
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return raw_server(respond)


@pytest.fixture
def file_server(tiny_fashion):
    """Serves the tiny FashionMNIST files on 127.0.0.1, optionally failing or corrupting them."""
    state = FileServer("")

    def answer(name: str) -> tuple[int, bytes]:
        state.requests.append(name)
        if state.failures_left > 0:
            state.failures_left -= 1
            return 503, b""
        if name not in tiny_fashion:
            return 404, b""
        return 200, tiny_fashion[name][:-5] + b"xxxxx" if name in state.corrupt else tiny_fashion[name]

    with http_files(answer) as root:
        state.url = f"{root}/files/"
        yield state


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited early:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up:\n{log.read_text()[-3000:]}")


class Processes:
    """Starts commands in their own process groups and stops them all, whatever happens."""

    def __init__(self, folder: Path, env: dict[str, str], grace: float = 20) -> None:
        self.folder, self.env, self.started, self.grace = folder, env, [], grace

    def start(self, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        """`python -m ARGS` in the repository."""
        return self._start(name, [sys.executable, "-m", *args], REPO)

    def start_shell(self, name: str, command: str, cwd: Path) -> tuple[subprocess.Popen, Path]:
        """A shell command line, as a user types it, in `cwd`."""
        return self._start(name, ["bash", "-c", f"exec {command}"], cwd)

    def _start(self, name: str, command: list[str], cwd: Path) -> tuple[subprocess.Popen, Path]:
        log = self.folder / f"{name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                command, cwd=cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append(process)
        return process, log

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"{args}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def stop_all(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A real `dask scheduler` and two one-thread `dask worker` processes on 127.0.0.1."""
    from distributed import Client

    folder = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    quiet = ("--no-dashboard", "--dashboard-address", "127.0.0.1:0")  # no clash on :8787
    processes = Processes(folder, dict(os.environ))
    try:
        processes.start(
            "scheduler",
            "dask",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            address.rsplit(":", 1)[1],
            *quiet,
        )
        for index in range(2):
            processes.start(
                f"worker-{index}",
                *("dask", "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1"),
                *("--local-directory", str(folder / f"worker-{index}"), *quiet),
            )
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A real Ray head node (`ray start --head --block`) on 127.0.0.1 with 2 CPUs; its GCS address.

    Tests connect straight to the GCS: a `ray://` client connection makes the head start a client
    server per connection, which on a loaded 2-core machine sometimes fails to come up in time."""
    pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")
    folder = tmp_path_factory.mktemp("ray")
    sessions = Path(
        tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    )  # short: Ray's socket paths must fit 107 bytes
    gcs_port, client_port = free_port(), free_port()
    # Token auth would follow a ~/.ray/auth_token left by any earlier local Ray; these tests need none.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")  # for the cluster and for this process, its client
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        # Ray's GCS and agents sit out SIGTERM for long seconds; the group is killed after 3.
        processes = Processes(folder, dict(os.environ), grace=3)
        try:
            head, log = processes.start(
                "ray-head",
                *("ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address", "127.0.0.1"),
                *(
                    "--port",
                    str(gcs_port),
                    "--ray-client-server-port",
                    str(client_port),
                    "--num-cpus",
                    "2",
                ),
                *("--include-dashboard=false", "--disable-usage-stats", "--object-store-memory", "200000000"),
                *("--temp-dir", str(sessions)),
            )
            wait_until_listening(gcs_port, head, log)
            yield f"127.0.0.1:{gcs_port}"
        finally:
            processes.stop_all()
            shutil.rmtree(sessions, ignore_errors=True)


def wait_until_listening(port: int, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}:\n{log.read_text()[-3000:]}")


def fewer_training_images(loaders, dataset, count: int):
    """`loaders` with the training split cut to its first `count` images, shuffled and augmented as
    before: for quick tests of what holds at any size (resuming, checkpoints)."""
    from tasks.data.datasets import load_tensors
    from tasks.data.loaders import TensorLoader

    train = loaders.train
    labels = load_tensors(dataset.prepared_path).train_labels  # train.labels are the split's already
    cut = TensorLoader(
        *(train.images, labels, train.batch_size, train.shuffle, train.seed, train.labels.device),
        indices=train.indices[:count],
        augment=train.augment,
    )
    return loaders._replace(train=cut)


# --- `-m "not slow"` starts no process (issue 19): every test that starts a server, a cluster or any
# other process is marked slow, checked when the tests are collected and enforced while they run.

# Fixtures that start servers or clusters (in their own processes, or Prefect's temporary server).
SERVER_FIXTURES = frozenset({"prefect_server", "dask_cluster", "ray_cluster"})


def require_slow_marks(items: list[pytest.Item]) -> None:
    """Refuses the run when a test that uses a server fixture is not marked slow."""
    unmarked = [
        f"{item.nodeid} (uses {', '.join(sorted(SERVER_FIXTURES & set(item.fixturenames)))})"
        for item in items
        if not item.get_closest_marker("slow") and SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
    ]
    if unmarked:
        raise pytest.UsageError("tests that start servers must be marked slow:\n  " + "\n  ".join(unmarked))


class ProcessGuard:
    """While a test that is not marked slow sets up and runs, every way this process starts another
    (subprocess, multiprocessing, fork, posix_spawn, system) raises AssertionError naming the test
    and the command; the first such start is also reported when the phase ends, in case the code
    under test caught the error."""

    def __init__(self, nodeid: str) -> None:
        self.nodeid, self.started = nodeid, []

    def refuse(self, command: object) -> AssertionError:
        message = f"test {self.nodeid} is not marked slow but starts a process: {command}"
        self.started.append(message)
        return AssertionError(message)

    def install(self, patch: pytest.MonkeyPatch) -> None:
        import _posixsubprocess

        def execute_child(popen, args, *rest, **kwargs):
            raise self.refuse(args if isinstance(args, (str, bytes)) else " ".join(map(os.fsdecode, args)))

        def refused(what: str) -> Callable:
            def start(*args, **kwargs):
                raise self.refuse(f"{what}{args[:2]!r}")

            return start

        patch.setattr(subprocess.Popen, "_execute_child", execute_child)
        patch.setattr(_posixsubprocess, "fork_exec", refused("fork_exec"))  # multiprocessing spawn
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
            if hasattr(os, name):
                patch.setattr(os, name, refused(f"os.{name}"))


@contextmanager
def no_process_unless_slow(item: pytest.Item) -> Iterator[None]:
    """ProcessGuard around a phase of `item`, unless it is marked slow."""
    if item.get_closest_marker("slow"):
        yield
        return
    guard = ProcessGuard(item.nodeid)
    with pytest.MonkeyPatch.context() as patch:
        guard.install(patch)
        yield
    if guard.started:
        pytest.fail(guard.started[0], pytrace=False)


# Setup (module and session fixtures a test is the first to use included) and the test itself; not
# teardown, where a slow test's module fixtures may stop their servers after a quick last test.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with no_process_unless_slow(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with no_process_unless_slow(item):
        return (yield)


def pytest_collection_finish(session: pytest.Session) -> None:
    # The collection imported torch, Prefect and MLflow: millions of objects that live as long as
    # the process. Frozen, the collector stops rescanning them in every full collection (about a
    # tenth of the in-process tests' CPU, measured on `-m "not slow"`).
    gc.freeze()
