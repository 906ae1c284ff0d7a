"""Export outputs: existing ones are refused unless overwriting; a failed export leaves nothing behind."""

import pytest

from dinoscale.export.backbone import ExportError
from dinoscale.export.output import staged_files


def test_files_move_into_a_new_folder(tmp_path):
    with staged_files(tmp_path / "out" / "hf", ["a.json", "b.bin", "absent"], overwrite=False) as staging:
        (staging / "a.json").write_text("{}")
        (staging / "b.bin").write_bytes(b"x")
    assert sorted(p.name for p in (tmp_path / "out" / "hf").iterdir()) == ["a.json", "b.bin"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["hf"]  # no staging folder left


def test_existing_output_is_refused_and_overwrite_replaces_only_the_export(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "a.json").write_text("old")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="output exists: .*a.json.*--overwrite"):
        with staged_files(folder, ["a.json"], overwrite=False):
            pass
    with staged_files(folder, ["a.json"], overwrite=True) as staging:
        (staging / "a.json").write_text("new")
    assert (folder / "a.json").read_text() == "new" and (folder / "notes.txt").read_text() == "mine"


def test_a_failed_export_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="exporter failed"):
        with staged_files(tmp_path / "hf", ["a.json"], overwrite=False) as staging:
            (staging / "a.json").write_text("{}")
            raise RuntimeError("exporter failed")
    assert list(tmp_path.iterdir()) == []


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "hf").write_text("not a folder")
    with pytest.raises(ExportError, match="not a folder"):
        with staged_files(tmp_path / "hf", ["a.json"], overwrite=True):
            pass
