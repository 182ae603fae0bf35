"""`d3codec.format.atomic`: a write appears whole or not at all; a failure leaves the old target
and no temporary file behind."""
from __future__ import annotations

import os
import stat

import pytest

from d3codec.format import atomic
from d3codec.format.atomic import TempFileError, atomic_file, atomic_folder, atomic_path, write_atomic
from d3codec.format.errors import FileAccessError


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_write_atomic_writes_bytes_or_parts_with_plain_permissions(tmp_path) -> None:
    target = tmp_path / "a.bin"
    assert write_atomic(target, b"hello") == 5 and target.read_bytes() == b"hello"
    assert write_atomic(target, [b"new ", b"parts"]) == 9 and target.read_bytes() == b"new parts"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert _listing(tmp_path) == ["a.bin"]


def test_content_is_fsynced_before_the_rename(tmp_path, monkeypatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    write_atomic(tmp_path / "a.bin", b"x")
    assert "fsync" in calls and calls[-1] == "replace" and calls.index("fsync") < calls.index("replace")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, OSError])
def test_a_failing_writer_leaves_the_old_target_and_no_temp_file(tmp_path, error) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(error):
        with atomic_file(target) as f:
            f.write(b"half of the new")
            raise error("disk full")
    assert target.read_bytes() == b"old" and _listing(tmp_path) == ["a.bin"]
    with pytest.raises(error):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise error("killed")
    assert target.read_bytes() == b"old" and _listing(tmp_path) == ["a.bin"]


def test_a_failing_rename_leaves_the_old_target_and_no_temp_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(PermissionError):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and _listing(tmp_path) == ["a.bin"]


def test_save_reports_a_failed_write_and_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    from d3codec.format.io import save
    from d3codec.format.testing import random_d3

    target = tmp_path / "x.d3"
    target.write_bytes(b"old file")
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(FileAccessError, match="No space left on device; check free space"):
        save(random_d3(0), target)
    assert target.read_bytes() == b"old file" and _listing(tmp_path) == ["x.d3"]


def test_a_missing_folder_is_a_temp_file_error(tmp_path) -> None:
    with pytest.raises(TempFileError) as info:
        write_atomic(tmp_path / "missing" / "a.bin", b"x")
    assert isinstance(info.value, OSError) and info.value.strerror


def test_atomic_folder_renames_a_complete_folder_into_place(tmp_path) -> None:
    final = tmp_path / "entry"
    with atomic_folder(final) as stage:
        with open(os.path.join(stage, "data"), "wb") as f:
            f.write(b"rows")
        assert not final.exists()
    assert (final / "data").read_bytes() == b"rows" and _listing(tmp_path) == ["entry"]


def test_a_failing_folder_build_leaves_nothing(tmp_path) -> None:
    final = tmp_path / "entry"
    stage = str(tmp_path / ".entry.building")
    os.makedirs(stage)
    (tmp_path / ".entry.building" / "leftover").write_bytes(b"from a killed build")
    with pytest.raises(RuntimeError):
        with atomic_folder(final, stage=stage) as where:
            assert where == stage and os.listdir(where) == []  # a leftover stage starts empty
            open(os.path.join(where, "half"), "wb").close()
            raise RuntimeError("interrupted")
    assert _listing(tmp_path) == []


def test_a_concurrent_writers_complete_folder_is_kept_only_with_its_done_file(tmp_path) -> None:
    final = tmp_path / "entry"
    final.mkdir()
    (final / "meta.json").write_text("theirs")
    with atomic_folder(final, done_file="meta.json") as stage:
        with open(os.path.join(stage, "meta.json"), "w") as f:
            f.write("ours")
    assert (final / "meta.json").read_text() == "theirs" and _listing(tmp_path) == ["entry"]
    (final / "meta.json").unlink()
    (final / "other").write_text("incomplete")
    with pytest.raises(OSError):
        with atomic_folder(final, done_file="meta.json") as stage:
            open(os.path.join(stage, "meta.json"), "w").close()
    assert _listing(tmp_path) == ["entry"] and _listing(final) == ["other"]


def test_replace_swaps_a_full_folder_and_puts_it_back_when_the_rename_fails(tmp_path, monkeypatch) -> None:
    final = tmp_path / "export"
    final.mkdir()
    (final / "old").write_text("earlier")
    with atomic_folder(final, replace=True) as stage:
        open(os.path.join(stage, "new"), "w").close()
    assert _listing(final) == ["new"] and _listing(tmp_path) == ["export"]
    real_rename = os.rename

    def refuse_the_stage(src, dst):
        if os.path.basename(src).startswith(".export.tmp-"):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", refuse_the_stage)
    with pytest.raises(OSError, match="No space"):
        with atomic_folder(final, replace=True) as stage:
            open(os.path.join(stage, "newer"), "w").close()
    assert _listing(final) == ["new"] and _listing(tmp_path) == ["export"]
