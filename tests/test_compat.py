"""common/compat.py, the one seam to the internals of MLflow, Prefect, torch, Pillow, Dask and Ray: a
scan of the source that finds none elsewhere (tests/public_api.py: each library's documented modules
and their __all__), planted uses it must find, each internal resolved on the installed versions, the
clear error when one is gone, and the public APIs that replaced internals behaving as those did."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import io
import json
import logging
from pathlib import Path

import numpy as np
import prefect.main  # noqa: F401 - sets up Prefect's logging, as `from prefect import flow` does
import pytest
import tomllib
import torch
from mlflow.data.meta_dataset import MetaDataset
from mlflow.system_metrics import system_metrics_monitor
from mlflow.utils import mlflow_tags, requirements_utils
from mlflow.utils.file_utils import local_file_uri_to_path
from packaging.requirements import Requirement
from PIL import Image, ImageFile
from prefect.logging.handlers import PrefectConsoleHandler

from common import compat
from flows import cli
from tasks.track import tracking
from tasks.track.lineage import ImageSplit, origin_source
from tasks.train import speed
from tests.public_api import LIBRARIES, defined_names, scan

# Imported above, at collection: importing MLflow or Prefect starts a process (uname, file), which
# tests not marked slow may not do (tests/conftest.py).

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("common", "flows", "tasks", "models", "deploy", "benchmarks")
SEAM = REPO / "common" / "compat.py"


def sources() -> list[Path]:
    return sorted(path for root in ROOTS for path in (REPO / root).rglob("*.py") if path != SEAM)


@functools.cache
def project_names() -> frozenset[str]:
    names: set[str] = set()
    for path in sources():
        names |= defined_names(ast.parse(path.read_text(encoding="utf-8")))
    return frozenset(names)


def test_no_internal_of_a_library_outside_the_seam():
    files, defined = sources(), project_names()
    assert len(files) > 60 and REPO / "tasks" / "track" / "tracking.py" in files and SEAM not in files
    found = [
        f"{path.relative_to(REPO)}:{line}: {why}"
        for path in files
        for line, why in scan(path.read_text(encoding="utf-8"), defined)
    ]
    assert found == [], "library internals outside common/compat.py:\n" + "\n".join(found)


# Planted sources: the library each uses an internal of, and the start of what the scan must say.
PLANTED = [
    # Modules a library does not document, names outside a module's __all__, private names.
    (
        "mlflow",
        "from mlflow.utils.file_utils import local_file_uri_to_path",
        "imports mlflow.utils.file_utils",
    ),
    ("mlflow", "from mlflow.data.meta_dataset import MetaDataset", "imports mlflow.data.meta_dataset"),
    ("mlflow", "from mlflow.data import get_dataset_source_from_json", "imports mlflow.data.get_dataset_"),
    ("mlflow", "from mlflow.utils.requirements_utils import _MODULES_TO_PACKAGES", "imports mlflow.utils"),
    ("mlflow", "import mlflow.utils.requirements_utils\nmlflow.utils.requirements_utils._X = {}", "imports"),
    ("mlflow", "from mlflow.utils import requirements_utils as r\nm = r\nm._X = {}", "uses mlflow.utils.req"),
    ("mlflow", "from mlflow.utils import requirements_utils as r\nsetattr(r, '_Y', {})", "uses mlflow.utils"),
    ("mlflow", "import mlflow._private_module", "imports mlflow._private_module: _private_module is priv"),
    ("prefect", "from prefect.events.worker import EventsWorker", "imports prefect.events.worker.Events"),
    ("prefect", "from prefect.server.api.server import SubprocessASGIServer", "imports prefect.server.api"),
    (
        "prefect",
        "from prefect.server.api import server\nserver.SubprocessASGIServer()",
        "imports prefect.ser",
    ),
    ("torch", "from torch.nn.modules.conv import Conv2d", "imports torch.nn.modules.conv.Conv2d: torch.nn"),
    ("torch", "from torch.hub import HASH_REGEX", "imports torch.hub.HASH_REGEX: HASH_REGEX is not in torch"),
    ("torch", "import torch\ntorch._dynamo.reset()", "uses torch._dynamo.reset: _dynamo is private"),
    ("torch", "import torch.cpu as cpu\ncpu._is_amx_tile_supported()", "uses torch.cpu._is_amx_tile_sup"),
    ("torch", "import torch\nfor p in ('_is_amx',):\n    getattr(torch.cpu, p)()", "looks up a computed"),
    (
        "pillow",
        "from PIL.ImageFile import _tilesort",
        "imports PIL.ImageFile._tilesort: _tilesort is private",
    ),
    (
        "pillow",
        "from PIL import Image\nwith Image.open('a.png') as image:\n    image.tile = []",
        "uses .tile",
    ),
    ("pillow", "def raw(image):\n    return image.tile[0].args", "uses .tile, an internal attribute"),
    ("dask", "from dask._task_spec import Task", "imports dask._task_spec.Task: _task_spec is private"),
    ("dask", "import dask.utils", "imports dask.utils: dask.utils is not a documented module of dask"),
    ("ray", "from ray._private.worker import global_worker", "imports ray._private.worker.global_worker"),
    # Internal attributes of a library's objects, and overrides of a library class's private methods.
    ("prefect", "def wait(worker):\n    worker.wait_until_empty()", "uses .wait_until_empty, an internal"),
    ("mlflow", "def stop(monitor):\n    monitor.mlflow_logger.flush()", "uses .mlflow_logger, an internal"),
    ("mlflow", "def entity(split):\n    return split._to_mlflow_entity()", "uses ._to_mlflow_entity, which"),
    (
        "mlflow",
        "from mlflow.data.dataset import Dataset\nclass D(Dataset):\n    def _compute_digest(self):\n"
        "        return 'x'",
        "overrides mlflow.data.dataset.Dataset._compute_digest",
    ),
    ("mlflow", "def f(model):\n    model.flavors['python_function']['loader_module'] = 'x'", "rewrites an"),
    (
        "mlflow",
        "def f(model):\n    model.flavors['python_function'].update(loader_module='x')",
        "rewrites an",
    ),
    # Reserved tags, private settings and dotted paths in strings.
    (
        "mlflow",
        "tags = {'mlflow.parentRunId': 'r', 'trial': '1'}",
        "uses the reserved tag mlflow.parentRunId",
    ),
    ("mlflow", "def f(tags):\n    tags['mlflow.myOwnTag'] = 'x'", "uses the reserved tag mlflow.myOwnTag"),
    ("mlflow", "def f(c):\n    return f\"tags.`mlflow.source.git.commit` = '{c}'\"", "uses the reserved tag"),
    (
        "mlflow",
        "FIELDS = {'pickle_module_name': 'mlflow.pytorch.pickle_module'}",
        "names mlflow.pytorch.pickle",
    ),
    ("prefect", "import os\nos.environ['PREFECT__SERVER_FINAL'] = '1'", "names PREFECT__SERVER_FINAL"),
    ("prefect", "APP = 'prefect.server.api.server:create_app'", "names prefect.server.api.server.create_app"),
    (
        "torch",
        "import importlib\nimportlib.import_module('torch._dynamo')",
        "names torch._dynamo: _dynamo is",
    ),
]


@pytest.mark.parametrize("library, source, reason", PLANTED, ids=[reason for _, _, reason in PLANTED])
def test_the_scan_flags_a_planted_internal_use(library, source, reason):
    found = scan(source, project_names())
    assert any(why.startswith(reason) for _, why in found), found


def test_every_library_has_planted_uses():
    assert {library for library, _, _ in PLANTED} == set(LIBRARIES.values())


CLEAN = '''"""A docstring may name mlflow.utils.file_utils or torch._dynamo: it uses neither."""
import argparse, collections, logging, mlflow, torch
from mlflow.data.dataset_source import DatasetSource
from prefect.logging import get_logger
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from torch.utils.data import DataLoader

class Source(DatasetSource):
    def __init__(self):
        self._rows = 3

    def _helper(self):  # DatasetSource has no _helper: the project's own
        return self._rows

capabilities = getattr(torch.cpu, "get_capabilities", dict)()
row = collections.namedtuple("Row", "a")(1)._replace(a=2)
group = argparse._ActionsContainer  # the standard library's internals are not this seam's
mlflow.set_tracking_uri("sqlite:///mlflow.db")
tiled = torch.ones(2).tile(3)  # Tensor.tile, a public method
ENV = {"PREFECT_UI_ENABLED": "0", "version": torch.__version__, "format": torch.channels_last}
RESOURCE = {"prefect.resource.id": "mlflow.registered-model.m", "prefect.flow_run_id": "x"}
INI = "authorization_function = mlflow.server.auth:authenticate_request_basic_auth"
logging.getLogger("torch.onnx").setLevel(logging.ERROR)
run_logger = get_logger("flow_runs")
'''


def test_the_scan_passes_public_uses_and_the_seam_holds_the_internals():
    assert scan(CLEAN, project_names()) == []
    in_seam = [why for _, why in scan(SEAM.read_text(encoding="utf-8"), project_names())]
    for expected in (
        "names mlflow.utils.requirements_utils",
        "names prefect.events.worker.EventsWorker",
        "names mlflow.data.code_dataset_source",
        "uses .tile",
        "uses .mlflow_logger",
    ):
        assert any(why.startswith(expected) for why in in_seam), (expected, in_seam)


@pytest.mark.parametrize("internal", compat.INTERNALS, ids=lambda internal: internal.name)
def test_each_internal_resolves_on_the_installed_versions(internal):
    assert internal.resolve() is not None or internal is compat.PACKAGE_SCAN  # None until first built
    # Within the minor release it was checked on, which pyproject.toml's cap allows (a patch release
    # passes here too); a newer minor needs both raised together.
    installed = importlib.metadata.version(internal.library)
    same_minor = installed.split(".")[:2] == internal.checked.split(".")[:2]
    assert same_minor, f"{internal.library} {installed}: recheck common/compat.py"


def test_check_internals_passes_on_the_installed_versions():
    compat.check_internals()


def gone_message(internal: compat.Internal) -> str:
    installed = importlib.metadata.version(internal.library)
    where = f"{internal.name} in {internal.owner}" if internal.in_source else internal.path
    major, minor = internal.checked.split(".")[:2]
    return (
        f"{internal.library} {installed} no longer has {where} (used to {internal.purpose}; checked on "
        f"{internal.library} {internal.checked}); pin {internal.library}<{major}.{int(minor) + 1} or "
        "update common/compat.py"
    )


def defining(internal: compat.Internal) -> object:
    """The module or class whose own namespace holds the internal (a base class, for an inherited one)."""
    owner = compat._import(internal.owner)
    if isinstance(owner, type):
        return next(base for base in owner.__mro__ if internal.name in vars(base))
    return owner


ATTRIBUTES = [internal for internal in compat.INTERNALS if not internal.in_source]


@pytest.mark.parametrize("internal", ATTRIBUTES, ids=lambda internal: internal.name)
def test_a_missing_name_fails_the_check_with_a_clear_message(internal, monkeypatch):
    monkeypatch.delattr(defining(internal), internal.name)
    with pytest.raises(compat.CompatError) as raised:
        compat.check_internals()
    assert gone_message(internal) in str(raised.value).splitlines()  # and those that need it


def test_the_exact_message_names_the_version_the_cap_and_the_use(monkeypatch):
    monkeypatch.delattr(requirements_utils, "_MODULES_TO_PACKAGES")
    message = (
        "mlflow 3.17.2 no longer has mlflow.utils.requirements_utils._MODULES_TO_PACKAGES (used to skip "
        "MLflow's scan of every installed package when it saves or loads a model; checked on mlflow "
        "3.17.2); pin mlflow<3.18 or update common/compat.py"
    )
    with pytest.raises(compat.CompatError) as raised:
        compat.check_internals()
    assert str(raised.value) == message
    compat.skip_mlflow_package_scan()  # only a speed-up: it goes without


def test_the_package_scan_skip_empties_only_an_unbuilt_map(monkeypatch):
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    compat.skip_mlflow_package_scan()
    assert requirements_utils._MODULES_TO_PACKAGES == {}
    built = {"numpy": ["numpy"]}
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", built)
    compat.skip_mlflow_package_scan()
    assert requirements_utils._MODULES_TO_PACKAGES is built


def test_without_the_monitor_class_system_metrics_are_skipped_with_the_reason(monkeypatch, caplog):
    run_id = "0" * 32  # nothing reaches MLflow: the monitor is never made
    monkeypatch.delattr(system_metrics_monitor, "SystemMetricsMonitor")
    with pytest.raises(
        compat.CompatError, match=r"no longer has .*\.SystemMetricsMonitor .*pin mlflow<3\.18"
    ):
        compat.monitor_system_metrics(run_id, 1.0)
    ran = []
    with caplog.at_level(logging.WARNING), tracking.system_metrics(run_id, interval=0.1):
        ran.append(True)  # the block still runs: system metrics never fail a run
    assert ran and "system metrics not recorded: mlflow 3.17.2 no longer has" in caplog.text


def test_the_last_sample_needs_the_monitor_logger():
    monitor = object()  # a SystemMetricsMonitor without mlflow_logger: checked before it is stopped
    with pytest.raises(compat.CompatError, match=r"self\.mlflow_logger in mlflow\.system_metrics"):
        compat.log_last_system_metrics(monitor)


def test_the_reserved_tags_are_mlflows_keys_and_fail_clearly_when_renamed(monkeypatch):
    tags = (
        compat.MODEL_VERSIONS_TAG,
        compat.DATASET_CONTEXT_TAG,
        compat.GIT_COMMIT_TAG,
        compat.PARENT_RUN_TAG,
    )
    keys = ["mlflow.modelVersions", "mlflow.data.context", "mlflow.source.git.commit", "mlflow.parentRunId"]
    assert [compat.reserved_tag(tag) for tag in tags] == keys
    monkeypatch.delattr(mlflow_tags, "MLFLOW_PARENT_RUN_ID")
    with pytest.raises(compat.CompatError) as raised:
        compat.reserved_tag(compat.PARENT_RUN_TAG)
    assert str(raised.value) == gone_message(compat.PARENT_RUN_TAG)


def test_without_the_events_wait_a_wait_fails_clearly_before_reaching_the_worker(monkeypatch):
    monkeypatch.delattr(defining(compat.EVENTS_WAIT), "wait_until_empty")
    with pytest.raises(compat.CompatError) as raised:
        compat.wait_for_events(1.0)
    assert str(raised.value) == gone_message(compat.EVENTS_WAIT)


def test_the_png_raw_mode_is_read_and_replaced_through_the_decoder_tile(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.array([[[10, 20, 30]]], np.uint8)).save(path)
    with Image.open(path) as image:
        assert compat.png_raw_mode(image) == "RGB"
        compat.set_png_raw_mode(image, "BGR")  # the same 24 bits per pixel, in the other order
        assert np.array(image).tolist() == [[[30, 20, 10]]]
    with pytest.raises(compat.CompatError, match=r"^pillow \S+ no longer has self\.tile in PIL\.ImageFile"):
        compat.png_raw_mode(object())


def test_pillow_no_longer_keeping_decoder_tiles_fails_the_check(monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "__init__", lambda self, *args, **kwargs: None)
    with pytest.raises(compat.CompatError) as raised:
        compat.check_internals()
    assert str(raised.value) == gone_message(compat.PNG_TILE)


def test_dependency_caps_match_the_checked_versions():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    requirements = {
        Requirement(line).name: Requirement(line) for line in pyproject["project"]["dependencies"]
    }
    checked = {internal.library: internal.checked for internal in compat.INTERNALS}
    for library, version in checked.items():
        major, minor = version.split(".")[:2]
        assert f"<{major}.{int(minor) + 1}" in str(requirements[library].specifier), library
    for library in ("mlflow", "prefect", "torch", "torchvision", "pillow"):
        installed = importlib.metadata.version(library).split("+")[0]
        assert requirements[library].specifier.contains(installed), f"{library} {installed}"
        assert any(spec.operator == "<" for spec in requirements[library].specifier), library


# The public APIs that replaced internals, behaving as those did.


def test_the_public_cpu_probe_agrees_with_the_private_ones_it_replaced(monkeypatch):
    private = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert speed.cpu_has_native_bf16() == private
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # an older torch: auto stays fp32
    assert speed.cpu_has_native_bf16() is False


@pytest.mark.parametrize("origin", ["https://x/y.gz", "/data/t.csv", "tasks.data.offline_data.load_digits"])
def test_a_splits_entity_is_the_one_mlflows_metadata_dataset_makes(origin):
    split = ImageSplit(origin_source(origin), "digits", "0123456789abcdef", {"num_rows": 3})
    made = MetaDataset(split.source, name=split.name, digest=split.digest)._to_mlflow_entity()
    expected = {**made.to_dictionary(), "profile": json.dumps(split.profile)}
    assert split.to_entity().to_dictionary() == expected


@pytest.mark.parametrize("uri", ["file:///tmp/a%20b/artifacts", "/tmp/runs/1/artifacts", "file:/x/y"])
def test_local_artifact_paths_are_the_ones_mlflows_helper_gave(uri):
    assert tracking.local_path(uri) == local_file_uri_to_path(uri)


def test_the_console_handlers_are_prefects_as_the_walk_of_every_logger_found_them():
    every = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    consoles = {
        id(handler)
        for logger in every
        for handler in getattr(logger, "handlers", [])
        if isinstance(handler, PrefectConsoleHandler) and logger.name in ("root", "prefect")
    }
    reached = {id(handler) for handler in cli._console_handlers(cli.RUN_LOGGERS)}
    assert consoles and consoles <= reached


def test_the_console_handlers_are_the_stream_handlers_a_loggers_records_reach(tmp_path):
    parent, child, aside = (logging.getLogger(f"tests.compat.{name}") for name in ("a", "a.b", "c"))
    above, beside = logging.StreamHandler(io.StringIO()), logging.StreamHandler(io.StringIO())
    to_file = logging.FileHandler(tmp_path / "log", delay=True)
    parent.addHandler(above)
    child.addHandler(to_file)
    aside.addHandler(beside)
    try:
        reached = cli._console_handlers((child,))
        assert above in reached and to_file not in reached and beside not in reached
        child.propagate = False  # its records stop at its own handlers
        assert above not in cli._console_handlers((child,))
    finally:
        child.propagate = True
        for logger in (parent, child, aside):
            logger.handlers.clear()
