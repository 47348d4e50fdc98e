"""Every packaged config runs: trained two iterations and evaluated on a tiny COCO-format set.

Each training config under ``configs/`` is loaded as shipped and changed only where a CPU test
must: the data (a generated 64 px COCO-format set), the input size (64 px; a list of sizes stays
a list), two iterations, no download (ImageNet weight names are left out). Its architecture,
heads, FPN options, losses, optimizer and schedule are the config's own. A distillation config
gets a teacher trained the same way from the teacher config its ``teacher_checkpoint`` names.
The benchmark plans (``bench/``, ``demo/``) are checked by the plan loader.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fgdistill.cli.train_cmds import packaged_configs, resolve_config_path
from fgdistill.data.synth import generate_synthetic
from fgdistill.engine.config import load_config
from fgdistill.engine.runner import train

CONFIGS = packaged_configs()
TRAIN_CONFIGS = [
    n for n in CONFIGS if "model" in yaml.safe_load(resolve_config_path(n).read_text())
]
PLANS = [n for n in CONFIGS if n not in TRAIN_CONFIGS]
#: configs with a ResNeXt-101 64x4d: some seconds each even at 64 px
HEAVY = {n for n in TRAIN_CONFIGS if "x101" in n}


def _teacher_of(name: str) -> str | None:
    distill = yaml.safe_load(resolve_config_path(name).read_text()).get("distill")
    if not distill:
        return None
    return f"{name.split('/')[0]}/{Path(distill['teacher_checkpoint']).parent.name}"


#: configs that another config distils from: their ``model.pt`` is kept for the session
TEACHERS = {t for t in map(_teacher_of, TRAIN_CONFIGS) if t is not None}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny_coco")
    generate_synthetic(root, num_train=4, num_val=2, image_size=64, seed=0)
    return root


def _shrunk(model: dict[str, Any]) -> list[tuple[str, Any]]:
    size = model.get("min_size", 800)
    return [
        ("min_size", [48, 64] if isinstance(size, list) else 64),
        ("max_size", 64),
        ("fpn_channels", 64),
        ("weights", None),
        ("weights_backbone", None),
    ]


def _overrides(name: str, root: Path, work: Path) -> list[str]:
    raw = yaml.safe_load(resolve_config_path(name).read_text())
    sets = {
        "data.root": str(root),
        "data.train_ann": "annotations/instances_train.json",
        "data.train_images": "train",
        "data.val_ann": "annotations/instances_val.json",
        "data.val_images": "val",
        "data.batch_size": 2,
        "data.eval_batch_size": 2,
        "data.num_workers": 0,
        "max_iters": 2,
        "device": "cpu",
        "amp": False,
        "log_interval": 1,
        "work_dir": str(work),
    }
    for key, value in _shrunk(raw["model"]):
        sets[f"model.{key}"] = value
    if raw.get("distill"):
        for key, value in _shrunk(raw["distill"].get("teacher", {})):
            sets[f"distill.teacher.{key}"] = value
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in sets.items()]


_TRAINED: dict[str, Path] = {}


def _run(name: str, root: Path, tmp: Path) -> tuple[Any, float]:
    """Train ``name`` (and the teacher it names, once per session); the result and seconds."""
    overrides = _overrides(name, root, tmp / name.replace("/", "_"))
    cfg = load_config(resolve_config_path(name), overrides)
    if cfg.distill is not None:
        teacher_name = _teacher_of(name)
        assert teacher_name in TRAIN_CONFIGS, f"{name}: no config for its teacher {teacher_name}"
        if teacher_name not in _TRAINED:
            _TRAINED[teacher_name] = _run(teacher_name, root, tmp)[0].model_path
        cfg.distill.teacher_checkpoint = str(_TRAINED[teacher_name])
    torch.manual_seed(0)
    start = time.perf_counter()
    result = train(cfg, progress=False)
    seconds = time.perf_counter() - start
    assert result.model_path.is_file() and (result.model_path.parent / "model.yaml").is_file()
    _prune(result.model_path.parent, keep=name in TEACHERS)
    if name in TEACHERS:
        _TRAINED.setdefault(name, result.model_path)
    return result, seconds


def _prune(work_dir: Path, keep: bool) -> None:
    """Free the disk a full-size model's checkpoints take (some GB for all configs together).

    A teacher keeps its weights file and ``model.yaml`` for its students; everything else goes.
    """
    if not keep:
        shutil.rmtree(work_dir)
        return
    for path in work_dir.iterdir():
        if path.suffix != ".yaml" and path.name not in {"model.pt", "student.pt"}:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in TRAIN_CONFIGS],
)
def test_config_trains_and_evaluates(
    name: str, tiny_coco: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    result, seconds = _run(name, tiny_coco, tmp_path_factory.mktemp("cfg"))
    assert result.iterations == 2
    assert "AP" in result.metrics["bbox"]
    print(f"{name}: {seconds:.1f}s")


@pytest.mark.parametrize("name", PLANS)
def test_plan_loads(name: str) -> None:
    from fgdistill.bench.plan import load_plan

    load_plan(resolve_config_path(name))
