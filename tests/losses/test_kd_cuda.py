"""PKD, CWD and MGD on CUDA: equal to the CPU result and no host synchronisation.

Skipped without a GPU.
"""

from typing import Any

import pytest
import torch

from fgdistill.losses import CWDLoss, MGDLoss, PKDLoss

from ._kd_cases import assert_matches, check_case, kd_cases, run_case

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", kd_cases())
def test_cuda_equals_cpu_and_reference(case: dict[str, Any], dtype: torch.dtype) -> None:
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    check_case(case, dtype, device="cuda")
    loss_gpu, grad_gpu, params_gpu = run_case(case, dtype, device="cuda")
    loss_cpu, grad_cpu, params_cpu = run_case(case, dtype, device="cpu")
    assert loss_gpu.is_cuda and grad_gpu.is_cuda
    assert_matches(loss_gpu, loss_cpu.double(), tol)
    assert_matches(grad_gpu, grad_cpu.double(), tol)
    for name, g in params_cpu.items():
        assert_matches(params_gpu[name], g.double(), tol)


def test_no_host_synchronisation() -> None:
    torch.manual_seed(0)
    student = torch.randn(2, 16, 20, 24, device="cuda", requires_grad=True)
    teacher = torch.randn(2, 16, 20, 24, device="cuda")
    wide_teacher = torch.randn(2, 32, 20, 24, device="cuda")
    big_teacher = torch.randn(2, 16, 40, 48, device="cuda")
    pkd, cwd = PKDLoss(loss_weight=6.0), CWDLoss(tau=1.0, loss_weight=10.0)
    mgd, mgd_align = MGDLoss(16, 16).cuda(), MGDLoss(16, 32).cuda()
    keep = torch.ones(2, 1, 20, 24, device="cuda")

    def step() -> torch.Tensor:
        total = (
            pkd(student, teacher)
            + pkd(student, big_teacher)
            + cwd(student, teacher)
            + mgd(student, teacher)  # random mask, drawn on the device
            + mgd_align(student, wide_teacher, keep)
        )
        total.backward()
        return total

    step()  # warm-up (lazy initialisation may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(total).item()
    assert student.grad is not None and student.grad.is_cuda
