import pytest

from tasks.train.sweeps import FAILED, FINISHED, SweepFailedError, best_trial, plot_by_setting, trials_table


def outcome(trial, status=FINISHED, **values):
    return {"trial": trial, "status": status, **values}


def test_table_is_in_trial_order_with_every_column():
    table = trials_table(
        [
            outcome(2, lr=0.1, model="cnn", val_accuracy=0.9, val_loss=0.3, worker="h:2", checkpoint="x"),
            outcome(1, FAILED, lr=0.01, model="mlp", error="RuntimeError: boom"),
        ],
        ["lr", "model"],
    )
    assert table["trial"].tolist() == [1, 2]
    assert list(table.columns[:4]) == ["trial", "status", "lr", "model"]
    assert "checkpoint" not in table and "train_seconds" in table
    assert table.loc[0, "error"] == "RuntimeError: boom"


def test_best_is_highest_val_accuracy_then_lowest_val_loss():
    table = trials_table(
        [
            outcome(1, val_accuracy=0.95, val_loss=0.20),
            outcome(2, val_accuracy=0.97, val_loss=0.30),
            outcome(3, val_accuracy=0.97, val_loss=0.10),
            outcome(4, FAILED, error="x"),
        ],
        [],
    )
    assert best_trial(table).trial == 3


def test_all_failed_names_every_error():
    table = trials_table([outcome(1, FAILED, error="A"), outcome(2, FAILED, error="B")], [])
    with pytest.raises(SweepFailedError, match="all 2 trials failed: trial 1: A; trial 2: B"):
        best_trial(table)


def test_plot_has_a_panel_per_swept_setting(tmp_path):
    rows = [
        outcome(i, lr=lr, model=m, val_accuracy=acc, val_loss=0.1)
        for i, (lr, m, acc) in enumerate([(1e-4, "mlp", 0.8), (1e-2, "cnn", 0.9), (1e-3, "cnn", 0.85)], 1)
    ]
    path = plot_by_setting(trials_table(rows, ["lr", "model"]), ["lr", "model"], tmp_path / "p.png")
    assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"
    failed = trials_table([outcome(1, FAILED, lr=1e-3, error="x")], ["lr"])
    assert plot_by_setting(failed, ["lr"], tmp_path / "none.png") is None
