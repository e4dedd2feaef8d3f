"""What a registered version is, judged from its MLmodel file before anything else of it is
downloaded: only the two flavors this project writes are accepted.

    python -m tasks.predict.model_files check "models:/NAME@ALIAS"

prints the checked version (models:/NAME/VERSION, what to serve) or exits naming what is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import mlflow
import yaml
from mlflow.exceptions import MlflowException

import models.logits_pyfunc
from common import compat
from tasks.data.decoding import Preprocessing
from tasks.predict.image_inputs import PredictionError
from tasks.track.tracking import get_client

MLMODEL_LIMIT = 1 << 20  # bytes; the file is a few kB, and it is read whole before any check
MAX_SIDE = 4096  # every image is resized to the model's input: a 4096x4096 RGB one is 200 MB as floats
PT2_FILE = "data/model.pt2"
# Fields of each flavor section: those with a value must hold it ("code": None, no code shipped);
# the rest are allowed and ignored. Anything else is a model this project did not write.
PYTORCH = {"model_data": "data", "code": None, "pytorch_version": ...}
PYTORCH_PYFUNC = {
    "loader_module": "mlflow.pytorch",  # MLflow's own loader, which `mlflow models serve` runs
    "data": "data",
    "code": None,
    "pickle_module_name": compat.PICKLE_MODULE.path,  # MLflow's own module, named in what it writes
    **dict.fromkeys(("config", "env", "python_version"), ...),
}
ONNX_FIELDS = {"data", "code", "onnx_version", "providers", "onnx_session_options"}
ACCEPTED = "the PyTorch flavor saved as pt2 with MLflow's mlflow.pytorch loader, or the ONNX flavor"


class Refused(ValueError):
    """Why an MLmodel is not one this project wrote."""


@dataclass(frozen=True)
class CheckedModel:
    """A registry version whose MLmodel passed the checks, and what predicting with it needs."""

    name: str
    version: str
    flavor: str  # "pytorch" (a torch.export program) or "onnx"
    model_file: str  # the file to load, relative to the model's folder
    flavors: tuple[str, ...]  # every flavor its MLmodel names
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]  # (C, H, W)
    preprocessing: Preprocessing

    def refused(self, why: str) -> PredictionError:
        """The error naming this version, its flavors and `why` it is refused."""
        return refusal(self.name, self.version, self.flavors, why)


def refusal(name: str, version: str, flavors: Sequence[str], why: object) -> PredictionError:
    """The error naming a refused version, its flavors and why."""
    listed = ", ".join(flavors)[:300] or "none"  # the names come from the registry, unchecked
    return PredictionError(f"model {name!r} version {version} (flavors: {listed}) is refused: {why}")


def check_mlmodel(mlmodel: Any, name: str, version: str) -> CheckedModel:
    """The version's flavor, model file, classes, input and preprocessing from its parsed MLmodel;
    anything this project does not write is a PredictionError naming the version and why."""
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    names = tuple(sorted(map(str, flavors))) if isinstance(flavors, dict) else ()
    try:
        flavor, model_file = check_flavors(flavors)
        metadata = mlmodel.get("metadata")
        class_names = check_class_names(metadata)
        shape = check_signature(mlmodel.get("signature"), len(class_names))
        prep = check_preprocessing(metadata, shape)
    except Refused as why:
        raise refusal(name, version, names, why) from None
    return CheckedModel(name, version, flavor, model_file, names, class_names, shape, prep)


def check_flavors(flavors: Any) -> tuple[str, str]:
    """(flavor, model file) of one of the two flavor sets this project writes."""
    if not isinstance(flavors, dict):
        raise Refused("its MLmodel names no flavors")
    if set(flavors) == {"pytorch", "python_function"}:
        check_fields(flavors["pytorch"], PYTORCH, "pytorch")
        check_fields(flavors["python_function"], PYTORCH_PYFUNC, "python_function")
        return "pytorch", PT2_FILE
    if set(flavors) in ({"onnx"}, {"onnx", "python_function"}):  # its pyfunc part is never used
        onnx = flavors["onnx"]
        check_fields(onnx, dict.fromkeys(ONNX_FIELDS, ...), "onnx")
        data = onnx.get("data")
        if not (isinstance(data, str) and data.endswith(".onnx") and Path(data).name == data != ".onnx"):
            raise Refused(f"its onnx flavor's data {data!r} is not the name of a .onnx file")
        return "onnx", data
    raise Refused(f"only this project's two flavors are loaded: {ACCEPTED}")


def check_fields(section: Any, expected: dict[str, Any], flavor: str) -> None:
    if not isinstance(section, dict):
        raise Refused(f"its {flavor} flavor is {section!r}, not a section of fields")
    unknown = sorted(set(section) - set(expected))
    if unknown:
        raise Refused(f"its {flavor} flavor has fields this project does not write: {', '.join(unknown)}")
    for field, value in expected.items():
        if value is not ... and section.get(field) != value:
            raise Refused(f"its {flavor} flavor's {field} is {section.get(field)!r}, not {value!r}")


def check_class_names(metadata: Any) -> tuple[str, ...]:
    names = metadata.get("class_names") if isinstance(metadata, dict) else None
    if names is None:
        raise Refused("its metadata has no class_names (the class of each output, which training records)")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise Refused(f"its metadata's class_names {str(names)[:200]} is not a list of strings")
    if len(set(names)) != len(names):
        raise Refused(f"its metadata's class_names {str(names)[:200]} repeat a name")
    return tuple(names)


def check_signature(signature: Any, classes: int) -> tuple[int, int, int]:
    """(C, H, W) of a signature taking float32 (-1, C, H, W) pixels to float32 (-1, classes) logits."""
    try:
        [inputs], [outputs] = (json.loads(signature[key]) for key in ("inputs", "outputs"))
        input_spec, output_spec = inputs["tensor-spec"], outputs["tensor-spec"]
        shape = tuple(input_spec["shape"])
        float32 = input_spec["dtype"] == output_spec["dtype"] == "float32"
        output_shape = tuple(output_spec["shape"])
    except (TypeError, KeyError, ValueError):
        raise Refused(f"its signature {str(signature)[:300]} is not one tensor in and one out") from None
    sides = shape[2:]
    if not (float32 and len(shape) == 4 and shape[0] == -1 and output_shape == (-1, classes)):
        raise Refused(f"its signature is not float32 (-1, C, H, W) pixels to (-1, {classes}) logits")
    if not all(isinstance(n, int) and 0 < n <= MAX_SIDE for n in sides) or shape[1] not in (1, 3):
        raise Refused(f"its input {shape} is not 1 or 3 channels of at most {MAX_SIDE} pixels a side")
    return shape[1:]


def check_preprocessing(metadata: Any, shape: tuple[int, int, int]) -> Preprocessing:
    """The preprocessing training recorded; models logged before it was recorded get a plain resize
    to their input (what --resize did for them)."""
    stored = metadata.get("preprocessing") if isinstance(metadata, dict) else None
    if stored is None:
        return Preprocessing(shape[0], tuple(shape[1:]), "stretch")
    try:
        prep = Preprocessing.from_dict(stored)
    except (TypeError, KeyError, ValueError, AttributeError) as error:
        raise Refused(f"its preprocessing {str(stored)[:200]} is not valid ({error})") from None
    if (prep.channels, *prep.size) != shape:
        raise Refused(f"its preprocessing {prep.to_dict()} does not give its input shape {shape}")
    return prep


def check_listing(checked: CheckedModel, paths: Sequence[str]) -> None:
    """The version's files (relative paths; for the PyTorch flavor, those under data/ at least)
    hold its model file, and a PyTorch flavor's data/ nothing but the pt2 program."""
    if checked.flavor == "pytorch":
        data = sorted(p for p in paths if p.startswith("data/"))
        if data != [PT2_FILE]:
            raise checked.refused(
                f"its data/ holds {', '.join(data) or 'nothing'}, not just {PT2_FILE}: "
                "only the pt2 (torch.export) format is loaded, never a pickled model"
            )
    elif checked.model_file not in paths:
        raise checked.refused(f"it has no file {checked.model_file}")


def resolve(model_uri: str) -> tuple[str, str]:
    """(name, version) of `models:/NAME/VERSION` or `models:/NAME@ALIAS` (the alias's version now)."""
    rest = model_uri.removeprefix("models:/")
    name, sep, alias = rest.rpartition("@")
    name, _, version = rest.rpartition("/") if not sep else (name, sep, alias)
    if rest == model_uri or not name or not (sep or version.isdigit()):
        raise PredictionError(f"{model_uri!r} is not a models:/NAME@ALIAS or models:/NAME/VERSION URI")
    if not sep:
        return name, version
    try:
        return name, str(get_client().get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        raise PredictionError(f"no version of {name!r} has the alias {alias!r}: {error.message}") from None


def read_checked(name: str, version: str) -> CheckedModel:
    """Downloads the version's MLmodel alone and checks it, and its file listing, as `check_mlmodel`
    and `check_listing` do; nothing else of the version is downloaded."""
    get_client()  # creates the default local store's tables if they are missing
    base = f"models:/{name}/{version}"
    listed = {info.path: info for info in mlflow.artifacts.list_artifacts(artifact_uri=base)}
    size = listed["MLmodel"].file_size if "MLmodel" in listed else None
    if size is None or size > MLMODEL_LIMIT:
        why = "it has no MLmodel file" if size is None else f"its MLmodel is {size} bytes"
        raise refusal(name, version, (), f"{why} (at most {MLMODEL_LIMIT} bytes are read)")
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=folder)
        checked = check_mlmodel(read_mlmodel(Path(path), name, version), name, version)
    paths = list(listed)
    if checked.flavor == "pytorch":
        paths += [info.path for info in mlflow.artifacts.list_artifacts(artifact_uri=f"{base}/data")]
    check_listing(checked, paths)
    return checked


def read_mlmodel(path: Path, name: str, version: str) -> Any:
    """The MLmodel's YAML as plain data (safe_load: no Python objects are built from tags)."""
    if path.stat().st_size > MLMODEL_LIMIT:
        raise refusal(name, version, (), f"its MLmodel is over {MLMODEL_LIMIT} bytes")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise refusal(name, version, (), f"its MLmodel is not YAML ({error})") from None


def check_serving_code(checked: CheckedModel) -> None:
    """An ONNX version's pyfunc, which `mlflow models serve` runs, is this project's own loader: its
    code/ holds models/logits_pyfunc.py byte for byte (the PyTorch flavor ships no code)."""
    if checked.flavor != "onnx":
        return
    base, loader = f"models:/{checked.name}/{checked.version}", Path(models.logits_pyfunc.__file__)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=folder))
        mlmodel = read_mlmodel(path, checked.name, checked.version)
        if check_mlmodel(mlmodel, checked.name, checked.version) != checked:
            raise checked.refused("its MLmodel changed while it was being checked")
        pyfunc = mlmodel["flavors"].get("python_function", {})
        expected = {"loader_module": loader.stem, "code": "code", "data": checked.model_file}
        files = [info.path for info in mlflow.artifacts.list_artifacts(artifact_uri=f"{base}/code")]
        same = all(pyfunc.get(k) == v for k, v in expected.items()) and files == [f"code/{loader.name}"]
        if same:
            shipped = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{files[0]}", dst_path=folder)
            same = Path(shipped).read_bytes() == loader.read_bytes()
    if not same:
        why = f"the code its pyfunc runs when served is not this project's models/{loader.name}"
        raise checked.refused(why)


def main(argv: Optional[list[str]] = None) -> str:
    """`check MODEL_URI`: prints the checked models:/NAME/VERSION, or exits naming the problem."""
    parser = argparse.ArgumentParser(
        prog="python -m tasks.predict.model_files", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check a registered version before serving or loading it")
    check.add_argument("model_uri", help='e.g. "models:/NAME@champion" or "models:/NAME-onnx/3"')
    args = parser.parse_args(argv)
    try:
        checked = read_checked(*resolve(args.model_uri))
        check_serving_code(checked)
    except (PredictionError, MlflowException) as error:
        sys.exit(f"error: {error}")
    pinned = f"models:/{checked.name}/{checked.version}"
    print(pinned)
    return pinned


if __name__ == "__main__":
    main()
