"""The documentation site builds strictly, its flag tables cover every config field, and the README,
its front door, stays short and links to pages that exist.

The suite builds the site once, here, as `mkdocs build --strict` does (into a scratch folder), and
every test of the built pages uses that build; `.ci/run` does not build it again."""

from __future__ import annotations

import html as entities
import re
from pathlib import Path

import pytest
import yaml
from mkdocs.commands.build import build
from mkdocs.config import load_config

from flows.cli import flag_fields
from flows.config import PredictConfig, TrainConfig
from flows.sweep_config import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS_LINK = re.compile(r"\]\((docs/[^)#\s]+)(#[^)\s]*)?\)")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as `mkdocs build --strict` builds it (a warning fails the build)."""
    folder = tmp_path_factory.mktemp("site")
    build(load_config(str(ROOT / "mkdocs.yml"), strict=True, site_dir=str(folder)))
    return folder


def flags_of(config: type, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags flows/cli.py gives a config's fields and its data sources' settings (a switch also
    has its --no- form)."""
    flags = []
    for name, (_, model) in flag_fields(config).items():
        if name not in skip:
            flag = "--" + name.replace("_", "-")
            flags += [flag, "--no-" + flag[2:]] if model.model_fields[name].annotation is bool else [flag]
    return flags


def section(html: str, heading_id: str) -> str:
    """The HTML from the heading with this id to the next second-level heading."""
    start = html.index(f'id="{heading_id}"')
    end = html.find("<h2", start)
    return html[start : end if end != -1 else None]


def test_the_flags_page_lists_every_field_of_every_command(site):
    html = (site / "flags" / "index.html").read_text()
    assert "<!-- flags:" not in html  # the hook replaced every marker
    expected = {
        "train_flowpy": flags_of(TrainConfig),
        # A sweep's --address is its task runner's cluster; --train-on is a single run's.
        "sweep_flowpy": flags_of(TrainConfig, skip=("train_on", "address"))
        + flags_of(SweepConfig, skip=("base",)),
        "predict_flowpy": flags_of(PredictConfig),
    }
    for heading, flags in expected.items():
        shown = set(re.findall(r"<code>(--[a-z0-9-]+)</code>", section(html, heading)))
        assert shown == set(flags), heading


def test_the_flags_page_gives_types_and_defaults_from_the_configs(site):
    html = section((site / "flags" / "index.html").read_text(), "train_flowpy")
    epochs = re.search(r"<tr>\s*<td><code>--epochs</code>.*?</tr>", html, re.S).group(0)
    assert f"<code>{TrainConfig.model_fields['epochs'].default}</code>" in epochs
    assert "integer, &gt;= 1, &lt;= 1000" in epochs
    assert "field <code>epochs</code>" in epochs
    dataset = re.search(r"<tr>\s*<td><code>--dataset</code>.*?</tr>", html, re.S).group(0)
    assert "one of <code>fashion-mnist</code>" in dataset


def test_the_flags_page_puts_patterns_in_words(site):
    html = (site / "flags" / "index.html").read_text()
    assert "^[" not in html and "{0,4}" not in html  # no regular expression shown as a type
    size = re.search(r"<tr>\s*<td><code>--image-size</code>.*?</tr>", html, re.S).group(0)
    assert "<code>HxW</code> in pixels" in size


def test_the_speed_page_shows_each_linked_results_file_in_place(site):
    page, html = (ROOT / "docs" / "speed.md").read_text(), (site / "speed" / "index.html").read_text()
    assert "../benchmarks/results/" not in html  # every `Figures:` link became its file or a note
    linked = re.findall(r"\]\(\.\./benchmarks/results/([\w.-]+\.md)\)", page)
    assert linked, "speed.md links no results file"
    for name in linked:
        results = ROOT / "benchmarks" / "results" / name
        if results.is_file():
            heading = results.read_text().lstrip("#").split("\n", 1)[0].strip()
            assert entities.escape(heading, quote=False) in html, name
        else:
            assert f"writes <code>benchmarks/results/{name}</code>" in html, name


def test_the_screenshots_the_records_page_shows_are_there(site):
    html = (site / "records" / "index.html").read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert len(images) == 4
    for image in images:
        assert (site / "records" / image).resolve().is_file(), image


def test_the_readme_is_a_short_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) < 120, f"README.md has {len(lines)} lines; the docs pages hold the detail"


def test_every_docs_link_in_the_readme_resolves_and_every_page_is_linked():
    text = README.read_text()
    links = DOCS_LINK.findall(text)
    for path, anchor in links:
        assert (ROOT / path).is_file(), f"README.md links to {path}, which does not exist"
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = {f"docs/{page}" for entry in nav for page in entry.values()}
    assert pages - {path for path, _ in links} == set(), "pages the README does not link to"

