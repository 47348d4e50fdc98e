"""CUDA path: parity with the fixture and no host synchronisation. Skipped without a GPU."""

from typing import Any

import pytest
import torch

from fgdistill.losses import FGDLoss, MultiLevelFGD, fgd_masks
from fgdistill.losses.fgd import TERMS

from ._cases import CASE_IDS, CASES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_on_cuda(case: dict[str, Any], dtype: torch.dtype) -> None:
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    loss = FGDLoss(**case["config"])
    loss.load_state_dict(case["state_dict"])
    loss = loss.to("cuda", dtype)
    student = case["student"].to("cuda", dtype).requires_grad_(True)
    teacher = case["teacher"].to("cuda", dtype)
    boxes = [b.to("cuda", dtype) for b in case["boxes"]]
    terms = loss(student, teacher, boxes, case["batch_shape"])
    total = torch.stack(list(terms.values())).sum()
    total.backward()
    for name in TERMS:
        torch.testing.assert_close(
            terms[name].cpu().double(), case["weighted"][name], rtol=tol, atol=0
        )
    scale = case["grad_student"].abs().max()
    torch.testing.assert_close(
        student.grad.cpu().double(), case["grad_student"], rtol=tol, atol=tol * scale
    )
    h, w = student.shape[2:]
    fg, _ = fgd_masks(boxes, (h, w), case["batch_shape"])
    assert fg.is_cuda
    torch.testing.assert_close(fg.cpu().double(), case["fg_mask"], rtol=1e-6, atol=1e-7)


def test_no_host_synchronisation() -> None:
    torch.manual_seed(0)
    ml = MultiLevelFGD(("p3", "p4"), 16, 32).cuda()
    student = {
        "p3": torch.randn(2, 16, 20, 24, device="cuda", requires_grad=True),
        "p4": torch.randn(2, 16, 10, 12, device="cuda", requires_grad=True),
    }
    teacher = {
        "p3": torch.randn(2, 32, 20, 24, device="cuda"),
        "p4": torch.randn(2, 32, 10, 12, device="cuda"),
    }
    boxes = [
        torch.tensor([[10.0, 20.0, 90.0, 100.0]], device="cuda"),
        torch.zeros(0, 4, device="cuda"),
    ]
    ml(student, teacher, boxes, (160, 192))  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, total = ml(student, teacher, boxes, (160, 192))
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(total).item()
