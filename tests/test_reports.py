from tasks.track import tracking
from tasks.track.reports import artifact_key, link, markdown_table, version_url


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("Fashion_MNIST CNN", "summary") == "fashion-mnist-cnn-summary"
    assert artifact_key("sweep", "digits/v2") == "sweep-digits-v2"


def test_links_only_for_an_http_tracking_server(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert version_url("m", "1") is None and tracking.web_url("experiments", "1") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000/")
    assert version_url("a/b", "2") == "http://127.0.0.1:5000/#/models/a%2Fb/versions/2"


def test_markdown_tables_and_links():
    assert markdown_table([{"a": 1, "b": 0.5}], ["a", "b"]) == "| a | b |\n|---|---|\n| 1 | 0.5000 |"
    assert markdown_table([{"a": "x|y"}], ["a"]).endswith("| x\\|y |")  # a pipe does not split the cell
    assert link("run1", "http://h/r") == "[run1](http://h/r)" and link("run1", None) == "`run1`"
