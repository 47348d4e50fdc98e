"""Typed training configuration: dataclasses, YAML loading, ``--set`` overrides, validation.

A config is plain YAML data (read with :func:`yaml.safe_load`, never executed). It is turned into
a :class:`TrainConfig` tree of dataclasses by :func:`config_from_dict`, which checks every key and
every value's type:

* an unknown key raises :class:`~fgdistill.errors.ConfigError` naming the key and the closest
  valid one (``optim.lrr: unknown key; did you mean 'lr'?``);
* a value of the wrong type raises :class:`~fgdistill.errors.ConfigError` naming the dotted key
  and the expected type.

Overrides (``--set optim.lr=0.02``) are applied to the raw mapping before validation; the value
right of ``=`` is parsed with :func:`yaml.safe_load`, so ``--set data.masks=true`` gives a bool
and ``--set optim.milestones=[8,11]`` a list.

Relative data paths (annotation files, image folders) are resolved against ``data.root``, so on a
machine with COCO, pointing ``data.root`` at it is all a user changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from fgdistill.errors import ConfigError
from fgdistill.io import atomic_write_text

__all__ = [
    "DataConfig",
    "DistillConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "detector_kwargs",
    "dump_config",
    "from_mapping",
    "load_config",
    "parse_override",
]


@dataclass
class ModelConfig:
    """How to build one detector with :func:`fgdistill.models.build_detector`.

    ``num_classes`` counts the background, torchvision style (``K + 1``); when it is ``None`` it
    is taken from the training dataset's categories. ``trainable_layers`` and ``frozen_bn``
    default (``None``) to build_detector's choice: everything trainable with adapting BatchNorm
    from scratch, torchvision's settings with pretrained weights. ``anchor_sizes`` gives one base
    anchor size per level (five values). ``weights`` and ``weights_backbone`` are
    torchvision weight names (e.g. ``"ResNet50_Weights.IMAGENET1K_V1"``) or ``None`` for random
    initialisation; nothing is downloaded unless a name is given; they may also be files:
    ``weights`` a checkpoint of ours or torchvision's (layers of another shape, such as the class
    head, are skipped and named), ``weights_backbone`` an ImageNet file (``resnet50-*.pth``).
    ``min_size`` may be a list: multi-scale training, one size drawn per image from the list
    (torchvision's transform), the last one in evaluation. ``extra`` passes further keyword
    arguments to ``build_detector`` unchanged (``p6_from: c5``, ``fpn_norm``, ...).
    """

    arch: str = "retinanet"
    backbone: str = "resnet50"
    num_classes: int | None = None
    fpn_channels: int = 256
    min_size: int | list[int] = 800
    max_size: int = 1333
    weights: str | None = None
    weights_backbone: str | None = None
    trainable_layers: int | None = None
    frozen_bn: bool | None = None
    head_norm: str | None = None
    anchor_sizes: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def detector_kwargs(model_cfg: ModelConfig, num_classes: int | None = None) -> dict[str, Any]:
    """``build_detector`` keyword arguments (``arch`` included) of a :class:`ModelConfig`.

    ``num_classes`` (background included) is used when the config leaves it ``None``.
    """
    kwargs: dict[str, Any] = {
        "arch": model_cfg.arch,
        "backbone": model_cfg.backbone,
        "num_classes": model_cfg.num_classes or num_classes,
        "fpn_channels": model_cfg.fpn_channels,
        "min_size": model_cfg.min_size,
        "max_size": model_cfg.max_size,
        "weights": model_cfg.weights,
        "weights_backbone": model_cfg.weights_backbone,
        "trainable_layers": model_cfg.trainable_layers,
        "frozen_bn": model_cfg.frozen_bn,
        "head_norm": model_cfg.head_norm,
    }
    if model_cfg.anchor_sizes is not None:
        kwargs["anchor_sizes"] = list(model_cfg.anchor_sizes)
    kwargs.update(model_cfg.extra)
    return kwargs


@dataclass
class DataConfig:
    """Dataset locations and loader settings.

    ``train_ann``, ``train_images``, ``val_ann`` and ``val_images`` are resolved against ``root``
    when relative (see :meth:`path`). ``batch_size`` is per process (per GPU).
    """

    root: str = "data/coco"
    train_ann: str = "annotations/instances_train2017.json"
    train_images: str = "train2017"
    val_ann: str = "annotations/instances_val2017.json"
    val_images: str = "val2017"
    masks: bool = False
    batch_size: int = 2
    eval_batch_size: int = 2
    num_workers: int = 2
    filter_empty: bool | None = None
    flip_prob: float = 0.5

    def path(self, name: str) -> Path:
        """Return the data path ``name`` (e.g. ``"train_ann"``) resolved against ``root``."""
        value = Path(getattr(self, name)).expanduser()
        if value.is_absolute():
            return value
        return Path(self.root).expanduser() / value


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule, as in the released FGD configs.

    ``lr`` is the learning rate for ``base_batch_size`` images per step; the rate used is
    ``lr * batch_size * world_size / base_batch_size`` (linear scaling) unless ``scale_lr`` is
    false. The schedule is a linear warm-up over ``warmup_iters`` iterations from
    ``warmup_factor * lr``, then a step decay by ``gamma`` at each epoch in ``milestones``.
    ``grad_clip`` is the maximum L2 norm of all gradients (``None`` disables clipping).
    ``warmup: constant`` holds ``warmup_factor * lr`` during the warm-up instead (mmdetection's
    FCOS). ``bias_lr_mult`` and ``bias_decay_mult`` multiply the learning rate and the weight
    decay of the biases of every layer but the norm layers (mmdetection's ``paramwise_cfg``;
    the released FCOS: 2 and 0).
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    base_batch_size: int = 16
    scale_lr: bool = True
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    warmup: str = "linear"
    bias_lr_mult: float = 1.0
    bias_decay_mult: float = 1.0
    epochs: int = 24
    milestones: list[int] = field(default_factory=lambda: [16, 22])
    gamma: float = 0.1
    grad_clip: float | None = 35.0


@dataclass
class DistillConfig:
    """Distillation from a trained teacher: FGD, or another method on the same footing.

    ``method`` is ``fgd`` (the default), ``mse`` (plain feature imitation), ``pkd``, ``cwd`` or
    ``mgd``. ``preset`` names a detector family whose settings for that method are taken
    (:func:`fgdistill.models.presets.preset`; ``None``: the student's architecture).
    ``hparams`` overrides the preset's hyperparameters for every level (FGD and mse:
    ``temperature``, ``alpha``, ``beta``, ``gamma``, ``lambda_``; PKD: ``loss_weight``,
    ``resize_student``; CWD: ``tau``, ``loss_weight``; MGD: ``alpha_mgd``, ``lambda_mgd``);
    ``level_hparams`` overrides them for single levels (``{"p3": {"alpha": 2e-3}}``). ``levels``
    defaults to the preset's. ``fgd_weight_scale`` multiplies every distillation term (1.0
    keeps the published weights); ``fgd_warmup_iters`` ramps that multiplier linearly from 0
    over the first iterations. ``split_regions: false`` distils every pixel as one region
    weighted by ``beta`` (FGD only: an ablation of the paper's Table 1). ``normalize:
    teacher_rms`` divides each level's maps by the root mean square of the teacher's map before
    the loss, so the terms do not grow with the teacher's feature scale (``none``: the released
    code). ``inherit_teacher`` copies the teacher's neck and head into the student, whatever the
    method.
    """

    teacher: ModelConfig = field(default_factory=ModelConfig)
    teacher_checkpoint: str = ""
    levels: list[str] | None = None
    preset: str | None = None
    hparams: dict[str, float] = field(default_factory=dict)
    level_hparams: dict[str, dict[str, float]] = field(default_factory=dict)
    inherit_teacher: bool = False
    method: str = "fgd"
    fgd_weight_scale: float = 1.0
    fgd_warmup_iters: int = 0
    split_regions: bool = True
    normalize: str = "none"


@dataclass
class TrainConfig:
    """A whole run: model, data, optimizer, optional distillation, and run settings.

    ``eval_interval`` and ``checkpoint_interval`` count epochs (0 disables periodic evaluation;
    the run is always evaluated and checkpointed at its end). ``checkpoint_iters`` additionally
    writes ``last.pt`` every that many iterations (0: off). ``max_iters`` stops a run early (for
    quick runs and tests) without changing the schedule. ``amp`` enables mixed precision on CUDA
    only. ``device`` is ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    eval_interval: int = 1
    checkpoint_interval: int = 1
    checkpoint_iters: int = 0
    log_interval: int = 20
    max_iters: int | None = None
    work_dir: str = "work_dirs/run"
    name: str = ""


_CHOICES: dict[tuple[type, str], tuple[str, ...]] = {
    (OptimConfig, "optimizer"): ("sgd", "adamw"),
    (OptimConfig, "warmup"): ("linear", "constant"),
    (DistillConfig, "method"): ("fgd", "mse", "pkd", "cwd", "mgd"),
    (DistillConfig, "normalize"): ("none", "teacher_rms"),
    (TrainConfig, "device"): ("auto", "cpu", "cuda"),
}

_POSITIVE: dict[type, tuple[str, ...]] = {
    ModelConfig: ("fpn_channels", "min_size", "max_size"),
    DataConfig: ("batch_size", "eval_batch_size"),
    OptimConfig: ("lr", "base_batch_size", "epochs", "gamma", "grad_clip"),
    TrainConfig: ("log_interval", "max_iters"),
}

_NON_NEGATIVE: dict[type, tuple[str, ...]] = {
    DataConfig: ("num_workers",),
    OptimConfig: (
        "momentum",
        "weight_decay",
        "warmup_iters",
        "warmup_factor",
        "bias_lr_mult",
        "bias_decay_mult",
    ),
    DistillConfig: ("fgd_weight_scale", "fgd_warmup_iters"),
    TrainConfig: ("eval_interval", "checkpoint_interval", "checkpoint_iters"),
}

#: fields that are fractions, 0 to 1 inclusive
_FRACTION: dict[type, tuple[str, ...]] = {DataConfig: ("flip_prob",), OptimConfig: ("momentum",)}


def _type_name(tp: Any) -> str:
    """A readable name for a type annotation (``int``, ``list[int] or null``)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        suffix = " or null" if type(None) in args else ""
        return " or ".join(names) + suffix
    if origin is list:
        (arg,) = typing.get_args(tp)
        return f"list[{_type_name(arg)}]"
    if origin is dict:
        _key, value = typing.get_args(tp)
        return f"mapping of str to {_type_name(value)}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (nested dataclasses, floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got null")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                # Nested dataclass errors are more useful than a generic message.
                if dataclasses.is_dataclass(arg) and isinstance(value, Mapping):
                    raise exc
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        return from_mapping(typing.cast(type, tp), value, key)
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
        return [_convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _k, arg = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key}: keys must be strings, got {k!r}")
            out[k] = _convert(v, arg, f"{key}.{k}")
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
        elif isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as a number.
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            return _finite_float(number, key)
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")


#: the largest magnitude a float setting may have: training computes in float32
FLOAT32_MAX = 3.4028234663852886e38


def _finite_float(value: float, key: str) -> float:
    """``value`` if finite and within float32's range; else ConfigError naming ``key``."""
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    if abs(value) > FLOAT32_MAX:
        raise ConfigError(
            f"{key}: {value!r} is beyond the float32 range training computes in "
            f"(at most {FLOAT32_MAX:.4g})"
        )
    return value


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def from_mapping(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Validate ``data`` into dataclass ``cls`` (nested dataclasses included).

    ``prefix`` is the dotted path of ``data`` in the whole config, used in messages.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{dotted}: unknown key{hint}")
        kwargs[key] = _convert(value, hints[key], dotted)
    obj = cls(**kwargs)
    checks: list[tuple[dict[type, tuple[str, ...]], Callable[[float], bool], str]] = [
        (_POSITIVE, lambda v: v > 0, "must be positive"),
        (_NON_NEGATIVE, lambda v: v >= 0, "must be >= 0"),
        (_FRACTION, lambda v: 0 <= v <= 1, "must be between 0 and 1"),
    ]
    for table, ok, rule in checks:
        for name in table.get(cls, ()):
            value = getattr(obj, name)
            values = value if isinstance(value, list) else [value]  # min_size: one or a list
            if value == [] or any(v is not None and not ok(v) for v in values):
                dotted = f"{prefix}.{name}" if prefix else name
                raise ConfigError(f"{dotted}: {rule}, got {value!r}")
    for (owner, name), choices in _CHOICES.items():
        if owner is cls and getattr(obj, name) not in choices:
            dotted = f"{prefix}.{name}" if prefix else name
            raise ConfigError(
                f"{dotted}: expected one of {', '.join(choices)}, got {getattr(obj, name)!r}"
            )
    return obj


def config_from_dict(data: Mapping[str, Any] | None) -> TrainConfig:
    """Validate a raw mapping (as read from YAML) into a :class:`TrainConfig`.

    Raises:
        ConfigError: for an unknown key (naming the closest valid key) or a value of the wrong
            type (naming the dotted key and the expected type).
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping at the top level, got {_describe(data)}")
    cfg = typing.cast(TrainConfig, from_mapping(TrainConfig, data, ""))
    _check_relations(cfg)
    return cfg


def _check_relations(cfg: TrainConfig) -> None:
    """Checks between fields: milestones positive and increasing, ``min_size <= max_size``."""
    milestones = cfg.optim.milestones
    bad = [m for m in milestones if m < 1]
    if bad:
        raise ConfigError(f"optim.milestones: epochs must be positive, got {milestones}")
    if any(b <= a for a, b in itertools.pairwise(milestones)):
        raise ConfigError(
            f"optim.milestones: must be increasing, each above the one before, got {milestones}"
        )
    models = [("model", cfg.model)]
    if cfg.distill is not None:
        models.append(("distill.teacher", cfg.distill.teacher))
    for prefix, m in models:
        sizes = m.min_size if isinstance(m.min_size, list) else [m.min_size]
        if max(sizes, default=0) > m.max_size:
            raise ConfigError(
                f"{prefix}.min_size: {m.min_size} is above {prefix}.max_size ({m.max_size})"
            )


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain data (dicts, lists, scalars), suitable for YAML and checkpoints."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into ``(["a", "b", "c"], parsed value)``.

    The value is parsed with :func:`yaml.safe_load` (``8`` is an int, ``1e-3`` a float, ``[16,
    22]`` a list, ``null`` None, anything else a string).
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each ``dotted.key=value`` override applied.

    Missing intermediate mappings are created (``--set distill.teacher.backbone=resnet101`` on a
    config without ``distill``); unknown keys are reported later by :func:`config_from_dict`.
    """
    out = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node: dict[str, Any] = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                dotted = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {'.'.join(parts)}: '{dotted}' is not a mapping")
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_deep_copy(v) for v in data]
    return data


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in a YAML file holds a key twice."""


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor": its keys may be overridden
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first != line:
                raise DuplicateKeyError(
                    f"duplicate key {key!r} on line {line} (first on line {first}); YAML would "
                    "silently keep the last value"
                )
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely (no Python tags); errors name the file.

    An empty file and a key given twice in one mapping are errors, not silent defaults.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=StrictSafeLoader)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty (no settings at all)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {_describe(data)}")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    base: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Load a config from YAML (or start from ``base`` / defaults), apply overrides, validate.

    Errors name the file: ``ConfigError("cfg.yaml: optim.lrr: unknown key; did you mean 'lr'?")``.
    """
    data: dict[str, Any] = _deep_copy(base) if base is not None else {}
    if path is not None:
        data.update(read_yaml(path))
    overrides = list(overrides)
    data = apply_overrides(data, overrides)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        culprit = _override_at_fault(str(exc), overrides)
        if culprit is not None:
            raise ConfigError(f"--set {exc}") from None
        if path is None:
            raise
        raise ConfigError(f"{path}: {exc}") from None


def _override_at_fault(message: str, overrides: Iterable[str]) -> str | None:
    """The ``--set`` key that an error message's leading dotted key comes from, if any.

    Validation messages start with the dotted key they are about (``optim.lr: ...``,
    ``optim.milestones[0]: ...``); an override of that key, of a section holding it, or of a key
    inside it is at fault.
    """
    head = message.split(":", 1)[0].split("[", 1)[0].strip()
    if not head or " " in head:
        return None
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key == head or head.startswith(key + ".") or key.startswith(head + "."):
            return key
    return None


def dump_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML to ``path`` (its folder is created)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    return atomic_write_text(path, text)
