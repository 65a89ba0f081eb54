"""Jobs own their output folder for the whole run: a second job on it fails at once, nothing is replaced."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sae_refusal.atomic import AtomicFolder, FolderClaim, _claim_path, _host_tag
from sae_refusal.cli import main
from sae_refusal.errors import FolderClaimedError, UserError


def test_a_second_claim_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "job"
    holder = rf"out_dir: .*job is being written by process {os.getpid()}"
    with FolderClaim(out):
        with pytest.raises(FolderClaimedError, match=holder), FolderClaim(out):
            pass
        assert not out.exists()  # the claim lives beside the folder, not in it
    assert list(tmp_path.iterdir()) == []  # released: no debris, not even the parent it made
    with FolderClaim(out):  # and free again
        pass


def test_an_existing_folder_is_refused_and_the_claim_released(tmp_path: Path) -> None:
    out = tmp_path / "job"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    exists = r"--out: .*job exists; choose"
    with pytest.raises(FolderClaimedError, match=exists), FolderClaim(out, key="--out"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]
    assert (out / "metrics.json").read_text() == "{}"


def _dead_pid() -> int:
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=int)
    child.start()
    child.join()
    assert child.pid is not None
    return child.pid


def test_the_claim_of_a_killed_job_on_this_host_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "job"
    claim = _claim_path(out)
    claim.mkdir()
    owner = {"host_tag": _host_tag(), "pid": _dead_pid(), "host": "here", "started": "then", "command": "x"}
    (claim / "owner.json").write_text(json.dumps(owner))
    with FolderClaim(out):
        assert json.loads((claim / "owner.json").read_text())["pid"] == os.getpid()
    assert not claim.exists()


def test_a_claim_held_on_another_host_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "job"
    claim = _claim_path(out)
    claim.mkdir()
    owner = {"host_tag": "0" * 8, "pid": _dead_pid(), "host": "elsewhere", "started": "then", "command": "y"}
    (claim / "owner.json").write_text(json.dumps(owner))
    with pytest.raises(FolderClaimedError, match="on elsewhere since then"), FolderClaim(out):
        pass
    assert (claim / "owner.json").is_file()


def test_a_non_replacing_commit_keeps_both_results(tmp_path: Path) -> None:
    out = tmp_path / "job"
    with AtomicFolder(out, replace=False) as atomic:
        (atomic.tmp / "mine.txt").write_text("new")
        out.mkdir()  # a writer that took no claim
        (out / "theirs.txt").write_text("old")
        kept_message = r"appeared while this job ran .* results are in .*job\.kept-"
        with pytest.raises(FolderClaimedError, match=kept_message):
            atomic.commit()
    assert (out / "theirs.txt").read_text() == "old"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("job.kept-")]
    assert len(kept) == 1 and (kept[0] / "mine.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["job", kept[0].name])


def test_a_folder_under_a_file_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "sub"
    message = r"--out: .*afile/sub cannot be created: .*afile is a file"
    with pytest.raises(UserError, match=message), FolderClaim(target, key="--out"):
        pass
    with pytest.raises(UserError, match=r"out_dir: .* is a file"), AtomicFolder(target):
        pass


#: (module, public entry, private body): each job claims its out_dir before its body runs.
JOBS = [
    ("sae_refusal.steer.job", "run_steer_job", "_run_steer_job"),
    ("sae_refusal.eval.job", "run_eval_job", "_run_eval_job"),
    ("sae_refusal.transfer.job", "run_transfer_job", "_run_transfer_job"),
]


@pytest.mark.parametrize(("module", "entry", "body"), JOBS, ids=[j[1] for j in JOBS])
def test_two_jobs_on_one_out_dir_the_second_fails_at_once(
    module: str, entry: str, body: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Job 1 is mid-run (its body blocks) when job 2 starts on the same out_dir: job 2 fails at once, job
    1's commit lands, and a job 3 after it is refused because the folder exists."""
    mod = importlib.import_module(module)
    running, finish = threading.Event(), threading.Event()

    def fake_body(cfg: Any, **_: Any) -> dict[str, Any]:
        running.set()
        assert finish.wait(30)
        with AtomicFolder(cfg.out_dir, replace=False) as atomic:
            (atomic.tmp / "metrics.json").write_text('{"job": 1}')
            atomic.commit()
        return {"job": 1}

    monkeypatch.setattr(mod, body, fake_body)
    cfg = SimpleNamespace(out_dir=str(tmp_path / "out"))
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(getattr(mod, entry)(cfg)))
    first.start()
    try:
        assert running.wait(30)
        with pytest.raises(FolderClaimedError, match=r"out_dir: .*out is being written by process"):
            getattr(mod, entry)(cfg)
    finally:
        finish.set()
        first.join(30)
    assert results == [{"job": 1}]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == {"job": 1}
    with pytest.raises(FolderClaimedError, match="out exists; choose another folder"):
        getattr(mod, entry)(cfg)


def test_features_and_export_refuse_an_existing_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both fail on --out before reading anything else (the --sae_dir given does not even exist)."""
    out = tmp_path / "done"
    out.mkdir()
    (out / "plots").mkdir()
    config = tmp_path / "fit.yaml"
    config.write_text("data: {layer: 2}\n")  # never read further: --out is checked first
    for args in (
        ["features", "--config", str(config), "--sae_dir", str(tmp_path / "nope"), "--out", str(out)],
        ["export", "--sae_dir", str(tmp_path / "nope"), "--format", "sparsify", "--out", str(out)],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"sae-refusal: error: --out: {out} exists; choose another folder"), err
    assert sorted(p.name for p in out.iterdir()) == ["plots"]


def test_features_from_a_hub_id_needs_an_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A hub id has no local run folder to write beside (Path('hf://o/r').parent would make 'hf:/o')."""
    config = tmp_path / "fit.yaml"
    config.write_text("data: {layer: 2}\n")  # never read further: --out is checked first
    for spec in ("hf://owner/repo/layers.2", "owner/repo/layers.2"):
        with pytest.raises(SystemExit):
            main(["features", "--config", str(config), "--sae_dir", spec])
        err = capsys.readouterr().err
        assert err.startswith(f"sae-refusal: error: --out: give an output folder; --sae_dir {spec} is a hub")
    assert [p.name for p in tmp_path.iterdir()] == ["fit.yaml"]
