"""What a run shows in the Prefect UI (summary, per-class table, prediction summary artifacts) and
where it came from, with links into both UIs when their servers speak HTTP."""

from __future__ import annotations

import re
from typing import Mapping, Optional
from urllib.parse import quote

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL

from tasks.publish.evaluation import Evaluation
from tasks.publish.model_card import PER_CLASS_COLUMNS, Provenance, link, markdown_table
from tasks.track import tracking


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


def publish_run_summary(
    name: str, evaluation: Evaluation, parity: Mapping, registration: Mapping, outputs: Mapping[str, str]
) -> None:
    """A markdown summary and a per-class table artifact on the flow run."""
    metrics = evaluation.metrics
    versions = ", ".join(
        link(f"{registered} v{version}", version_url(registered, version))
        for registered, version in registration["versions"].items()
    )
    source = provenance(registration["run_id"])
    lines = [
        f"# {name}: test accuracy {metrics['test_accuracy']:.4f}",
        f"- **Test** accuracy {metrics['test_accuracy']:.4f}, macro F1 {metrics['test_macro_f1']:.4f}, "
        f"loss {metrics['test_loss']:.4f}",
        f"- **ONNX parity** max |logit diff| {parity['max_abs_diff']:.3g}, "
        f"{'passed' if parity['passed'] else 'failed'}",
        f"- **Gate** {registration['alias']}: {registration['reason']}",
        f"- **Registered** {versions}",
        f"- **MLflow run** {link(source.run_id, source.run_url)}",
        *(f"- **{label}** `{path}`" for label, path in outputs.items()),
    ]
    create_markdown_artifact("\n".join(lines), key=artifact_key(name, "summary"), description=f"{name} run")
    rows = [{column: row[column] for column in PER_CLASS_COLUMNS} for row in evaluation.per_class]
    create_table_artifact(
        rows, key=artifact_key(name, "per-class"), description=f"{name}: per-class test metrics"
    )


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
