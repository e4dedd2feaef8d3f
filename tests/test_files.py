import errno
import os
import pickle
import subprocess
import sys

import pytest
import torch

from common import files
from common.files import OutputWriteError, atomic_path, atomic_save

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    with pytest.raises(OutputWriteError, match=f"cannot write {target}: disk full"):
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


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failed_sync_or_rename_keeps_the_previous_file(tmp_path, monkeypatch, step):
    target = tmp_path / "x.pt"
    atomic_save({"version": 1}, target)
    previous = target.read_bytes()

    def fail(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(files.os, step, fail)
    with pytest.raises(OutputWriteError, match=rf"cannot write {target}: \[Errno {errno.EIO}\]"):
        atomic_save({"version": 2}, target)
    assert target.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_atomic_path_hands_a_file_name_to_writers_and_renames_only_on_success(tmp_path):
    target = tmp_path / "out" / "x.pt"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            torch.save({"version": 1}, tmp)
            raise ValueError("the writer failed after writing")
    assert list(target.parent.iterdir()) == []
    with atomic_path(target) as tmp:
        torch.save({"version": 2}, tmp)
        assert tmp.parent == target.parent and tmp.name.endswith(".part") and not target.exists()
    assert torch.load(target, weights_only=True) == {"version": 2}


def test_temporary_files_pass_over_a_planted_name_and_keep_the_umasks_permissions(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("not to be overwritten")
    names = ["planted", "fresh", "planted", "other"]
    monkeypatch.setattr(files.secrets, "token_hex", lambda size: names.pop(0))
    for name in ("x.pt", "y.pt"):  # names someone guessed, leading elsewhere
        (tmp_path / f".{name}.planted.part").symlink_to(victim)
    descriptor, tmp = files.exclusive_temp(tmp_path / "x.pt")
    os.close(descriptor)
    assert tmp.name == ".x.pt.fresh.part" and tmp.stat().st_size == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert tmp.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() makes files, not mkstemp's 0600
    with atomic_path(tmp_path / "y.pt") as made:
        made.write_text("new")
        assert made.name == ".y.pt.other.part"
    assert (tmp_path / "y.pt").read_text() == "new"
    assert victim.read_text() == "not to be overwritten"


def test_an_unwritable_folder_names_the_file(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    target = tmp_path / "taken" / "sub" / "x.pt"
    with pytest.raises(OutputWriteError, match=f"cannot write {target}: .*Not a directory"):
        atomic_save({"version": 1}, target)


def test_a_failing_input_is_not_reported_as_a_failed_write(tmp_path):
    target = tmp_path / "merged.csv"
    with pytest.raises(FileNotFoundError) as caught:
        with files.atomic_output(target) as handle:
            handle.write(open(tmp_path / "missing.csv").read())
    assert not isinstance(caught.value, OutputWriteError) and list(tmp_path.iterdir()) == []


def test_output_write_error_message_and_pickling():
    error = files.write_error("/out/model.onnx", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert str(error) == f"cannot write /out/model.onnx: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"
    copied = files.write_error("/store/a.png", OSError("full"), source="/run/a.png")
    assert str(copied) == "cannot copy /run/a.png to /store/a.png: full"
    for original in (error, copied):  # Prefect ships a task's exception between processes
        again = pickle.loads(pickle.dumps(original))
        assert type(again) is OutputWriteError and str(again) == str(original)


# A real kernel refusal in the middle of torch.save, which torch reports as a RuntimeError: the
# file-size limit makes write(2) fail with EFBIG once the file passes 4 KiB, as a full disk fails it
# with ENOSPC.
KERNEL_REFUSES = """
import pathlib, resource, sys, torch
sys.path.insert(0, {repo!r})
from common.files import OutputWriteError, atomic_save
target = pathlib.Path({target!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    atomic_save({{"w": torch.ones(100_000)}}, target)
except OutputWriteError as error:
    print(error.errno, error)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file-size limits")
@pytest.mark.slow
def test_torch_save_refused_by_the_kernel_keeps_the_previous_file(tmp_path):
    target = tmp_path / "last.pt"
    atomic_save({"version": 1}, target)
    previous = target.read_bytes()
    script = KERNEL_REFUSES.format(repo=REPO, target=str(target))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith(f"{errno.EFBIG} cannot write {target}: "), done.stderr[-2000:]
    assert target.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
