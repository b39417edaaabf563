"""bridge_ops.files: one commit point per save. A save replaces the previous one whole; a writer stopped while writing
leaves the previous save; a writer stopped after its commit point leaves a save that the next loader completes. (The
kill -9 tests of the three kinds of save are in test_hf.py, test_trainer.py and test_train_cli.py.)"""

import os
from pathlib import Path

import pytest

from bridge_ops import files


def _writer(**contents):
    def write(directory):
        for name, text in contents.items():
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)

    return write


def _contents(directory):
    return {path.name: path.read_text() for path in sorted(Path(directory).iterdir())}


def test_a_save_replaces_the_previous_one_whole_and_leaves_nothing_else(tmp_path):
    files.publish(str(tmp_path / "out"), _writer(a="1", b="1", c="1"))
    files.publish(str(tmp_path / "out"), _writer(a="2", b="2"), replaces=("c", "d"))
    assert _contents(tmp_path / "out") == {"a": "2", "b": "2"}  # c dropped, d never existed


def test_a_writer_stopped_while_writing_leaves_the_previous_save(tmp_path):
    files.publish(str(tmp_path), _writer(a="1", b="1"))

    def crash(directory):
        _writer(a="2")(directory)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.publish(str(tmp_path), crash)
    assert _contents(tmp_path) == {"a": "1", "b": "1"}
    os.mkdir(tmp_path / f"{files.STAGING}killed")  # what a writer killed while writing leaves
    _writer(a="2")(str(tmp_path / f"{files.STAGING}killed"))
    files.recover(str(tmp_path))
    assert _contents(tmp_path) == {"a": "1", "b": "1"}


def test_a_save_stopped_after_its_commit_point_is_completed_by_the_next_loader(tmp_path, monkeypatch):
    files.publish(str(tmp_path), _writer(a="1", b="1", c="1"))
    replace, moved = os.replace, []

    def stop_after_one_file(src, dst):  # the writer dies after moving its first file into place
        if moved:
            raise KeyboardInterrupt
        moved.append(dst)
        replace(src, dst)

    monkeypatch.setattr(files.os, "replace", stop_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        files.publish(str(tmp_path), _writer(a="2", b="2"), replaces=("c",))
    monkeypatch.setattr(files.os, "replace", replace)
    pending = [name for name in os.listdir(tmp_path) if name.startswith(files.COMMIT)]
    assert len(pending) == 1 and len(moved) == 1
    files.recover(str(tmp_path))
    assert _contents(tmp_path) == {"a": "2", "b": "2"}


def test_fields_of_the_wrong_type_are_named_with_the_file(tmp_path):
    files.check_fields({"step": 3, "run": "sft"}, "m.json", step=int, run=str, sha256=str)
    with pytest.raises(ValueError, match="m.json: step must be int, got True"):
        files.check_fields({"step": True}, "m.json", step=int)
    with pytest.raises(ValueError, match=r"m.json: sha256 must be dict, got 'abc'"):
        files.check_fields({"sha256": "abc"}, "m.json", sha256=dict)
    with pytest.raises(ValueError, match=r"m.json: num_heads must be int or null, got 2.5"):
        files.check_fields({"num_heads": 2.5}, "m.json", num_heads=(int, type(None)))
