"""The public API of MLflow, Prefect, torch, Pillow, Dask and Ray, as tests/test_compat.py holds the
project's source to it, and the scan that finds every reference outside it.

A module is public when its library documents it (DOCUMENTED below; Pillow documents every module
without a leading underscore); a name in a module is public when it is in the module's `__all__`,
if the module has one, and no part of a path starts with an underscore. MLflow's reserved tags
(keys that start with `mlflow.`) are internal too. References are imports, attribute chains on
imported modules (through aliases and assignments), getattr-style lookups, overrides of a library
class's private methods, and dotted paths or reserved tags in strings (not in docstrings)."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import re
from pathlib import Path
from typing import Optional

from mlflow.utils import mlflow_tags

# Import name -> distribution, as pyproject.toml and common.compat.Internal name it.
LIBRARIES = {
    "mlflow": "mlflow",
    "prefect": "prefect",
    "torch": "torch",
    "PIL": "pillow",
    "dask": "dask",
    "ray": "ray",
}

# The modules each library documents as its API. A module missing here is internal (mlflow.utils.*,
# mlflow.data.meta_dataset, prefect.server.*, prefect.events.worker, torch.nn.modules.*, ...);
# when the project needs one that its library does document, add it with the page that does.
DOCUMENTED = {
    # mlflow.org/docs/latest/api_reference/python_api/ (the Python API pages), with the mlflow.data
    # submodules and mlflow.server.auth that those pages and the auth guide document. Left out:
    # the flavors this project has no use for, and mlflow.utils, whose page covers a few helpers
    # while the package is MLflow's plumbing (file_utils, mlflow_tags, requirements_utils).
    "mlflow": {
        "mlflow",
        "mlflow.artifacts",
        "mlflow.client",
        "mlflow.config",
        "mlflow.data",
        "mlflow.data.dataset",
        "mlflow.data.dataset_source",
        "mlflow.data.filesystem_dataset_source",
        "mlflow.data.http_dataset_source",
        "mlflow.data.numpy_dataset",
        "mlflow.data.pandas_dataset",
        "mlflow.deployments",
        "mlflow.entities",
        "mlflow.entities.model_registry",
        "mlflow.environment_variables",
        "mlflow.exceptions",
        "mlflow.models",
        "mlflow.onnx",
        "mlflow.projects",
        "mlflow.pyfunc",
        "mlflow.pytorch",
        "mlflow.server",
        "mlflow.server.auth",  # the basic-auth app, its ini's authorization_function, `db upgrade`
        "mlflow.server.auth.client",
        "mlflow.server.auth.entities",
        "mlflow.sklearn",
        "mlflow.store.entities",
        "mlflow.system_metrics",
        "mlflow.tracing",
        "mlflow.types",
    },
    # docs.prefect.io/v3: the modules its concept and how-to guides import from. The generated SDK
    # reference lists every module, prefect.server and prefect._internal included, so it is no
    # measure; the engine, server, utilities, testing internals and events' worker are left out.
    "prefect": {
        "prefect",
        "prefect.artifacts",
        "prefect.assets",
        "prefect.automations",
        "prefect.blocks.core",
        "prefect.blocks.system",
        "prefect.cache_policies",
        "prefect.client.orchestration",
        "prefect.client.schemas.actions",
        "prefect.client.schemas.filters",
        "prefect.client.schemas.objects",
        "prefect.client.schemas.schedules",
        "prefect.client.schemas.sorting",
        "prefect.concurrency.asyncio",
        "prefect.concurrency.sync",
        "prefect.context",
        "prefect.deployments",
        "prefect.events",
        "prefect.exceptions",
        "prefect.flows",
        "prefect.futures",
        "prefect.logging",
        "prefect.results",
        "prefect.runtime",
        "prefect.runtime.deployment",
        "prefect.runtime.flow_run",
        "prefect.runtime.task_run",
        "prefect.schedules",
        "prefect.serializers",
        "prefect.settings",
        "prefect.states",
        "prefect.task_runners",
        "prefect.tasks",
        "prefect.testing.utilities",  # prefect_test_harness, in the testing guide
        "prefect.transactions",
        "prefect.variables",
    },
    # docs.pytorch.org/docs/stable/pytorch-api.html (Reference API, Python API), with the
    # submodules those pages document (torch.backends.*, torch.optim.lr_scheduler, torch.nn.*).
    "torch": {
        "torch",
        "torch.accelerator",
        "torch.amp",
        "torch.autograd",
        "torch.backends",
        "torch.backends.cpu",
        "torch.backends.cuda",
        "torch.backends.cudnn",
        "torch.backends.mkldnn",
        "torch.backends.mps",
        "torch.backends.openmp",
        "torch.compiler",
        "torch.cpu",
        "torch.cuda",
        "torch.distributed",
        "torch.distributed.checkpoint",
        "torch.distributed.elastic",
        "torch.distributed.elastic.multiprocessing.errors",  # elastic/errors.html: record, ChildFailedError
        "torch.distributed.fsdp",
        "torch.distributed.launcher.api",  # __all__ = LaunchConfig, elastic_launch: torchrun's engine
        "torch.distributed.run",
        "torch.distributions",
        "torch.export",
        "torch.fft",
        "torch.func",
        "torch.futures",
        "torch.fx",
        "torch.hub",
        "torch.jit",
        "torch.library",
        "torch.linalg",
        "torch.mps",
        "torch.multiprocessing",
        "torch.nn",
        "torch.nn.attention",
        "torch.nn.functional",
        "torch.nn.init",
        "torch.nn.parallel",
        "torch.nn.utils",
        "torch.onnx",
        "torch.optim",
        "torch.optim.lr_scheduler",
        "torch.profiler",
        "torch.random",
        "torch.signal",
        "torch.sparse",
        "torch.special",
        "torch.testing",
        "torch.utils",
        "torch.utils.benchmark",
        "torch.utils.checkpoint",
        "torch.utils.data",
        "torch.utils.dlpack",
        "torch.utils.tensorboard",
        "torch.xpu",
    },
    # docs.dask.org: API pages (array, bag, dataframe, delayed, futures, configuration, scheduling);
    # dask.utils is left out as an internal area.
    "dask": {
        "dask",
        "dask.array",
        "dask.bag",
        "dask.base",
        "dask.config",
        "dask.dataframe",
        "dask.delayed",
        "dask.diagnostics",
        "dask.distributed",
        "dask.multiprocessing",
        "dask.threaded",
    },
    # docs.ray.io: the Ray Core, Train, Tune, Data and Serve API references.
    "ray": {
        "ray",
        "ray.data",
        "ray.exceptions",
        "ray.job_submission",
        "ray.runtime_env",
        "ray.serve",
        "ray.train",
        "ray.train.torch",
        "ray.tune",
        "ray.util",
        "ray.util.placement_group",
        "ray.util.queue",  # Ray Core's utility classes: ray.util.queue.Queue
        "ray.util.scheduling_strategies",
    },
}
# Names a library documents that its module's __all__ leaves out: torch's memory formats (Tensor
# Attributes page), and every setting of Prefect's by its variable's name (prefect.settings: "import
# specific setting objects directly, like from prefect.settings import PREFECT_API_URL").
DOCUMENTED_NAMES = re.compile(
    r"torch\.(?:channels_last|contiguous_format|preserve_format)|prefect\.settings\.PREFECT_[A-Z0-9]\w*"
)
NOT_CODE = {"mlflow.db"}  # in strings: MLflow's default SQLite store's file, not its `mlflow db` module
# Attributes of library objects that no module path reaches, each an internal of its library:
# SystemMetricsMonitor's logger, Prefect's queue-service wait, a Pillow image's decoder tiles.
INTERNAL_ATTRIBUTES = {"mlflow_logger", "wait_until_empty", "tile"}
CALLED_IS_PUBLIC = {"tile"}  # torch.Tensor.tile(...) is a public method; reading or setting it is not
# MLflow's own tags: every key its tag module names, and any other key that starts with `mlflow.`.
RESERVED_TAGS = frozenset(
    value
    for name, value in vars(mlflow_tags).items()
    if name.isupper() and isinstance(value, str) and value.startswith("mlflow.")
)
PRIVATE_ENV = re.compile(r"\b(?:PREFECT|MLFLOW|TORCH)__\w+")  # settings the libraries keep to themselves
DOTTED = re.compile(rf"(?<![\w.])(?:{'|'.join(LIBRARIES)})(?:\.\w+)+(?::\w+)?")  # paths, `module:object`
RESERVED_TEXT = re.compile(
    "|".join(rf"(?<![\w.]){re.escape(tag)}(?![\w.])" for tag in sorted(RESERVED_TAGS, key=len, reverse=True))
)
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}  # public, despite the _
MUTATORS = {"update", "pop", "popitem", "setdefault", "clear", "__setitem__", "__delitem__"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def documented(module: str) -> bool:
    library = module.split(".")[0]
    if library == "PIL":  # Pillow's Reference, "PIL package" and plugin pages: all but PIL._*
        return not any(is_private(part) for part in module.split("."))
    return module in DOCUMENTED[library]


@functools.cache
def split_module(path: str) -> tuple[Optional[str], tuple[str, ...]]:
    """(the longest module of `path`, the names after it), found in the library's files without
    importing anything (some internals start a process as they import); (None, ...) when the
    library is not installed here."""
    parts = path.split(".")
    spec = importlib.util.find_spec(parts[0])
    if spec is None:
        return None, tuple(parts)
    locations, cut = list(spec.submodule_search_locations or []), 1
    if not locations:  # a library that is one module
        return parts[0], tuple(parts[1:])
    folder = Path(locations[0])
    for part in parts[1:]:
        if (folder / part / "__init__.py").is_file():
            folder, cut = folder / part, cut + 1
            continue
        if (folder / f"{part}.py").is_file() or any(folder.glob(f"{part}.*.so")):
            cut += 1
        break
    return ".".join(parts[:cut]), tuple(parts[cut:])


def exists(path: str) -> bool:
    """Whether a dotted string names a library's code (not a file name, say): a module below the
    library's top one, or an attribute of that top module."""
    module, names = split_module(path)
    if module is None or "." in module:
        return module is not None
    found = importlib.import_module(module)
    for name in names:
        if not hasattr(found, name):
            return False
        found = getattr(found, name)
    return True


@functools.cache
def not_public(path: str) -> Optional[str]:
    """Why the library path `path` is not public API, or None when it is (or names no library)."""
    parts = path.split(".")
    if parts[0] not in LIBRARIES:
        return None
    if private := [part for part in parts if is_private(part)]:
        return f"{private[0]} is private"
    module, names = split_module(path)
    if module is None:
        return None  # not installed here: only the underscore rule applies
    if not documented(module):
        return f"{module} is not a documented module of {LIBRARIES[parts[0]]}"
    exported = getattr(importlib.import_module(module), "__all__", None)  # documented: safe to import
    first = names[0] if names else None
    if first and exported is not None and first not in exported and not first.startswith("__"):
        if not DOCUMENTED_NAMES.fullmatch(f"{module}.{first}"):
            return f"{first} is not in {module}.__all__"
    return None


class Scan(ast.NodeVisitor):
    """Finds the references of one module's source to a library's internals (module docstring)."""

    def __init__(self, defined: frozenset[str]) -> None:
        self.defined = defined  # attribute names the project itself defines
        self.library: dict[str, str] = {}  # local name -> the dotted library path it is bound to
        self.modules: set[str] = set()  # other imported names (the standard library, the project)
        self.skip: set[int] = set()  # ids of docstrings, and of attributes that are called
        self.found: list[tuple[int, str]] = []

    def flag(self, node: ast.AST, why: str) -> None:
        self.found.append((node.lineno, why))

    def check(self, node: ast.AST, verb: str, path: str) -> None:
        if why := not_public(path):
            self.flag(node, f"{verb} {path}: {why}")

    def library_path(self, node: ast.AST) -> Optional[str]:
        """The dotted library path an expression names (torch.cpu, an alias of mlflow.data), if any."""
        if isinstance(node, ast.Name):
            return self.library.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.library_path(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def visit_Module(self, node: ast.Module) -> None:
        for scope in ast.walk(node):
            body = getattr(scope, "body", None)
            if isinstance(scope, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body:
                if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                    self.skip.add(id(body[0].value))
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            root = alias.name.split(".")[0]
            if root not in LIBRARIES:
                self.modules.add(alias.asname or root)
                continue
            self.check(node, "imports", alias.name)
            self.library[alias.asname or root] = alias.name if alias.asname else root

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level or module.split(".")[0] not in LIBRARIES:
            self.modules.update(alias.asname or alias.name for alias in node.names)
            return
        for alias in node.names:
            self.check(node, "imports", f"{module}.{alias.name}")
            self.library[alias.asname or alias.name] = f"{module}.{alias.name}"

    def visit_Assign(self, node: ast.Assign) -> None:
        path = self.library_path(node.value)  # `module = requirements_utils` is an alias too
        for target in node.targets:
            if path and isinstance(target, ast.Name):
                self.library[target.id] = path
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if path := self.library_path(node):
            self.check(node, "uses", path)
            return  # the chain's shorter prefixes are parts of this path
        if node.attr in INTERNAL_ATTRIBUTES and not (node.attr in CALLED_IS_PUBLIC and id(node) in self.skip):
            self.flag(node, f"uses .{node.attr}, an internal attribute of a library's object")
        elif is_private(node.attr) and self.foreign(node):
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
        self.skip.add(id(func))
        lookup = isinstance(func, ast.Name) and func.id in ("getattr", "hasattr", "setattr", "delattr")
        if lookup and len(node.args) >= 2 and (base := self.library_path(node.args[0])):
            name = node.args[1]
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                self.flag(node, f"looks up a computed name on {base}")
            else:
                self.check(node, "uses", f"{base}.{name.value}")
        if isinstance(func, ast.Attribute) and func.attr in MUTATORS and "flavors" in chain(func.value):
            self.flag(node, "rewrites an MLflow model's flavors")
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)) and "flavors" in chain(node.value):
            self.flag(node, "rewrites an MLflow model's flavors")
        self.reserved_key(node.slice)
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key in node.keys:
            if key is not None:
                self.reserved_key(key)
        self.generic_visit(node)

    def reserved_key(self, key: ast.AST) -> None:
        if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.startswith("mlflow."):
            if not RESERVED_TEXT.fullmatch(key.value):  # those are flagged as text
                self.flag(key, f"uses the reserved tag {key.value}")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for base in filter(None, map(self.library_path, node.bases)):
            owner = importlib.import_module(split_module(base)[0] or "builtins")
            for name in split_module(base)[1]:
                owner = getattr(owner, name, None)
            for item in node.body:
                is_function = isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                if is_function and is_private(item.name) and hasattr(owner, item.name):
                    self.flag(item, f"overrides {base}.{item.name}")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if not isinstance(node.value, str) or id(node) in self.skip:
            return
        for match in PRIVATE_ENV.finditer(node.value):
            self.flag(node, f"names {match.group()}")
        for match in RESERVED_TEXT.finditer(node.value):
            self.flag(node, f"uses the reserved tag {match.group()}")
        for match in DOTTED.finditer(node.value):
            path = match.group().replace(":", ".")
            if path in NOT_CODE:
                continue
            if any(is_private(part) for part in path.split(".")) or exists(path):
                self.check(node, "names", path)


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


def scan(source: str, defined: frozenset[str]) -> list[tuple[int, str]]:
    """(line, why) of each reference in `source` to a library's internals."""
    tree = ast.parse(source)
    visitor = Scan(defined | defined_names(tree))
    visitor.visit(tree)
    return visitor.found
