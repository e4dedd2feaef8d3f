from tasks.data.datasets import DatasetRef
from tasks.data.decoding import Preprocessing
from tasks.publish.model_card import model_contract, version_card
from tasks.track.reports import Provenance

SHA = "abcdef0123456789" * 4
DATASET = DatasetRef("digits", "/x.pt", SHA, ("zero", "one"), 1, (28, 28), 100, 20, (0.5,), (0.2,), "g", "g")
METRICS = {"test_accuracy": 0.95, "test_macro_f1": 0.9412, "test_loss": 0.2}
PER_CLASS = [
    {"class_name": "zero", "precision": 1.0, "recall": 0.9, "f1": 0.947, "support": 10, "class_index": 0},
    {"class_name": "o|ne", "precision": 0.9, "recall": 1.0, "f1": 0.947, "support": 10, "class_index": 1},
]
PARITY = {"max_abs_diff": 3e-6, "top1_agreement": 1.0, "samples": 20, "single_samples": 20, "passed": True}


def card(provenance: Provenance) -> str:
    sizes = {"training": 90, "validation": 10, "test": 20}
    params = {"epochs": 3, "lr": 0.003, "classes": None}
    return version_card(
        DATASET, sizes, params, METRICS, PER_CLASS, PARITY, "champion: no champion", provenance
    )


def test_card_holds_data_metrics_parity_gate_and_provenance():
    text = card(Provenance("run123", git_commit="c0ffee", flow_run_id="fr-9"))
    for expected in (
        SHA,
        "training 90, validation 10, test 20",
        "accuracy 0.9500",
        "macro F1 0.9412",
        "3e-06",
        "champion: no champion",
        "`run123`",
        "`fr-9`",
        "`c0ffee`",
        "`epochs=3`",
        "| zero | 1.0000 | 0.9000 | 0.9470 | 10 |",
        "o\\|ne",  # a pipe in a class name does not break the table
    ):
        assert expected in text, expected
    assert "classes=" not in text  # unset settings are left out


def test_card_links_when_servers_speak_http():
    text = card(
        Provenance("run123", "http://mlflow:5000/#/experiments/1/runs/run123", "fr-9", "http://p/fr-9")
    )
    assert (
        "[run123](http://mlflow:5000/#/experiments/1/runs/run123)" in text and "[fr-9](http://p/fr-9)" in text
    )


def test_contract_names_input_output_and_preprocessing():
    contract = model_contract(Preprocessing(3, (32, 48), "pad"), ["cat", "dog"])
    assert "(N, 3, 32, 48)" in contract and "(N, 2)" in contract and "cat, dog" in contract
    assert "32x48 pixels, resize mode `pad` (resized to fit inside, then padded with black" in contract


def test_card_shows_a_mirror_without_its_credentials():
    mirror = "https://bob:pa55@files.example/mnist/?token=t0ken"
    sizes = {"training": 90, "validation": 10, "test": 20}
    text = version_card(
        DATASET, sizes, {"mirror": mirror}, METRICS, PER_CLASS, PARITY, "champion: none", Provenance("r")
    )
    assert "`mirror=https://***@files.example/mnist/?token=***`" in text
    assert "pa55" not in text and "t0ken" not in text
