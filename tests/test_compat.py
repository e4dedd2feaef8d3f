"""common/compat.py, the one seam to MLflow's, Prefect's and torch's internals: a scan of the source
that finds none elsewhere, each internal resolved on the installed versions, the clear error when
one is gone, and the public APIs that replaced private ones behaving as those did."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import logging
import re
from pathlib import Path
from typing import Optional

import pytest
import tomllib
import torch
from mlflow.system_metrics import system_metrics_monitor
from mlflow.utils import requirements_utils
from packaging.requirements import Requirement
from prefect.server.api import server

from common import compat
from tasks.data.datasets import DatasetRef
from tasks.track import tracking
from tasks.track.lineage import image_splits
from tasks.train import speed

# Imported above, at collection: importing MLflow or Prefect's server starts a process (uname, file),
# which tests not marked slow may not do (tests/conftest.py).

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("flows", "tasks", "models", "deploy", "benchmarks")
SEAM = REPO / "tasks" / "compat.py"
LIBRARIES = {"mlflow", "prefect", "torch"}
# Internals without a leading underscore, which the project reaches only through common/compat.py.
INTERNAL_NAMES = {"SubprocessASGIServer", "SystemMetricsMonitor", "system_metrics_monitor", "mlflow_logger"}
# In strings: private environment variables, and dotted paths or uvicorn targets to a private name.
PRIVATE_TEXT = re.compile(
    r"\b(?:PREFECT|MLFLOW|TORCH)__\w+|_MODULES_TO_PACKAGES|\b(?:mlflow|prefect|torch)(?:\.\w+)*[.:]_\w+"
)
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}  # public, despite the _
MUTATORS = {"update", "pop", "popitem", "setdefault", "clear", "__setitem__", "__delitem__"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class Scan(ast.NodeVisitor):
    """Finds uses of private names of MLflow, Prefect and torch in one module: imports of them,
    attributes of the libraries' modules and classes (through any import alias or assignment),
    getattr-style lookups on them with a private or computed name, overrides of a library base
    class's private methods, private attributes defined nowhere in the project (an object of a
    library's), rewrites of an MLflow model's flavors, and private names in strings."""

    def __init__(self, defined: frozenset[str]) -> None:
        self.defined = defined  # attribute names the project itself defines
        self.library: dict[str, str] = {}  # local name -> the dotted library path it is bound to
        self.modules: set[str] = set()  # other imported names (the standard library, the project)
        self.found: list[tuple[int, str]] = []

    def flag(self, node: ast.AST, why: str) -> None:
        self.found.append((node.lineno, why))

    def library_path(self, node: ast.AST) -> Optional[str]:
        """The dotted library path an expression names (torch.cpu, an alias of mlflow.data), if any."""
        if isinstance(node, ast.Name):
            return self.library.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.library_path(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def check_path(self, node: ast.AST, path: str) -> None:
        if any(is_private(part) or part in INTERNAL_NAMES for part in path.split(".")):
            self.flag(node, f"imports {path}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            root = alias.name.split(".")[0]
            if root not in LIBRARIES:
                self.modules.add(alias.asname or root)
                continue
            self.check_path(node, alias.name)
            self.library[alias.asname or root] = alias.name if alias.asname else root

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level or module.split(".")[0] not in LIBRARIES:
            self.modules.update(alias.asname or alias.name for alias in node.names)
            return
        for alias in node.names:
            self.check_path(node, f"{module}.{alias.name}")
            self.library[alias.asname or alias.name] = f"{module}.{alias.name}"

    def visit_Assign(self, node: ast.Assign) -> None:
        path = self.library_path(node.value)  # `module = requirements_utils` is an alias too
        for target in node.targets:
            if path and isinstance(target, ast.Name):
                self.library[target.id] = path
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        base = self.library_path(node.value)
        if base and (is_private(node.attr) or node.attr in INTERNAL_NAMES):
            self.flag(node, f"uses {base}.{node.attr}")
        elif not base and node.attr in INTERNAL_NAMES:
            self.flag(node, f"uses .{node.attr}")
        elif not base and is_private(node.attr) and self.foreign(node):
            self.flag(node, f"uses .{node.attr}, which the project does not define")
        self.generic_visit(node)

    def foreign(self, node: ast.Attribute) -> bool:
        """A private attribute of an object (not of an imported module) that no project code defines."""
        root = node.value
        while isinstance(root, (ast.Attribute, ast.Subscript, ast.Call)):
            root = root.func if isinstance(root, ast.Call) else root.value
        from_module = isinstance(root, ast.Name) and root.id in self.modules
        return not from_module and node.attr not in self.defined and node.attr not in NAMEDTUPLE_API

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        lookup = isinstance(func, ast.Name) and func.id in ("getattr", "hasattr", "setattr", "delattr")
        if lookup and len(node.args) >= 2 and (base := self.library_path(node.args[0])):
            name = node.args[1]
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                self.flag(node, f"looks up a computed name on {base}")
            elif is_private(name.value) or name.value in INTERNAL_NAMES:
                self.flag(node, f"uses {base}.{name.value}")
        if isinstance(func, ast.Attribute) and func.attr in MUTATORS and "flavors" in chain(func.value):
            self.flag(node, "rewrites an MLflow model's flavors")
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)) and "flavors" in chain(node.value):
            self.flag(node, "rewrites an MLflow model's flavors")
        self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for base in filter(None, map(self.library_path, node.bases)):
            for item in node.body:
                is_function = isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                if is_function and is_private(item.name) and hasattr(compat._import(base), item.name):
                    self.flag(item, f"overrides {base}.{item.name}")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and (match := PRIVATE_TEXT.search(node.value)):
            self.flag(node, f"names {match.group()}")


def chain(node: ast.AST) -> set[str]:
    """The attribute names along `a.b[c].d`."""
    names = set()
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        node = node.value
    return names


def defined_names(tree: ast.AST) -> set[str]:
    """Names a module defines: functions, classes, arguments, variables, attributes set on self/cls."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                names.add(node.attr)
    return names


def sources() -> list[Path]:
    return sorted(path for root in ROOTS for path in (REPO / root).rglob("*.py") if path != SEAM)


@functools.cache
def project_names() -> frozenset[str]:
    names: set[str] = set()
    for path in sources():
        names |= defined_names(ast.parse(path.read_text(encoding="utf-8")))
    return frozenset(names)


def scan(source: str, defined: frozenset[str]) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    visitor = Scan(defined | defined_names(tree))
    visitor.visit(tree)
    return visitor.found


def test_no_private_name_of_mlflow_prefect_or_torch_outside_the_seam():
    files, defined = sources(), project_names()
    assert len(files) > 60 and REPO / "tasks" / "track" / "tracking.py" in files
    found = [
        f"{path.relative_to(REPO)}:{line}: {why}"
        for path in files
        for line, why in scan(path.read_text(encoding="utf-8"), defined)
    ]
    assert found == [], "private names outside common/compat.py:\n" + "\n".join(found)


# Planted sources, each with what the scan must say about it.
PLANTED = [
    ("from mlflow.utils.requirements_utils import _MODULES_TO_PACKAGES", "imports mlflow.utils.req"),
    ("import mlflow.utils.requirements_utils\nmlflow.utils.requirements_utils._X = {}", "uses mlflow.utils"),
    ("import mlflow._private_module", "imports mlflow._private_module"),
    ("from mlflow.utils import requirements_utils\nrequirements_utils._X = {}", "uses mlflow.utils"),
    ("import torch.cpu as cpu\ncpu._is_amx_tile_supported()", "uses torch.cpu._is_amx_tile_supported"),
    ("from mlflow.utils import requirements_utils\nm = requirements_utils\nm._X = {}", "uses mlflow.utils"),
    (
        "from mlflow.utils import requirements_utils as r\nsetattr(r, '_Y', {})",
        "uses mlflow.utils.requirements_utils._Y",
    ),
    (
        "import torch\nfor p in ('_is_amx',):\n    getattr(torch.cpu, p)()",
        "looks up a computed name on torch.cpu",
    ),
    ("import os\nos.environ['PREFECT__SERVER_FINAL'] = '1'", "names PREFECT__SERVER_FINAL"),
    ("ENV = {'PREFECT_UI_ENABLED': '0', 'PREFECT__SERVER_EPHEMERAL': '1'}", "names PREFECT__SERVER_EPH"),
    ("import importlib\nimportlib.import_module('torch._dynamo')", "names torch._dynamo"),
    ("from prefect.server.api.server import SubprocessASGIServer", "imports prefect.server.api.server.Sub"),
    (
        "from prefect.server.api import server\nserver.SubprocessASGIServer()",
        "uses prefect.server.api.server",
    ),
    ("from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor", "imports mlflow.sys"),
    ("def stop(monitor):\n    monitor.mlflow_logger.flush()", "uses .mlflow_logger"),
    (
        "from mlflow.data.dataset import Dataset\nclass D(Dataset):\n    def _compute_digest(self):\n"
        "        return 'x'",
        "overrides mlflow.data.dataset.Dataset._compute_digest",
    ),
    ("def entity(split):\n    return split._to_mlflow_entity()", "uses ._to_mlflow_entity, which the"),
    ("def f(model):\n    model.flavors['python_function']['loader_module'] = 'x'", "rewrites an MLflow"),
    ("def f(model):\n    model.flavors['python_function'].update(loader_module='x')", "rewrites an MLflow"),
]


@pytest.mark.parametrize("source, reason", PLANTED, ids=[reason for _, reason in PLANTED])
def test_the_scan_flags_a_planted_private_use(source, reason):
    found = scan(source, project_names())
    assert any(why.startswith(reason) for _, why in found), found


CLEAN = """
import argparse, collections, mlflow, torch
from mlflow.data.meta_dataset import MetaDataset

class Split(MetaDataset):
    def __init__(self):
        self._rows = 3
        super().__init__(source=None, digest="d")

    def _helper(self):  # MetaDataset has no _helper: the project's own
        return self._rows

capabilities = getattr(torch.cpu, "get_capabilities", dict)()
row = collections.namedtuple("Row", "a")(1)._replace(a=2)
group = argparse._ActionsContainer  # the standard library's internals are not this seam's
mlflow.set_tracking_uri("sqlite:///x.db")
ENV = {"PREFECT_UI_ENABLED": "0", "version": torch.__version__}
"""


def test_the_scan_passes_public_uses_and_the_seam_holds_the_private_ones():
    assert scan(CLEAN, project_names()) == []
    in_seam = {why for _, why in scan(SEAM.read_text(encoding="utf-8"), project_names())}
    assert {"names PREFECT__SERVER_EPHEMERAL", "names _MODULES_TO_PACKAGES"} <= in_seam


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


def test_a_missing_name_fails_the_check_with_a_clear_message(monkeypatch):
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


def test_prefect_no_longer_reading_the_server_variables_fails_the_check(monkeypatch):
    monkeypatch.setattr(server, "create_app", lambda: None)  # a create_app that reads neither
    with pytest.raises(compat.CompatError) as raised:
        compat.check_internals()
    assert str(raised.value).splitlines() == [
        f"prefect 3.9.1 no longer has {name} in prefect.server.api.server.create_app (used to {purpose}; "
        "checked on prefect 3.9.1); pin prefect<3.10 or update common/compat.py"
        for name, purpose in [
            ("PREFECT__SERVER_EPHEMERAL", compat.SERVER_EPHEMERAL.purpose),
            ("PREFECT__SERVER_FINAL", compat.SERVER_FINAL.purpose),
        ]
    ]
    assert compat.temporary_server_env() == {"PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def test_without_prefects_server_class_the_temporary_server_fails_at_use(monkeypatch):
    assert {"start", "stop", "api_url"} <= set(dir(compat.TEMPORARY_SERVER.resolve()))
    monkeypatch.delattr(server, "SubprocessASGIServer")
    with pytest.raises(compat.CompatError, match=r"prefect 3\.9\.1 no longer has .*SubprocessASGIServer"):
        compat.start_temporary_server()


def test_dependency_caps_match_the_checked_versions():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    requirements = {
        Requirement(line).name: Requirement(line) for line in pyproject["project"]["dependencies"]
    }
    checked = {internal.library: internal.checked for internal in compat.INTERNALS}
    for library, version in checked.items():
        major, minor = version.split(".")[:2]
        assert f"<{major}.{int(minor) + 1}" in str(requirements[library].specifier), library
    for library in ("mlflow", "prefect", "torch", "torchvision"):
        installed = importlib.metadata.version(library).split("+")[0]
        assert requirements[library].specifier.contains(installed), f"{library} {installed}"
        assert any(spec.operator == "<" for spec in requirements[library].specifier), library


def test_the_public_cpu_probe_agrees_with_the_private_ones_it_replaced(monkeypatch):
    private = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert speed.cpu_has_native_bf16() == private
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # an older torch: auto stays fp32
    assert speed.cpu_has_native_bf16() is False


def test_a_splits_public_entity_is_the_one_mlflows_private_method_made():
    ref = DatasetRef(
        "digits", "/x.pt", "0" * 64, tuple("0123456789"), 1, (8, 8), 100, 20, (0.5,), (0.2,), "a.b", "/t.csv"
    )
    for split in image_splits(ref, seed=1, val_fraction=0.2).values():
        made, expected = split.to_entity(), split._to_mlflow_entity()
        assert made.to_dictionary() == expected.to_dictionary()
