"""The PKD, CWD and MGD reference cases (``tests/fixtures/kd_reference_cases.pt``), loaded once.

Twelve cases computed in float64 by mmrazor's ``PKDLoss``, ``ChannelWiseDivergence`` and
``MGDLoss`` with its ``MGDConnector``: a list of dicts with ``method`` (``"pkd"``, ``"cwd"``,
``"mgd"``), ``config`` (constructor keyword arguments), ``student``, ``teacher``, ``loss``,
``grad_student`` and, for MGD, ``state_dict``, ``keep`` and ``grad_params``. The tests that use
them are skipped when the file is absent.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from fgdistill.losses import CWDLoss, MGDLoss, PKDLoss

from ._cases import ROOT

KD_CASES_PATH = ROOT / "tests" / "fixtures" / "kd_reference_cases.pt"

KD_CASES: list[dict[str, Any]] = (
    torch.load(KD_CASES_PATH, weights_only=True)["cases"] if KD_CASES_PATH.is_file() else []
)

LOSSES: dict[str, type[PKDLoss] | type[CWDLoss] | type[MGDLoss]] = {
    "pkd": PKDLoss,
    "cwd": CWDLoss,
    "mgd": MGDLoss,
}


def _case_id(index: int, case: dict[str, Any]) -> str:
    shapes = "-".join("x".join(map(str, case[k].shape)) for k in ("student", "teacher"))
    return f"{case['method']}{index}-{shapes}"


def kd_cases(*methods: str) -> list[Any]:
    """``pytest.param`` per case of ``methods`` (all if none), or one skipped param if absent."""
    chosen = [
        pytest.param(case, id=_case_id(i, case))
        for i, case in enumerate(KD_CASES)
        if not methods or case["method"] in methods
    ]
    if not chosen:
        reason = f"reference cases not found at {KD_CASES_PATH}"
        return [pytest.param(None, id="no-cases", marks=pytest.mark.skip(reason=reason))]
    return chosen


def build_loss(
    case: dict[str, Any], dtype: torch.dtype = torch.float64, device: str = "cpu"
) -> torch.nn.Module:
    """The case's loss, in ``dtype`` on ``device``, with its parameters (MGD) loaded strictly."""
    loss = LOSSES[case["method"]](**case["config"]).to(device, dtype)
    if "state_dict" in case:
        loss.load_state_dict(case["state_dict"], strict=True)
    return loss


def run_case(
    case: dict[str, Any], dtype: torch.dtype = torch.float64, device: str = "cpu"
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``(loss, d loss / d student, {parameter name: gradient})`` of the case, as computed here."""
    loss_fn = build_loss(case, dtype, device)
    student = case["student"].to(device, dtype).clone().requires_grad_(True)
    teacher = case["teacher"].to(device, dtype).clone().requires_grad_(True)
    args = [student, teacher]
    if "keep" in case:
        args.append(case["keep"].to(device, dtype))
    loss = loss_fn(*args)
    loss.backward()
    assert student.grad is not None
    assert teacher.grad is None, "the teacher map must take no gradient"
    grads = {}
    for name, p in loss_fn.named_parameters():
        assert p.grad is not None, name
        grads[name] = p.grad
    return loss.detach(), student.grad, grads


def assert_matches(actual: Tensor, expected: Tensor, tol: float) -> None:
    """Equal to ``tol`` relative to each element, and absolutely to ``tol * max|expected|``."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(
        actual.detach().cpu().double(), expected.double(), rtol=tol, atol=tol * scale
    )


def check_case(case: dict[str, Any], dtype: torch.dtype, device: str = "cpu") -> None:
    """Loss, student gradient and parameter gradients match the reference to 1e-6 (float64) or
    1e-4 (float32)."""
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    loss, grad, grads = run_case(case, dtype, device)
    assert loss.shape == () and loss.dtype == dtype
    torch.testing.assert_close(loss.cpu().double(), case["loss"].double(), rtol=tol, atol=0)
    assert_matches(grad, case["grad_student"], tol)
    expected_params = case.get("grad_params", {})
    assert sorted(grads) == sorted(expected_params)
    for name, g in expected_params.items():
        assert_matches(grads[name], g, tol)
