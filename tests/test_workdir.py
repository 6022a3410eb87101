"""The trusted side's access to a kernel's directory refuses links of every kind."""

from __future__ import annotations

import os

import pytest

from kernels import workdir


def test_scan_skips_links_and_special_files(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("bb")
    os.symlink("/etc/passwd", tmp_path / "link")
    os.symlink("/etc", tmp_path / "dirlink")
    os.mkfifo(tmp_path / "fifo")
    found = workdir.scan(str(tmp_path), limit=100)
    assert set(found) == {"a.txt", "sub/b.txt"}
    assert found["sub/b.txt"].size == 2


def test_scan_is_bounded(tmp_path) -> None:
    for i in range(50):
        (tmp_path / f"f{i}").write_text("x")
    assert len(workdir.scan(str(tmp_path), limit=10)) == 10


def test_read_refuses_links_through_any_component(tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(outside, work / "d")
    os.symlink(outside / "secret", work / "s")
    for rel in ("d/secret", "s", "../outside/secret"):
        with pytest.raises(workdir.UnsafeFile):
            workdir.read_file(str(work), rel, cap=100)


def test_read_refuses_fifo_without_hanging_and_caps_size(tmp_path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(workdir.UnsafeFile):
        workdir.read_file(str(tmp_path), "fifo", cap=100)
    (tmp_path / "big").write_bytes(b"x" * 101)
    with pytest.raises(workdir.FileTooLarge):
        workdir.read_file(str(tmp_path), "big", cap=100)
    assert workdir.read_file(str(tmp_path), "big", cap=101) == b"x" * 101


def test_write_refuses_symlink_and_hardlink_targets(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(victim, work / "soft")
    os.link(victim, work / "hard")
    for name in ("soft", "hard"):
        with pytest.raises(workdir.UnsafeFile):
            workdir.write_file(str(work), name, b"clobbered")
    assert victim.read_text() == "keep"
    state = workdir.write_file(str(work), "new.txt", b"fresh")
    assert state.size == 5 and (work / "new.txt").read_bytes() == b"fresh"
