"""report_run: the training run's summary in the Prefect UI (test metrics, ONNX parity, the gate's
verdict, the registered versions) and its per-class table, as artifacts on the flow run."""

from __future__ import annotations

from typing import Mapping

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.publish.evaluation import Evaluation
from tasks.publish.model_card import PER_CLASS_COLUMNS
from tasks.track import reports
from tasks.track.reports import link
from tasks.track.retries import mlflow_retries


def publish_run_summary(
    name: str, evaluation: Evaluation, parity: Mapping, registration: Mapping, outputs: Mapping[str, str]
) -> None:
    """A markdown summary and a per-class table artifact on the flow run."""
    metrics = evaluation.metrics
    versions = ", ".join(
        link(f"{registered} v{version}", reports.version_url(registered, version))
        for registered, version in registration["versions"].items()
    )
    source = reports.provenance(registration["run_id"])
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
    create_markdown_artifact(
        "\n".join(lines), key=reports.artifact_key(name, "summary"), description=f"{name} run"
    )
    rows = [{column: row[column] for column in PER_CLASS_COLUMNS} for row in evaluation.per_class]
    create_table_artifact(
        rows, key=reports.artifact_key(name, "per-class"), description=f"{name}: per-class test metrics"
    )


@task(name="report-run", cache_policy=NO_CACHE, **mlflow_retries())  # reads the MLflow run
def report_run(
    name: str, evaluation: Evaluation, parity: dict, registration: dict, outputs: dict[str, str]
) -> None:
    """The run's summary and per-class table as Prefect artifacts, keyed by the registered name."""
    publish_run_summary(name, evaluation, parity, registration, outputs)
