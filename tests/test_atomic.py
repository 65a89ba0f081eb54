"""Atomic writes leave the old artifact or the new one, never debris."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_refusal.atomic import AtomicFolder, atomic_write_text


def test_atomic_write_text_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_atomic_folder_abort_keeps_the_old_folder(tmp_path: Path) -> None:
    target = tmp_path / "artifact"
    with AtomicFolder(target) as out:
        (out.tmp / "x").write_text("old")
        out.commit()
    with pytest.raises(KeyboardInterrupt), AtomicFolder(target) as out:
        (out.tmp / "x").write_text("half")
        raise KeyboardInterrupt
    assert (target / "x").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_atomic_folder_commit_replaces(tmp_path: Path) -> None:
    target = tmp_path / "artifact"
    for text in ("old", "new"):
        with AtomicFolder(target) as out:
            (out.tmp / "x").write_text(text)
            out.commit()
    assert (target / "x").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]
