"""The shell blocks of the README and of the Quick start, Your own data and Serving pages run as a
reader runs them, in reading order, and each one exits 0.

Which blocks run: every ```bash, ```sh, ```shell and ```console block of PAGES (of a console block,
the lines after `$ `), except

- a block marked by the line `<!-- doc-test: skip (WHY) -->` just above its fence, which the page
  shows to nobody: for a block that needs the network, runs a server until it is stopped, or runs
  the whole suite. Keep these few; each test id and skip reason names the file and line;
- a block with a placeholder the reader fills in: an `<angle bracketed>` word, or an UPPERCASE
  word of two or more letters (`NAME`, `TRAIN_CSV`, `HOST:8786`) that is neither a variable
  (`$HOME`, `${PWD}`), nor assigned (`PIC_ALLOWED_ROOTS=...`), nor a name in NOT_PLACEHOLDERS
  (`PIL`); comments are not searched.

Where they run: one scratch folder for all the blocks, as one reader's checkout: links to the
repository's files, but its own `data/`, `outputs/`, MLflow store (MLFLOW_TRACKING_URI, the
`sqlite:///mlflow.db` the pages name) and Prefect home (PREFECT_HOME); no PREFECT_* or MLFLOW_*
setting of the calling shell reaches it. Each block runs in `bash` with `set -e`, in a process
group that is stopped when the block ends, so a server a block leaves behind goes too.

Installing is already done: the folder's `.venv/bin` comes first on PATH and holds `python`,
`python3`, `pip` and `activate` that stand for this test's own virtual environment. `pip install
...` and `python3 -m venv ...` print that they are satisfied and change nothing; `. .venv/bin/activate`
and `.venv/bin/python` work as after a real install, with the project as installed here."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/quickstart.md", "docs/own-data.md", "docs/serving.md")  # reading order
SHELLS = ("bash", "sh", "shell", "console")
SKIP_MARKER = re.compile(r"^<!-- doc-test: skip \((?P<why>[^)]+)\) -->$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<language>[\w-]*)\s*$")
ANGLE_PLACEHOLDER = re.compile(r"<[A-Za-z][^<>\n]*>")
UPPERCASE_PLACEHOLDER = re.compile(r"(?<![\w${])(?=[A-Z][A-Z0-9_])[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*(?![\w=])")
NOT_PLACEHOLDERS = {"PIL"}  # uppercase words that are the names of things, not blanks
COMMENT = re.compile(r"(^|\s)#.*$", re.M)
# Not the reader's checkout: what runs there leaves these, and each block makes its own.
NOT_LINKED = {"data", "outputs", "mlruns", "site", "mlflow.db", ".venv", ".git", "__pycache__"}
BLOCK_SECONDS = 300


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, from 1
    code: str
    skip: Optional[str]  # why it does not run, or None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def shell_blocks(page: str) -> list[Block]:
    """The shell blocks of `page` (a path under the repository), with why each is skipped, if it is."""
    lines = (ROOT / page).read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening or not opening["language"]:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        if opening["language"] in SHELLS:
            body = [line.removeprefix(opening["indent"]) for line in lines[index + 1 : end]]
            if opening["language"] == "console":
                body = [line[2:] for line in body if line.startswith("$ ")]
            code = "\n".join(body) + "\n"
            blocks.append(Block(page, index + 1, code, _skip_reason(lines, index, code)))
        index = end + 1
    return blocks


def _skip_reason(lines: list[str], fence: int, code: str) -> Optional[str]:
    above = next((line.strip() for line in reversed(lines[:fence]) if line.strip()), "")
    if marker := SKIP_MARKER.match(above):
        return marker["why"]
    commands = COMMENT.sub("", code)
    uppercase = [word for word in UPPERCASE_PLACEHOLDER.findall(commands) if word not in NOT_PLACEHOLDERS]
    if found := [*ANGLE_PLACEHOLDER.findall(commands), *uppercase]:
        return f"a placeholder for the reader: {found[0]}"
    if "curl " in commands and shutil.which("curl") is None:
        return "curl is not installed here"
    return None


BLOCKS = [block for page in PAGES for block in shell_blocks(page)]


def test_every_skip_marker_is_just_above_a_shell_block():
    """A marker that drifted away from its block (or lost its reason) would let the block run, or
    skip nothing; either way the page and the test disagree."""
    for page in PAGES:
        lines = (ROOT / page).read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if "doc-test" not in line:
                continue
            assert SKIP_MARKER.match(line.strip()), f"{page}:{number}: expected <!-- doc-test: skip (WHY) -->"
            following = next((text for text in lines[number:] if text.strip()), "")
            fence = FENCE.match(following)
            assert fence and fence["language"] in SHELLS, f"{page}:{number}: no shell block below the marker"


def test_every_page_has_blocks_that_run():
    """Each page keeps commands a reader can run as they stand, not only skipped ones."""
    for page in PAGES:
        assert any(block.skip is None for block in BLOCKS if block.page == page), page


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reader's checkout: the repository's files linked, its own stores, installing already done."""
    folder = tmp_path_factory.mktemp("checkout")
    for entry in ROOT.iterdir():
        if entry.name not in NOT_LINKED and not entry.name.startswith("mlflow.db"):
            (folder / entry.name).symlink_to(entry)
    (folder / "data").mkdir()
    _stand_in_venv(folder / ".venv" / "bin")
    return folder


def _stand_in_venv(bin_dir: Path) -> None:
    """python, python3, pip and activate that stand for this test's virtual environment."""
    bin_dir.mkdir(parents=True)
    python = sys.executable
    satisfied = 'echo "doc test: \\"$(basename "$0") $*\\" is satisfied by the test\'s environment"'
    scripts = {
        "python": f'exec "{python}" "$@"\n',
        "python3": f'if [ "$1 $2" = "-m venv" ]; then {satisfied}; exit 0; fi\nexec "{python}" "$@"\n',
        "pip": f'if [ "$1" = install ]; then {satisfied}; exit 0; fi\nexec "{python}" -m pip "$@"\n',
        "activate": f'export PATH="{bin_dir}:$PATH"\n',
    }
    for name, body in scripts.items():
        script = bin_dir / name
        script.write_text("#!/usr/bin/env bash\n" + body)
        script.chmod(0o755)


def reader_env(checkout: Path) -> dict[str, str]:
    own = ("PREFECT_", "MLFLOW_", "VIRTUAL_ENV", "PIC_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(own)}
    stand_in, installed = checkout / ".venv" / "bin", Path(sys.executable).parent
    env["PATH"] = os.pathsep.join([str(stand_in), str(installed), env["PATH"]])
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{checkout / 'mlflow.db'}"
    env["PREFECT_HOME"] = str(checkout / ".prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # no telemetry from a scratch server
    return env


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Runs the block under `set -e` in a process group of its own, stopped when it ends."""
    process = subprocess.Popen(
        ["bash", "-c", "set -e\n" + block.code],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=BLOCK_SECONDS)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        code, output = -1, output + f"\n(stopped after {BLOCK_SECONDS} s)"
    finally:
        _stop_group(process.pid)
    return code, output


def _stop_group(group: int) -> None:
    """What the block left running (a server started with `&`) stops with it."""
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[block.where for block in BLOCKS])
def test_the_block_runs(block: Block, checkout: Path):
    if block.skip:
        pytest.skip(f"{block.where}: {block.skip}")
    code, output = run_block(block, checkout, reader_env(checkout))
    tail = output[-6000:]
    assert code == 0, f"{block.where}: the block exited {code}:\n{block.code}\n--- its output ---\n{tail}"
