"""Where a run came from, with links into both UIs when their servers speak HTTP, the Markdown that
shows it (links, tables), and a prediction run's summary artifact in the Prefect UI."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence
from urllib.parse import quote

from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL

from tasks.track import tracking


@dataclass(frozen=True)
class Provenance:
    """Where a model came from; the URLs are set only when the servers are reachable over HTTP."""

    run_id: str
    run_url: Optional[str] = None
    flow_run_id: Optional[str] = None
    flow_run_url: Optional[str] = None
    git_commit: Optional[str] = None


def link(text: str, url: Optional[str]) -> str:
    return f"[{text}]({url})" if url else f"`{text}`"


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured table; floats to 4 decimals."""

    def cell(value: object) -> str:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[column]) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def artifact_key(*parts: str) -> str:
    """A stable key from names such as the registered model's, so the Artifacts page keeps each
    key's history across runs; Prefect accepts lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def provenance(run_id: str) -> Provenance:
    """This flow run's MLflow run, Prefect flow run and git commit, with links where possible."""
    run = tracking.get_client().get_run(run_id)
    # A temporary Prefect server (no PREFECT_UI_URL) is gone when the run ends: no link to it.
    flow_run_url = flow_run.ui_url if PREFECT_UI_URL.value() else None
    return Provenance(
        run_id=run_id,
        run_url=tracking.web_url("experiments", run.info.experiment_id, "runs", run_id),
        flow_run_id=flow_run.id,
        flow_run_url=flow_run_url,
        git_commit=run.data.tags.get("git_commit") or tracking.git_tags().get("git_commit"),
    )


def version_url(name: str, version: str) -> Optional[str]:
    return tracking.web_url("models", quote(name, safe=""), "versions", version)


def publish_prediction_summary(
    name: str, model_uri: str, version: str, totals: Mapping, predictions: str, run_id: str
) -> None:
    """A markdown summary of a prediction run: images, accuracy when labels are known, predicted
    class distribution and where the CSV is."""
    images = totals["images"]
    accuracy = (
        f"{totals['correct'] / totals['labelled']:.4f} on {totals['labelled']} labelled images"
        if totals["labelled"]
        else "unknown (no labels)"
    )
    counts = sorted(totals["classes"].items(), key=lambda item: -item[1])
    rows = [{"class": cls, "images": n, "share": n / images} for cls, n in counts]
    source = provenance(run_id)
    lines = [
        f"# {images} images predicted with `{model_uri}` (version {version})",
        f"- **Accuracy** {accuracy}",
        f"- **Predictions** `{predictions}`",
        f"- **MLflow run** {link(source.run_id, source.run_url)}",
        "",
        "## Predicted classes",
        markdown_table(rows, ("class", "images", "share")),
    ]
    create_markdown_artifact(
        "\n".join(lines), key=artifact_key(name, "predictions"), description=f"{name}: prediction run"
    )
