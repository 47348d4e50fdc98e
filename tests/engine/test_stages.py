from pathlib import Path

import pytest

from fgdistill.engine.config import DistillConfig, ModelConfig, TrainConfig, config_to_dict
from fgdistill.engine.stages import (
    SynthSettings,
    atomic_write_text,
    cpu_name,
    fingerprint,
    inherit_revision,
    machine_line,
    prepare_data,
    read_stage,
    stage_fingerprint,
)

SMALL = SynthSettings(num_train=2, num_val=1, image_size=64, difficulty=0.0, seed=0)


def test_data_is_written_whole_or_reused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # A half-written folder from an interrupted run: no stage.json, a stray file.
    (data / "train").mkdir(parents=True)
    (data / "train" / "000000.png").write_bytes(b"partial")
    said: list[str] = []
    fp, _, reused = prepare_data(data, SMALL, progress=False, say=said.append)
    assert not reused and said[-1].startswith("data: generating 2 + 1")
    assert read_stage(data)["fingerprint"] == fp and read_stage(data)["complete"]
    assert (data / "annotations" / "instances_val.json").is_file()
    assert len(list((data / "train").glob("*.png"))) == 2
    # Nothing is left beside it: it was written in a temporary folder and renamed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]

    fp2, _, reused = prepare_data(data, SMALL, progress=False, say=said.append)
    assert reused and fp2 == fp and said[-1] == f"data: reusing {data}"

    other = SynthSettings(num_train=3, num_val=1, image_size=64, difficulty=0.0, seed=0)
    fp3, _, reused = prepare_data(data, other, progress=False, say=said.append)
    assert not reused and fp3 != fp
    assert len(list((data / "train").glob("*.png"))) == 3


def test_the_machine_line_names_the_cpu_and_its_kernels(tmp_path: Path) -> None:
    # Training repeats on one kind of CPU only, so the results file must say which one it was.
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Example CPU 9000\n")
    assert cpu_name(info) == "Example CPU 9000"
    assert cpu_name(tmp_path / "missing") != ""
    line = machine_line()
    assert "torch CPU kernels " in line and "CPU(s), torch threads " in line


def test_an_inheriting_stage_is_fingerprinted_with_its_rules_revision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fgdistill.models import distiller

    def cfg(arch: str, inherit: bool = True) -> TrainConfig:
        distill = DistillConfig(teacher_checkpoint="t.pt", inherit_teacher=inherit)
        return TrainConfig(model=ModelConfig(arch=arch), distill=distill)

    def unrevised(c: TrainConfig) -> str:  # what every version before revisions computed
        plain = config_to_dict(c)
        plain.pop("work_dir")
        plain["data"].pop("root")
        plain["distill"].pop("teacher_checkpoint")
        return fingerprint(plain, ["up"])

    assert inherit_revision(cfg("reppoints")) == 2 and inherit_revision(cfg("retinanet")) == 1
    assert inherit_revision(cfg("reppoints", inherit=False)) == 0
    # unchanged rules keep their fingerprints; RepPoints' revised one does not
    assert stage_fingerprint(cfg("retinanet"), ["up"]) == unrevised(cfg("retinanet"))
    assert stage_fingerprint(cfg("reppoints", False), ["up"]) == unrevised(cfg("reppoints", False))
    before = stage_fingerprint(cfg("reppoints"), ["up"])
    assert before != unrevised(cfg("reppoints"))
    monkeypatch.setattr(distiller, "INHERIT_REVISION", {"reppoints": 3})
    assert stage_fingerprint(cfg("reppoints"), ["up"]) != before


def test_a_resumed_stage_counts_the_trainers_clock(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fgdistill.engine.stages import mmss, run_stage, write_stage

    cfg = TrainConfig(model=ModelConfig(arch="retinanet"))
    cfg.work_dir = str(tmp_path / "stage")
    fp = stage_fingerprint(cfg, ["up"])
    # an earlier attempt, stopped after its checkpoint: 3600 s of training before this one
    folder = Path(cfg.work_dir)
    folder.mkdir()
    (folder / "last.pt").write_bytes(b"x")
    write_stage(folder, {"fingerprint": fp, "complete": False, "wall_time_s": 0.0})
    calls: list[bool] = []

    def fake_train(c: TrainConfig, *, resume: bool, progress: bool) -> SimpleNamespace:
        calls.append(resume)
        return SimpleNamespace(metrics={"bbox": {"AP": 1.0}}, iterations=5, wall_time=3600.0)

    result, _ = run_stage(
        cfg, upstream=["up"], train_fn=fake_train, progress=False, say=lambda s: None, label="t"
    )
    assert calls == [True]
    assert result is not None and result.wall_time_s == pytest.approx(3600.0)
    assert read_stage(folder)["wall_time_s"] == pytest.approx(3600.0)
    assert mmss(float("nan")) == "n/a" and mmss(61.4) == "1m01s"


def test_atomic_writes_leave_a_readable_file_or_the_old_one(tmp_path: Path) -> None:
    import os
    import stat

    target = tmp_path / "r.md"
    atomic_write_text(target, "x\n")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]

    def fail(src: str, dst: Path) -> None:
        raise OSError("disk full")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", fail)
        with pytest.raises(OSError, match="disk full"):
            atomic_write_text(target, "y\n")
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]  # no temporary file left
    assert target.read_text() == "x\n"
