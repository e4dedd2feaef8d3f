import subprocess

from mlflow import MlflowClient

from tasks import tracking


def test_run_lifecycle_in_a_real_store(mlflow_store, tmp_path):
    run_id = tracking.start_run("exp", "run-a", {"prefect.flow_run_id": "abc"})
    tracking.log_params(run_id, {"lr": 0.1, "classes": None})
    tracking.log_metrics(run_id, {f"m{i}": i for i in range(1200)}, step=2)  # more than one batch
    tracking.log_tags(run_id, {"device": "cpu"})
    (tmp_path / "a.txt").write_text("x")
    tracking.log_artifacts(run_id, [tmp_path / "a.txt"])
    tracking.finish_run(run_id, succeeded=False)
    run = MlflowClient().get_run(run_id)
    assert run.data.params == {"lr": "0.1", "classes": ""}
    assert len(run.data.metrics) == 1200 and run.data.metrics["m7"] == 7
    assert run.data.tags["device"] == "cpu" and run.info.status == "FAILED"
    assert [a.path for a in MlflowClient().list_artifacts(run_id)] == ["a.txt"]
    assert tracking.find_run("exp", "abc") == run_id
    assert tracking.find_run("exp", "other") is None and tracking.find_run("nope", "abc") is None


def test_git_tags_name_the_commit_or_nothing(tmp_path):
    assert tracking.git_tags(tmp_path) == {}
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(tmp_path),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        check=True,
    )
    tags = tracking.git_tags(tmp_path)
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] == "false"
