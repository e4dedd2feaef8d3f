import pytest
import torch

from tasks import files
from tasks.files import atomic_save


def test_atomic_save_round_trips(tmp_path):
    atomic_save({"w": torch.ones(3)}, tmp_path / "sub" / "x.pt")
    assert torch.equal(torch.load(tmp_path / "sub" / "x.pt", weights_only=True)["w"], torch.ones(3))


def test_failed_save_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "x.pt"
    atomic_save({"version": 1}, target)

    def crash(obj, handle):
        handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(files.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"version": 2}, target)
    assert torch.load(target, weights_only=True) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_atomic_output_appears_only_when_complete(tmp_path):
    target = tmp_path / "out" / "rows.csv"
    with pytest.raises(RuntimeError):
        with files.atomic_output(target) as handle:
            handle.write("a,b\n")
            raise RuntimeError("stopped half way")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with files.atomic_output(target) as handle:
        handle.write("a,b\n")
        assert not target.exists()
    assert target.read_text() == "a,b\n"
