"""A full disk and a read-only output folder, injected (we run as root and cannot mount): the run
stops with one clear line naming the file and the fix, leaves no DONE.json for the stage that
failed and no temp file, and the same command run again once the disk is fixed resumes and ends
with the results of an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import tempfile
from pathlib import Path

import fsspec.implementations.local as fsspec_local
import numpy as np
import pytest
from omegaconf import open_dict

import src.utils.io as io_mod
from src.train import train
from src.utils.io import DiskWriteError
from tests.conftest import TINY, compose_cfg

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration

ARGS = ["experiment=synth_cam", TINY]  # train_cam -> make_cams -> eval_cams, seconds


def _cfg(root: Path, data_dir: Path):
    cfg = compose_cfg(ARGS, root)
    with open_dict(cfg):
        cfg.paths.data_dir = str(data_dir)
    return cfg


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run, and the data folder every test shares (generation is
    deterministic)."""
    root = tmp_path_factory.mktemp("reference")
    data_dir = tmp_path_factory.mktemp("data")
    cfg = _cfg(root, data_dir)
    results = train(cfg)
    return Path(cfg.paths.run_dir), results, data_dir


def _without_seconds(results: dict) -> dict:
    return {
        r: {k: v for k, v in row.items() if k != "seconds"} for r, row in results["rounds"].items()
    }


def _assert_resumes_to_the_reference(cfg, reference) -> None:
    ref_dir, ref_results, _ = reference
    results = train(cfg)  # the same command, the fault gone
    assert _without_seconds(results) == _without_seconds(ref_results)
    run_dir = Path(cfg.paths.run_dir)
    cams = sorted((ref_dir / "round_0/make_cams/cams").glob("*.npz"))
    assert len(cams) == 24
    for ref_cam in cams:
        with np.load(ref_cam) as want, np.load(run_dir / ref_cam.relative_to(ref_dir)) as got:
            assert want.files == got.files
            for key in want.files:
                np.testing.assert_array_equal(got[key], want[key])
    assert not _temp_files(run_dir)


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _done(run_dir: Path, stage: str) -> Path:
    return run_dir / "round_0" / stage / "DONE.json"


class _FullFile:
    """A file on a full disk: half the bytes land, then the write fails as the kernel's does."""

    def __init__(self, f):
        self.f = f

    def write(self, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


class DiskFault:
    """Stands in for `tempfile` and `os` inside src.utils.io: the `nth` atomic write whose final
    path satisfies `where` fails with `code`: ENOSPC in the write (the temp file half written),
    EROFS/EACCES when the temp file is created (as on a read-only folder)."""

    def __init__(self, monkeypatch, code: int, where, nth: int = 1):
        self.code, self.where, self.nth = code, where, nth
        self.hits, self.failed, self._fds = 0, None, set()
        fault = self

        class _Os:
            def __getattr__(self, name):
                return getattr(os, name)

            def fdopen(self, fd, *args, **kwargs):
                f = os.fdopen(fd, *args, **kwargs)
                return _FullFile(f) if fd in fault._fds else f

        monkeypatch.setattr(io_mod, "os", _Os())
        monkeypatch.setattr(io_mod, "tempfile", self)

    def mkstemp(self, *, dir, prefix, suffix):
        final = Path(dir) / prefix[1:-1]  # atomic_write_bytes: prefix=f".{name}."
        fail = False
        if self.failed is None and self.where(final):
            self.hits += 1
            fail = self.hits == self.nth
        if fail and self.code != errno.ENOSPC:
            self.failed = final
            raise OSError(self.code, os.strerror(self.code), str(Path(dir) / f"{prefix}x{suffix}"))
        fd, tmp = tempfile.mkstemp(dir=dir, prefix=prefix, suffix=suffix)
        if fail:
            self.failed = final
            self._fds.add(fd)
        return fd, tmp


def test_full_disk_mid_stage_then_rerun_equals_an_uninterrupted_run(
    tmp_path, monkeypatch, reference
):
    cfg = _cfg(tmp_path, reference[2])
    run_dir = Path(cfg.paths.run_dir)
    with monkeypatch.context() as m:
        fault = DiskFault(m, errno.ENOSPC, lambda p: p.parent.name == "cams", nth=3)
        with pytest.raises(DiskWriteError) as info:
            train(cfg)
    message = str(info.value)
    assert fault.failed is not None and fault.failed.parent.parent.name == "make_cams"
    assert message.startswith(f"cannot write {fault.failed}: No space left on device.")
    assert "Fix: free disk space" in message and "paths.output_dir" in message
    assert "\n" not in message and info.value.errno == errno.ENOSPC
    assert _done(run_dir, "train_cam").is_file()
    assert not _done(run_dir, "make_cams").exists()
    assert not _temp_files(run_dir)
    assert len(list((run_dir / "round_0/make_cams/cams").glob("*.npz"))) == 2
    trained = _done(run_dir, "train_cam").stat().st_mtime_ns

    _assert_resumes_to_the_reference(cfg, reference)
    assert _done(run_dir, "train_cam").stat().st_mtime_ns == trained  # finished work kept


def test_read_only_stage_folder_then_rerun_equals_an_uninterrupted_run(
    tmp_path, monkeypatch, reference
):
    """The output disk turns read-only (remounted read-only after I/O errors) when make_cams
    has created its folder and writes its first file (RUNNING.json)."""
    code = errno.EROFS
    cfg = _cfg(tmp_path, reference[2])
    run_dir = Path(cfg.paths.run_dir)
    with monkeypatch.context() as m:
        fault = DiskFault(m, code, lambda p: "make_cams" in p.parts)
        with pytest.raises(DiskWriteError) as info:
            train(cfg)
    message = str(info.value)
    assert fault.failed is not None and fault.failed.parent == run_dir / "round_0/make_cams"
    assert f"cannot write {fault.failed}: {os.strerror(code)}." in message
    assert "Fix: point paths.output_dir" in message and "writable folder" in message
    assert not _done(run_dir, "make_cams").exists()
    assert not _temp_files(run_dir)
    _assert_resumes_to_the_reference(cfg, reference)


def test_read_only_output_folder_from_the_start(tmp_path, monkeypatch, reference):
    """Nothing under paths.output_dir can be created: the first folder the run makes fails
    (a plain mkdir, not src.utils.io), and src.train says which and what to do."""
    cfg = _cfg(tmp_path, reference[2])
    outputs = Path(cfg.paths.output_dir)
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == outputs or outputs in self.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "mkdir", mkdir)
        with pytest.raises(DiskWriteError) as info:
            train(cfg)
    message = str(info.value)
    assert message.startswith(f"cannot write {outputs}")
    assert "Permission denied" in message and "writable folder" in message
    assert not outputs.exists()
    _assert_resumes_to_the_reference(cfg, reference)


@pytest.mark.parametrize("where", ["write", "move"])
def test_full_disk_in_a_lightning_checkpoint_save(tmp_path, monkeypatch, reference, where):
    """Lightning saves last.ckpt through fsspec, not src.utils.io: torch.save to memory, the
    bytes to a temp file in the system temp folder, then shutil.move into checkpoints/.
    `write`: the temp folder's disk is full (the temp file is discarded, last.ckpt untouched).
    `move`: the temp folder is on another disk (tmpfs /tmp) and the output disk fills while
    shutil.move copies into place: a cut-short last.ckpt stays behind, which the rerun must not
    resume from."""
    cfg = _cfg(tmp_path, reference[2])
    run_dir = Path(cfg.paths.run_dir)
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def failing_write(self, data):
        self.f.write(data[: len(data) // 2])
        raise full

    class CrossDeviceShutil:
        def __getattr__(self, name):
            return getattr(fsspec_local.shutil, name)

        def move(self, src, dst):  # os.rename fails with EXDEV, so copy2 writes dst in place
            with open(src, "rb") as f, open(dst, "wb") as out:
                out.write(f.read()[: os.path.getsize(src) // 2])
            raise full

    with monkeypatch.context() as m:
        if where == "write":
            m.setattr(fsspec_local.LocalFileOpener, "write", failing_write)
        else:
            m.setattr(fsspec_local, "shutil", CrossDeviceShutil())
        with pytest.raises(DiskWriteError) as info:
            train(cfg)
    message = str(info.value)
    assert "No space left on device" in message and "Fix: free disk space" in message
    assert str(Path(cfg.paths.output_dir)) in message  # the write named no file: say where
    assert not _done(run_dir, "train_cam").exists()
    assert not _temp_files(run_dir)
    last = run_dir / "round_0/train_cam/checkpoints/last.ckpt"
    if where == "write":
        assert not last.exists() and not list(system_tmp.iterdir())
    else:
        assert last.stat().st_size > 0  # cut short; fsspec leaves its temp copy too
    _assert_resumes_to_the_reference(cfg, reference)
    assert json.loads(_done(run_dir, "train_cam").read_text())["stage"] == "train_cam"
