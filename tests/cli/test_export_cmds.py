"""``fgdistill export`` from the command line (a tiny random RetinaNet, CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgdistill.cli.main import main
from fgdistill.models.build import build_detector, model_spec
from fgdistill.models.checkpoint import save_model_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``student.pt`` with ``model.yaml`` beside it: a RetinaNet whose classification bias is 0
    (instead of a prior of 0.01), so that it detects things at the default threshold."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build_detector(
        "retinanet", backbone="resnet18", num_classes=3, fpn_channels=32, min_size=64, max_size=96
    )
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.zero_()  # type: ignore[union-attr]
    torch.save(model.state_dict(), folder / "student.pt")
    save_model_spec(model_spec(model) or {}, folder / "model.yaml")
    return folder / "student.pt"


@pytest.mark.slow
def test_onnx_export_is_checked_at_two_sizes(
    student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "student.onnx"
    assert (
        main(["export", "--checkpoint", str(student), "--format", "onnx", "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert out.is_file()
    assert f"wrote {out} (ONNX opset 17" in text and "(H, W dynamic)" in text
    assert "outputs boxes, scores, labels" in text
    checks = [line for line in text.splitlines() if line.startswith("check on")]
    assert len(checks) == 2, text
    assert "(64x86)" in checks[0] and "(86x64)" in checks[1]
    assert all("top 10: 10 match" in line for line in checks), text


@pytest.mark.slow
def test_torchscript_export_checked_on_an_image_file(
    student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    picture = tmp_path / "street.png"
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(picture)
    out = tmp_path / "student.torchscript"
    args = ["export", "--checkpoint", str(student), "--format", "torchscript", "--out", str(out)]
    assert main([*args, "--verify-image", str(picture), "--score-thresh", "0.2"]) == 0
    text = capsys.readouterr().out
    assert "TorchScript" in text and "float32" in text
    assert f"check on {picture} (50x70): model" in text and "top 10: 10 match" in text
    scripted = torch.jit.load(str(out))
    detections = scripted([torch.rand(3, 40, 60)])
    assert isinstance(detections, list) and set(detections[0]) == {"boxes", "scores", "labels"}
    assert (detections[0]["scores"] > 0.2).all()


def test_no_verify_writes_without_checking(
    student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.pt"
    args = ["export", "--checkpoint", str(student), "--format", "torchscript", "--out", str(out)]
    assert main([*args, "--no-verify"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "wrote" in text and "check on" not in text


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_missing_checkpoint_and_model_yaml_are_named(
    student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pt"
    args = ["export", "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--checkpoint"]
    assert str(missing) in _error([*args, str(missing)], capsys)
    lonely = tmp_path / "lonely" / "student.pt"
    lonely.parent.mkdir()
    lonely.write_bytes(student.read_bytes())
    err = _error([*args, str(lonely)], capsys)
    assert str(lonely) in err and "model.yaml" in err


def test_bad_requests_are_one_line_errors(
    student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["export", "--checkpoint", str(student)]
    err = _error([*base, "--format", "onnx", "--out", str(tmp_path)], capsys)
    assert f"{tmp_path} is a folder" in err
    err = _error([*base, "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--half"], capsys)
    assert "not supported for ONNX" in err
    ts = [*base, "--format", "torchscript", "--out", str(tmp_path / "m.pt")]
    assert "--opset applies to ONNX only" in _error([*ts, "--opset", "18"], capsys)
    if not torch.cuda.is_available():
        assert "needs a CUDA device" in _error([*ts, "--half"], capsys)
    with pytest.raises(SystemExit) as exc:
        main([*base, "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert exc.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_missing_onnx_packages_are_named(
    student: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = ["export", "--checkpoint", str(student), "--format", "onnx"]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    err = _error([*args, "--out", str(tmp_path / "m.onnx")], capsys)
    assert "needs the onnxruntime package" in err and "pip install 'fgdistill[export]'" in err
    monkeypatch.setitem(sys.modules, "onnx", None)
    err = _error([*args, "--out", str(tmp_path / "m.onnx"), "--no-verify"], capsys)
    assert "ONNX export needs the onnx package" in err
