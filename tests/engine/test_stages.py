from pathlib import Path

from fgdistill.engine.stages import SynthSettings, prepare_data, read_stage

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
