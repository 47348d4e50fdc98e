"""Reading checkpoints: weights-only loads, errors naming the file, the spec beside a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fgdistill.errors import CheckpointError
from fgdistill.models.checkpoint import (
    find_model_spec,
    load_checkpoint,
    save_model_spec,
    state_dict_of,
)


def test_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    torch.save({"w": torch.ones(3)}, corrupt)
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"corrupt\.pt: cannot read checkpoint"):
        load_checkpoint(corrupt)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pt"):
        load_checkpoint(garbage)


class _NotATensor:
    pass


def test_state_dict_of_takes_the_model_entry_and_checks_it(tmp_path: Path) -> None:
    state = {"w": torch.ones(2)}
    assert state_dict_of({"model": state, "iter": 3}).keys() == {"w"}
    assert state_dict_of({"state_dict": state}).keys() == {"w"}
    assert state_dict_of(state).keys() == {"w"}
    with pytest.raises(CheckpointError, match=r"x\.pt: holds no state dict"):
        state_dict_of({}, source="x.pt")
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": _NotATensor()}, pickled)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(pickled)
    notdict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(notdict)
    with pytest.raises(CheckpointError, match="not named tensors"):
        state_dict_of({"model": {"w": 1}})


def test_the_spec_is_found_inside_then_beside(tmp_path: Path) -> None:
    weights = tmp_path / "model.pt"
    with pytest.raises(CheckpointError, match="cannot tell which detector"):
        find_model_spec(weights, {})
    assert find_model_spec(weights, {"model_spec": {"arch": "fcos"}}) == {"arch": "fcos"}
    (tmp_path / "config.yaml").write_text(
        "model: {arch: fcos, num_classes: 3, anchor_sizes: null, extra: {score_thresh: 0.1}}\n"
    )
    assert find_model_spec(weights, {}) == {"arch": "fcos", "num_classes": 3, "score_thresh": 0.1}
    save_model_spec({"arch": "retinanet", "anchor_sizes": (8, 16)}, tmp_path / "model.yaml")
    assert find_model_spec(weights) == {"arch": "retinanet", "anchor_sizes": [8, 16]}


class _RunsCode:
    def __reduce__(self) -> tuple:
        import os

        return (os.getcwd, ())


def test_an_unsafe_checkpoint_is_refused_without_advice_to_load_it_unsafely(
    tmp_path: Path,
) -> None:
    for name, obj in (
        ("code.pt", {"x": _RunsCode()}),
        ("module.pt", {"net": torch.nn.Linear(1, 1)}),
    ):
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert message.startswith(f"{path}: cannot read checkpoint")
        assert "weights_only" not in message and "safe_globals" not in message, message
        assert "trust" not in message and "\x1b" not in message
        assert "GLOBAL" in message  # the reason stays
