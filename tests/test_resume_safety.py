"""Checkpoints a kill or a full disk leaves behind: resume passes over a broken one, a full disk is one line."""

import errno
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_config
from sdlora.rundir import read_events


def _config(dataset_dir, steps):
    # a checkpoint every step (the final save is one too); samples only at the start and the end, in 2 steps
    return small_config(dataset_dir, steps=steps, save_every=1, sample_every=1000, sample_steps=2)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, dataset_dir):
    """A finished 2-step run with checkpoints step-000001 and step-000002."""
    from sdlora.train import train

    run = tmp_path_factory.mktemp("resume") / "two"
    train(_config(dataset_dir, 2), run, progress_bar=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    return run


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _killed_while_writing(checkpoint):
    """What a kill in the middle of writing `checkpoint` leaves: its temporary folder, without the closing file."""
    (checkpoint / "sdlora.json").unlink()
    _truncate(checkpoint / "adapters.safetensors")
    checkpoint.rename(checkpoint.with_name(f".{checkpoint.name}.tmp"))


BREAK = {
    "adapters": (lambda c: _truncate(c / "adapters.safetensors"), "step-000002"),
    "optimizer": (lambda c: _truncate(c / "optimizer.bin"), "step-000002"),
    "no-sdlora.json": (lambda c: (c / "sdlora.json").unlink(), "step-000002"),
    "killed": (_killed_while_writing, ".step-000002.tmp"),
}


@pytest.mark.parametrize("broken", [b if b == "killed" else pytest.param(b, marks=pytest.mark.slow)
                                    for b in sorted(BREAK)])  # the quick tier keeps one case
def test_resume_passes_over_a_broken_newest_checkpoint(tmp_path, dataset_dir, two_steps, broken):
    from sdlora.train import train

    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    damage, shown = BREAK[broken]
    damage(run / "checkpoints" / "step-000002")
    train(_config(dataset_dir, 3), run, resume=True, progress_bar=False)
    events = read_events(run)[len(read_events(two_steps)):]
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert any(m.startswith(f"checkpoints/{shown} is incomplete or unreadable (") and
               m.endswith("; resuming from step-000001") for m in warnings), warnings
    assert next(e for e in events if e["type"] == "start")["start_step"] == 1
    assert [e["step"] for e in events if e["type"] == "done"] == [3]
    # the broken one is gone: replaced by the resumed run's own save, or removed as a leftover
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


@pytest.mark.slow
def test_with_no_usable_checkpoint_resume_starts_over_as_a_fresh_run_would(tmp_path, dataset_dir, two_steps):
    """Each checkpoint's optimizer state is intact and its adapters are not: nothing of either may reach the run."""
    from sdlora.lora import read_lora
    from sdlora.train import train

    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    for name in ("step-000001", "step-000002"):
        _truncate(run / "checkpoints" / name / "adapters.safetensors")
    train(_config(dataset_dir, 2), run, resume=True, progress_bar=False)
    events = read_events(run)[len(read_events(two_steps)):]
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert sum(m.endswith("; no usable checkpoint, starting from step 0") for m in warnings) == 2, warnings
    assert next(e for e in events if e["type"] == "start")["start_step"] == 0
    a, _ = read_lora(two_steps / "lora.safetensors")
    b, _ = read_lora(run / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("failing, then_resume", [("lora", False), pytest.param("checkpoint", False,
                                                                              marks=pytest.mark.slow),
                                                  pytest.param("checkpoint", True, marks=pytest.mark.slow)])
def test_a_full_disk_stops_with_one_line_and_resume_finishes(tmp_path, dataset_dir, monkeypatch, capsys, failing,
                                                             then_resume):
    import safetensors.torch

    from sdlora import lora
    from sdlora.cli import main
    from sdlora.lora import read_lora

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(_config(dataset_dir, 3).to_json())
    # the LoRA files go through sdlora.lora's save_file, a checkpoint's adapters through safetensors' own
    module = lora if failing == "lora" else safetensors.torch
    real, calls = module.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second save: some bytes land, then the disk is full
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(module, "save_file", save_file)
    assert main(["train", "--run-dir", str(run), "--quiet"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    folder = run if failing == "lora" else run / "checkpoints"
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"sdlora: error: the disk is full: could not write {folder} (needs about "), lines
    assert lines[0].endswith(f" MB free) (hint: free some space, then resume: sdlora train --run-dir {run} --resume)")
    error = read_events(run)[-1]
    assert error["type"] == "error" and error["message"].startswith("the disk is full")
    # what was saved before stays whole, and nothing half-written is left
    read_lora(run / "lora-step-000001.safetensors")
    load_file(run / "checkpoints" / "step-000001" / "adapters.safetensors")
    assert not [p for p in run.rglob("*") if ".tmp" in p.name], list(run.rglob("*"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]

    if not then_resume:
        return
    monkeypatch.undo()  # space freed
    assert main(["train", "--run-dir", str(run), "--resume", "--quiet"]) == 0
    events = read_events(run)
    assert [e["start_step"] for e in events if e["type"] == "start"] == [0, 1]
    assert events[-1]["type"] == "done" and events[-1]["step"] == 3
    read_lora(run / "lora.safetensors")
