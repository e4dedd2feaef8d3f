import io

import pytest
from conftest import prefect_artifacts
from prefect import flow
from rich.console import Console

from tasks.train.progress import TrainingProgress


def drive(progress: TrainingProgress, epochs: int, batches: int, first_epoch: int = 1) -> None:
    with progress:
        for epoch in range(first_epoch, epochs + 1):
            for batch in range(1, batches + 1):
                progress.batch_done(epoch, batch)
            progress.epoch_done(epoch)


def test_percent_counts_batches_over_the_whole_run():
    progress = TrainingProgress(epochs=4, batches=10)
    assert progress.percent(1, 5) == 12.5 and progress.percent(4, 10) == 100.0


def test_console_bar_shows_epoch_and_batches_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    progress = TrainingProgress(epochs=2, batches=50, console=console)
    with progress:
        progress.batch_done(1, 20)
        progress.bar.refresh()
        assert "epoch 1/2" in out.getvalue() and "20/50" in out.getvalue()
        progress.epoch_done(1)
        assert progress.bar.tasks == []  # each epoch's bar goes when the epoch ends


def test_no_console_means_no_output(capsys):
    drive(TrainingProgress(epochs=2, batches=3), 2, 3)
    assert capsys.readouterr() == ("", "")


@pytest.mark.slow
def test_progress_artifact_moves_within_epochs_and_ends_at_100(prefect_server):
    seen = []

    @flow
    def train_like() -> str:
        progress = TrainingProgress(epochs=2, batches=4, artifact_key="unit-training", interval=0)
        real = progress._publish
        progress._publish = lambda percent: (seen.append(percent), real(percent))
        drive(progress, 2, 4, first_epoch=1)
        return str(progress.artifact_id)

    artifact_id = train_like()
    [artifact] = [a for a in prefect_artifacts(key="unit-training") if str(a.id) == artifact_id]
    assert float(artifact.data) == 100.0 and artifact.type == "progress"
    assert 12.5 in seen and 50.0 in seen and seen[-1] == 100.0
