"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and no module or package imports
itself through others."""

from __future__ import annotations

import copy
from collections import deque
from pathlib import Path

import grimp
import pytest
from importlinter import configuration
from importlinter.application import output, use_cases
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.independence import IndependenceContract
from importlinter.contracts.layers import LayersContract
from importlinter.contracts.private_modules import PrivateModulesContract
from importlinter.contracts.protected import ProtectedContract
from importlinter.domain.contract import Contract, ContractCheck, registry

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PACKAGES = ("common", "flows", "tasks", "models")
Edges = dict[str, set[str]]


@pytest.fixture(scope="module")
def report():
    """What `lint-imports` checks, as a report: the graph it built and each contract's outcome."""
    configuration.configure()  # import-linter's readers and graph builder, as `lint-imports` sets them
    for kind in (
        AcyclicSiblingsContract,
        ForbiddenContract,
        IndependenceContract,
        LayersContract,
        PrivateModulesContract,
        ProtectedContract,
    ):
        registry.register(kind, kind.type_name)  # the built-in types, as `lint-imports` registers them
    return use_cases.create_report(use_cases.read_user_options(str(PYPROJECT)), cache_dir=None)


def described(contract: Contract, check: ContractCheck) -> str:
    """A broken contract's name and the imports that break it, as `lint-imports` prints them."""
    with output.console.capture() as captured:
        contract.render_broken_contract(check)
    return f"{contract.name}\n{captured.get()}"


def test_every_import_contract_holds(report):
    assert not report.could_not_run, f"invalid contracts in {PYPROJECT}: {report.invalid_contract_options}"
    types = {contract.type_name for contract in report.contracts}
    assert {"layers", "independence", "forbidden", "acyclic_siblings"} <= types
    broken = [
        described(contract, check) for contract, check in report.get_contracts_and_checks() if not check.kept
    ]
    assert not broken, f"{len(broken)} import contract(s) of {PYPROJECT} broken:\n\n" + "\n".join(broken)


# Each planted import breaks the contracts of its type; the real graph (above) breaks none.
PLANTED = {
    "layers": ("tasks.train.steps", "tasks.publish.export"),  # training would load onnxruntime again
    "independence": ("flows.sweep_flow", "flows.train_flow"),  # a flow importing a flow
    "forbidden": ("models.networks", "mlflow"),
    "acyclic_siblings": ("common.files", "common.downloads"),  # one layer, but downloads imports files
}


@pytest.mark.parametrize("kind", PLANTED)
def test_the_contracts_catch_a_planted_import(report, kind):
    importer, imported = PLANTED[kind]
    graph = copy.deepcopy(report.graph)
    graph.add_import(importer=importer, imported=imported)
    contracts = [contract for contract in report.contracts if contract.type_name == kind]
    assert not all(contract.check(copy.deepcopy(graph), verbose=False).kept for contract in contracts)


def strongly_connected(edges: Edges) -> list[list[str]]:
    """Tarjan's algorithm: the groups of two or more nodes that each reach all the others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def cycle_through(group: list[str], edges: Edges) -> list[str]:
    """The shortest import path from the group's first node back to it, through the group."""
    start, paths = group[0], deque([[group[0]]])
    while paths:
        path = paths.popleft()
        for target in sorted(edges.get(path[-1], set()) & set(group)):
            if target == start:
                return [*path, start]
            if target not in path:
                paths.append([*path, target])
    raise AssertionError(f"{group} is not strongly connected")


def cycles(edges: Edges) -> list[str]:
    """Each import cycle, as 'a -> b -> a'."""
    return [" -> ".join(cycle_through(group, edges)) for group in strongly_connected(edges)]


def module_imports(graph: grimp.ImportGraph) -> Edges:
    return {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}


def package_imports(graph: grimp.ImportGraph) -> Edges:
    """Imports between packages: a module counts as its package's (a package's __init__ as its own)."""

    def package(module: str) -> str:
        return module if graph.find_children(module) else module.rpartition(".")[0] or module

    edges: Edges = {}
    for importer, imported in module_imports(graph).items():
        for target in imported:
            if package(importer) != package(target):
                edges.setdefault(package(importer), set()).add(package(target))
    return edges


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)  # function-level imports included


def test_no_module_imports_itself_through_others(graph):
    found = cycles(module_imports(graph))
    assert not found, "import cycles between modules:\n" + "\n".join(found)


def test_no_package_imports_itself_through_others(graph):
    """Packages too: tasks' own modules (files, downloads...) must not import a stage that imports
    them, nor may models import what imports models."""
    found = cycles(package_imports(graph))
    assert not found, "import cycles between packages:\n" + "\n".join(found)


def test_the_cycle_finder_finds_planted_cycles():
    graph = grimp.ImportGraph()
    for package in ("app", "app.p", "app.q"):
        graph.add_module(package)
    for importer, imported in [
        ("app.a", "app.b"),
        ("app.b", "app.c"),
        ("app.c", "app.a"),  # modules in a cycle
        ("app.c", "app.d"),
        ("app.p.x", "app.q.y"),
        ("app.q.z", "app.p.w"),  # packages in a cycle, no module in one
    ]:
        graph.add_import(importer=importer, imported=imported)
    assert cycles(module_imports(graph)) == ["app.a -> app.b -> app.c -> app.a"]
    assert cycles(package_imports(graph)) == ["app.p -> app.q -> app.p"]
    graph.remove_import(importer="app.c", imported="app.a")
    graph.remove_import(importer="app.q.z", imported="app.p.w")
    assert cycles(module_imports(graph)) == cycles(package_imports(graph)) == []
