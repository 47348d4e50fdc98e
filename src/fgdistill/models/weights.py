"""Loading weights into a detector: strictly (a checkpoint of the same build), partly (another
number of classes: ``model.weights``), or by torchvision's weights name (downloaded once).

Files are read with ``torch.load(..., weights_only=True)`` only.
"""

from __future__ import annotations

import logging
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torchvision
from torch import Tensor, nn

from fgdistill.errors import CheckpointError, ConfigError
from fgdistill.models.checkpoint import load_checkpoint, state_dict_of

__all__ = ["LoadReport", "load_pretrained", "load_state_dict_checked", "load_weights"]

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What :func:`load_state_dict_checked` did: keys missing from the state dict, keys the model
    does not have, and keys present in both with different shapes (key -> (checkpoint shape,
    model shape))."""

    source: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every key matched in name and shape."""
        return not (self.missing or self.unexpected or self.wrong_shape)

    def describe(self, limit: int = 20) -> str:
        """A human-readable summary listing up to ``limit`` keys of each kind."""

        def listing(keys: list[str]) -> str:
            shown = ", ".join(keys[:limit])
            more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
            return shown + more

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): {listing(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s): {listing(self.unexpected)}")
        if self.wrong_shape:
            shapes = [
                f"{k} (checkpoint {list(a)} vs model {list(b)})"
                for k, (a, b) in self.wrong_shape.items()
            ]
            parts.append(f"{len(shapes)} key(s) of the wrong shape: {listing(shapes)}")
        return "; ".join(parts) if parts else "all keys match"


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str, strict: bool = True
) -> LoadReport:
    """Load ``state_dict`` into ``model`` and report exactly which keys did not fit.

    Keys of the wrong shape are never copied. Module-specific conversions of torchvision (old
    RetinaNet head layouts, ``num_batches_tracked`` for FrozenBatchNorm2d) are honoured because
    the loading itself is done by ``nn.Module.load_state_dict``.

    Args:
        model: the module to load into.
        state_dict: parameter/buffer name -> tensor.
        source: where the state dict came from, for messages (a path or a weights name).
        strict: raise when anything is missing, unexpected or of the wrong shape; otherwise load
            what fits and log a warning.

    Raises:
        CheckpointError: ``strict`` and the keys do not match; the message lists them. As with
            ``nn.Module.load_state_dict``, the keys that did fit have been loaded by then.
    """
    own = model.state_dict()
    report = LoadReport(source=source)
    fitting: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            report.wrong_shape[key] = (tuple(value.shape), tuple(own[key].shape))
        else:
            fitting[key] = value
    try:
        result = model.load_state_dict(fitting, strict=False)
    except RuntimeError as exc:  # a module's own conversion renamed keys into the wrong shape
        raise CheckpointError(
            f"weights from {source} do not fit {type(model).__name__}: {_mismatches(exc)}"
        ) from None
    report.missing = [k for k in result.missing_keys if k not in report.wrong_shape]
    report.unexpected = list(result.unexpected_keys)
    if not report.ok:
        message = f"weights from {source} do not fit {type(model).__name__}: {report.describe()}"
        if strict:
            raise CheckpointError(message)
        logger.warning(message)
    return report


def _mismatches(exc: RuntimeError, limit: int = 3) -> str:
    """The first size mismatches in ``nn.Module.load_state_dict``'s error, shortly."""
    import re

    found = re.findall(
        r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
        r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)",
        str(exc),
    )
    if not found:
        return str(exc).strip().splitlines()[-1][:300]
    shown = ", ".join(f"{k} {a} (model {b})" for k, a, b in found[:limit])
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return f"{len(found)} key(s) of the wrong shape: {shown}{more}"


def load_pretrained(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str
) -> LoadReport:
    """Initialise ``model`` from another detector's weights, skipping the layers of another shape.

    What ``model.weights`` does: a checkpoint of ours or a torchvision state dict of the same
    architecture initialises every tensor whose name and shape match; tensors whose shapes
    differ (the class-specific layers when the number of classes differs: the classification
    logits, Faster R-CNN's box predictor, Mask R-CNN's mask logits) keep their initialisation,
    and are named in a warning.

    Raises:
        CheckpointError: keys are missing or unexpected (another architecture or layout); the
            message lists them.
    """
    report = load_state_dict_checked(model, state_dict, source=source, strict=False)
    if report.missing or report.unexpected:
        raise CheckpointError(
            f"weights from {source} do not fit {type(model).__name__}: {report.describe()}. "
            "A torchvision COCO model needs its own layout: build it with "
            "fgdistill.models.torchvision_spec(name) (see docs/torchvision.md)"
        )
    if report.wrong_shape:
        logger.warning(
            "weights from %s: skipped %d tensor(s) of another shape, which keep their "
            "initialisation: %s",
            source,
            len(report.wrong_shape),
            ", ".join(report.wrong_shape),
        )
    return report


def _is_weights_name(spec: str) -> bool:
    return "_Weights." in spec and "/" not in spec and not spec.endswith((".pt", ".pth"))


def _download_weights(name: str) -> dict[str, Tensor]:
    """State dict of torchvision weights ``name`` (e.g. ``"ResNet50_Weights.IMAGENET1K_V1"``)."""
    try:
        enum = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"unknown torchvision weights name {name!r}: {exc}") from exc
    logger.info("loading torchvision weights %s from %s (downloads unless cached)", name, enum.url)
    try:
        state = enum.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"could not download torchvision weights {name} from {enum.url}: {exc}. Downloading "
            "needs network access; offline, download the file elsewhere and pass its local path "
            "instead"
        ) from exc
    return dict(state)


def load_weights(spec: str | Path) -> tuple[dict[str, Tensor], str]:
    """State dict from a checkpoint path or a torchvision weights name, and a label for messages."""
    if isinstance(spec, str) and _is_weights_name(spec) and not Path(spec).exists():
        return _download_weights(spec), spec
    return state_dict_of(load_checkpoint(spec), source=str(spec)), str(spec)
