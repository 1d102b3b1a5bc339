"""Input faults that were tracebacks: each is one line `amorlip <cmd>: error: ...` naming the fix, exit 2, before
any work, and nothing is left half-written (a CSV that is not UTF-8 or is a tar archive, a run name too long
for a folder, `amorlip data` with no pairs, an --out under a file, an existing dataset, a full disk, a folder
where no temporary file can be created)."""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from amorlip.cli import main
from amorlip.errors import CheckpointError
from faults_common import limit_file_size


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"amorlip {command}: error: "), err
    return err[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train(tmp_path, *args: str) -> int:
    return main(["train", "--config", "tiny-demo", "--train.steps", "1", "--train.output-dir", str(tmp_path / "runs"),
                 *args])


def test_a_csv_that_is_not_utf8_is_one_line_before_training(tmp_path, capsys):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("filepath,title\nimg.png,caf\xe9\n".encode("latin-1"))
    assert train(tmp_path, "--data.source", "csv", "--data.train-path", str(bad)) == 2
    line = one_line_error(capsys, "train")
    assert f"{bad} is not a UTF-8 CSV file" in line and "iconv -t utf-8" in line
    assert not (tmp_path / "runs").exists()


def test_a_tar_passed_as_csv_names_the_webdataset_source(tmp_path, capsys):
    member = tmp_path / "x.jpg"
    member.write_bytes(bytes(range(256)) * 4)
    shard = tmp_path / "shard-00000.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(member, arcname="00000000.jpg")
    assert train(tmp_path, "--data.source", "csv", "--data.train-path", str(shard)) == 2
    line = one_line_error(capsys, "train")
    assert "a tar archive" in line and "--data.source wds" in line
    assert not (tmp_path / "runs").exists()


def test_a_run_name_longer_than_a_folder_name_is_refused(tmp_path, capsys):
    assert train(tmp_path, "--train.name", "x" * 300) == 2
    line = one_line_error(capsys, "train")
    assert "(300 bytes) must be one folder name of 1 to 255 bytes" in line and "shorter --train.name" in line
    assert train(tmp_path, "--train.name", "a/b") == 2
    assert "without '/'" in one_line_error(capsys, "train")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,expected", [
    (["csv", "--n", "0"], "--n must be at least 1 (the number of pairs to write), got 0"),
    (["wds", "--n", "4", "--shard-size", "0"], "--shard-size must be at least 1"),
])
def test_data_rejects_an_empty_dataset_and_writes_nothing(tmp_path, capsys, args, expected):
    out = tmp_path / "d"
    assert main(["data", *args, "--out", str(out)]) == 2
    assert expected in one_line_error(capsys, "data")
    assert list(tmp_path.iterdir()) == []


def test_data_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["data", "csv", "--n", "2", "--out", str(tmp_path / "afile" / "x")]) == 2
    assert "is a file, not a folder" in one_line_error(capsys, "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("fmt", ["csv", "wds"])
def test_data_keeps_an_existing_dataset_unless_overwrite(tmp_path, capsys, fmt):
    out = tmp_path / "d"
    assert main(["data", fmt, "--n", "4", "--shard-size", "2", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")  # not the dataset's: never touched
    before = tree(out)
    assert main(["data", fmt, "--n", "3", "--seed", "1", "--out", str(out)]) == 2
    line = one_line_error(capsys, "data")
    assert f"already holds a {fmt} dataset" in line and "--overwrite" in line
    assert tree(out) == before
    assert main(["data", fmt, "--n", "3", "--seed", "1", "--shard-size", "3", "--out", str(out), "--overwrite"]) == 0
    after = tree(out)
    assert after["notes.txt"] == b"mine"
    if fmt == "csv":
        assert len((out / "train.csv").read_text().splitlines()) == 1 + 3
        assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:08d}.png" for i in range(3)]
    else:  # the two old shards are gone, one new shard of 3
        assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-00000.tar"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary folder left


@pytest.mark.slow
def test_data_on_a_full_disk_is_one_line_and_leaves_the_old_dataset(tmp_path):
    out = tmp_path / "d"
    assert main(["data", "wds", "--n", "4", "--out", str(out)]) == 0
    before = tree(out)
    proc = subprocess.run([sys.executable, "-m", "amorlip.cli", "data", "wds", "--n", "64", "--out", str(out),
                           "--overwrite"], capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_file_size(20_000))
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"amorlip data: error: could not write the dataset to {out}"), err
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_a_folder_where_no_temporary_can_be_created_is_a_clear_write_error(tmp_path, monkeypatch):
    """A read-only run or checkpoints folder (root ignores modes, so the refusal is injected): the temporary
    file's creation fails inside the handling, as one CheckpointError naming the file, nothing written."""
    from amorlip import files

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(CheckpointError, match=r"could not write .*config\.yaml: \[Errno 13\] Permission denied"):
        files.atomic_write_text("x", tmp_path / "run" / "config.yaml")
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("flag,typed,suggested", [
    ("--amor.divide-by", "tagret", "--amor.divide-by target"),
    ("--data.source", "cvs", "--data.source csv"),
    ("--data.source", "zzz", "--data.source synthetic"),  # nothing close: the first choice
])
def test_a_mistyped_choice_suggests_the_nearest(tmp_path, capsys, flag, typed, suggested):
    assert train(tmp_path, flag, typed) == 2
    assert f"(pass {suggested}, or another of them)" in one_line_error(capsys, "train")
    assert not (tmp_path / "runs").exists()


def test_a_shard_glob_reads_the_files_it_matches(tmp_path, capsys):
    from amorlip.data.types import DataError
    from amorlip.data.wds_shards import expand_shards

    assert main(["data", "wds", "--n", "30", "--shard-size", "10", "--out", str(tmp_path / "w")]) == 0
    shards = [str(tmp_path / "w" / f"shard-{i:05d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "w" / "shard-*.tar")) == shards
    assert expand_shards(str(tmp_path / "w" / "shard-0000[02].tar") + "::" + shards[1]) == [shards[0], shards[2], shards[1]]
    with pytest.raises(DataError, match=r"pattern '.*nope-\*\.tar' matches no files"):
        expand_shards(str(tmp_path / "w" / "nope-*.tar"))
