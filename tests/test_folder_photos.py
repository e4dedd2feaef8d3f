from conftest import write_image_folder

from tasks.data.sources import FolderSource


def class_tree(root, count=8):
    """root/left and root/right, from write_image_folder's PNGs."""
    for name, label in write_image_folder(root, count):
        target = root / ("left", "right")[label]
        target.mkdir(exist_ok=True)
        (root / name).rename(target / (root / name).name)
    (root / "img").rmdir()


def test_a_held_out_share_or_a_test_tree_from_paths_as_given(tmp_path, monkeypatch):
    class_tree(tmp_path / "train")
    class_tree(tmp_path / "test", 4)
    monkeypatch.chdir(tmp_path)
    held = FolderSource(train_dir="train", test_fraction=0.5).list_photos()
    assert held.class_names == ("left", "right") and len(held.test[0]) == 4
    assert held.test_origin == f"{tmp_path / 'train'} (stratified test split: fraction 0.5, seed 0)"
    tree = FolderSource(train_dir="train", test_dir="test").list_photos()
    assert len(tree.train[0]) == 8 and tree.test_origin == str(tmp_path / "test")
