from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from common.path_settings import FILE_URL, PATH, OptionalPathText, PathSetting, PathText, path_marks


def test_a_mark_says_which_values_name_paths():
    assert PATH.path("data/x.csv") == "data/x.csv" and PATH.path(None) is None and PATH.path("") is None
    weights = PathSetting(names=("none", "imagenet"))
    assert weights.path("imagenet") is None and weights.path("w.pt") == "w.pt"
    assert FILE_URL.path("file:///srv/mnist%20copy/") == "/srv/mnist copy/"
    assert FILE_URL.path("https://mirror.example/mnist/") is None


class Settings(BaseModel):
    folder: PathText
    maybe: OptionalPathText = None
    other: Optional[str] = None


def test_path_fields_keep_the_text_given_take_path_objects_and_carry_their_mark():
    settings = Settings(folder=Path("images/train"), maybe=None)
    assert settings.folder == "images/train" and settings.model_dump()["folder"] == "images/train"
    assert Settings(folder="a", maybe=Path("b")).maybe == "b"
    marks = {name: path_marks(field.metadata) for name, field in Settings.model_fields.items()}
    assert marks == {"folder": [PATH], "maybe": [PATH], "other": []}
