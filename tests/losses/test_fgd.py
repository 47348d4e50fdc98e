from types import ModuleType
from typing import Any

import pytest
import torch
from torch.func import functional_call

import fgdistill
from fgdistill.errors import NonFiniteError
from fgdistill.losses import FGDLoss
from fgdistill.losses.fgd import TERMS

from ._cases import CASE_IDS, CASES

F64 = torch.float64


def build(case: dict[str, Any], dtype: torch.dtype = F64) -> FGDLoss:
    loss = FGDLoss(**case["config"])
    loss.load_state_dict(case["state_dict"], strict=True)
    return loss.to(dtype)


def run(
    loss: FGDLoss, case: dict[str, Any], dtype: torch.dtype = F64
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    student = case["student"].detach().to(dtype).clone().requires_grad_(True)
    teacher = case["teacher"].detach().to(dtype).clone()
    boxes = [b.to(dtype) for b in case["boxes"]]
    terms = loss(student, teacher, boxes, case["batch_shape"])
    total = torch.stack(list(terms.values())).sum()
    total.backward()
    assert student.grad is not None
    return terms, total, student.grad


def random_small(
    cs: int = 6, ct: int = 6, n: int = 2, h: int = 3, w: int = 5, seed: int = 0, **kw: float
) -> tuple[FGDLoss, torch.Tensor, torch.Tensor, list[torch.Tensor], tuple[int, int]]:
    """A loss with every parameter random (so the global path is live) and small float64 inputs."""
    torch.manual_seed(seed)
    loss = FGDLoss(cs, ct, **kw).to(F64)
    with torch.no_grad():
        for p in loss.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    student = torch.randn(n, cs, h, w, dtype=F64)
    teacher = torch.randn(n, ct, h, w, dtype=F64)
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 8.0], [20.0, 4.0, 40.0, 24.0]], dtype=F64)] + [
        torch.zeros(0, 4, dtype=F64)
    ] * (n - 1)
    return loss, student, teacher, boxes, (8 * h, 8 * w)


def test_top_level_export() -> None:
    assert fgdistill.FGDLoss is FGDLoss


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_float64(case: dict[str, Any]) -> None:
    terms, total, grad = run(build(case), case)
    assert set(terms) == set(TERMS)
    for name in TERMS:
        assert terms[name].shape == ()
        torch.testing.assert_close(terms[name], case["weighted"][name], rtol=1e-6, atol=0)
    torch.testing.assert_close(total, case["total"], rtol=1e-6, atol=0)
    scale = case["grad_student"].abs().max()
    torch.testing.assert_close(grad, case["grad_student"], rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_parity_float32(case: dict[str, Any]) -> None:
    terms, total, grad = run(build(case, torch.float32), case, torch.float32)
    for name in TERMS:
        assert terms[name].dtype == torch.float32
        torch.testing.assert_close(terms[name].double(), case["weighted"][name], rtol=1e-4, atol=0)
    torch.testing.assert_close(total.double(), case["total"], rtol=1e-4, atol=0)
    scale = case["grad_student"].abs().max()
    torch.testing.assert_close(grad.double(), case["grad_student"], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("case", CASES[:2], ids=CASE_IDS[:2])
def test_parameter_gradients_match_loop_port(
    case: dict[str, Any], loop_reference: ModuleType
) -> None:
    """Every parameter's gradient equals plain autograd through the released code's port."""
    fast = build(case)
    run(fast, case)
    slow = build(case)
    student = case["student"].detach().clone().requires_grad_(True)
    terms = loop_reference.loop_fgd_terms(
        slow, student, case["teacher"], case["boxes"], case["batch_shape"]
    )
    for name in TERMS:  # the port itself reproduces the fixture
        torch.testing.assert_close(terms[name], case["weighted"][name], rtol=1e-6, atol=0)
    sum(terms.values()).backward()
    scale = case["grad_student"].abs().max()
    torch.testing.assert_close(student.grad, case["grad_student"], rtol=1e-6, atol=1e-6 * scale)
    slow_params = dict(slow.named_parameters())
    for name, p in fast.named_parameters():
        ref = slow_params[name].grad
        assert p.grad is not None and ref is not None, name
        torch.testing.assert_close(p.grad, ref, rtol=1e-6, atol=1e-10, msg=name)


@pytest.mark.parametrize(("cs", "ct"), [(6, 6), (3, 6)])
def test_gradcheck_student_and_parameters(cs: int, ct: int) -> None:
    loss, student, teacher, boxes, batch_shape = random_small(cs, ct, temperature=0.7)
    names = [n for n, _ in loss.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in loss.parameters())
    student.requires_grad_(True)

    def total(s: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        out = functional_call(
            loss, dict(zip(names, ps, strict=True)), (s, teacher, boxes, batch_shape)
        )
        return torch.stack(list(out.values())).sum()

    assert torch.autograd.gradcheck(
        total, (student, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True
    )


def test_gradcheck_full_jacobian_tiny() -> None:
    loss, student, teacher, boxes, batch_shape = random_small(4, 4, n=1, h=2, w=3)
    student.requires_grad_(True)

    def total(s: torch.Tensor) -> torch.Tensor:
        return torch.stack(list(loss(s, teacher, boxes, batch_shape).values())).sum()

    assert torch.autograd.gradcheck(total, (student,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("term", ["alpha", "beta", "gamma", "lambda_"])
def test_gradcheck_each_term_alone(term: str) -> None:
    weights = {"alpha": 0.0, "beta": 0.0, "gamma": 0.0, "lambda_": 0.0, term: 0.3}
    loss, student, teacher, boxes, batch_shape = random_small(**weights)
    student.requires_grad_(True)

    def total(s: torch.Tensor) -> torch.Tensor:
        return torch.stack(list(loss(s, teacher, boxes, batch_shape).values())).sum()

    assert torch.autograd.gradcheck(total, (student,), eps=1e-6, atol=1e-7, fast_mode=True)


def test_every_parameter_gets_a_gradient_and_teacher_none() -> None:
    case = CASES[1]  # unequal channels: has align
    loss = build(case)
    student = case["student"].detach().clone().requires_grad_(True)
    teacher = case["teacher"].detach().clone().requires_grad_(True)
    total = sum(loss(student, teacher, case["boxes"], case["batch_shape"]).values())
    total.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    for name, p in loss.named_parameters():
        assert p.grad is not None, name
        if name.endswith("context.mask.bias"):
            # softmax over positions is shift invariant: the mask bias has zero gradient
            assert p.grad.abs().max() < 1e-12, name
        else:
            assert p.grad.abs().sum() > 0, name


def test_fresh_loss_trains_context_from_the_start() -> None:
    """At initialisation the last context conv is zero; it must still receive a gradient."""
    loss = FGDLoss(8, 8)
    student = torch.randn(2, 8, 6, 6, requires_grad=True)
    out = loss(
        student, torch.randn(2, 8, 6, 6), [torch.tensor([[0.0, 0.0, 20.0, 20.0]])] * 2, (48, 48)
    )
    sum(out.values()).backward()
    for side in ("student_context", "teacher_context"):
        last = getattr(loss, side).transform[3]
        assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0


def test_initialisation_and_layout() -> None:
    torch.manual_seed(0)
    loss = FGDLoss(256, 256)
    assert loss.align is None
    assert set(loss.state_dict()) == set(CASES[0]["state_dict"])
    assert set(FGDLoss(8, 16).state_dict()) == set(CASES[1]["state_dict"])
    assert isinstance(FGDLoss(8, 16).align, torch.nn.Conv2d)
    for side in (loss.student_context, loss.teacher_context):
        assert torch.count_nonzero(side.transform[3].weight) == 0
        assert torch.count_nonzero(side.transform[3].bias) == 0
        assert torch.count_nonzero(side.mask.bias) == 0
        # kaiming normal, fan-in 256, relu gain: std sqrt(2/256) ~ 0.088
        assert 0.06 < side.mask.weight.std().item() < 0.12
    assert not torch.equal(loss.student_context.mask.weight, loss.teacher_context.mask.weight)


def test_global_term_expansion_matches_direct_formula() -> None:
    loss, student, teacher, boxes, batch_shape = random_small(
        alpha=0.0, beta=0.0, gamma=0.0, lambda_=1.0
    )
    out = loss(student, teacher, boxes, batch_shape)
    s = loss.align(student) if loss.align is not None else student
    direct = (loss.student_context(s) - loss.teacher_context(teacher)).square().sum() / 2
    torch.testing.assert_close(out["global"], direct, rtol=1e-10, atol=0)


@pytest.mark.parametrize("zeroed", ["alpha", "beta", "gamma", "lambda_"])
def test_zero_weight_skips_only_that_term(zeroed: str) -> None:
    case = CASES[4]
    full, _, _ = run(build(case), case)
    config = {**case["config"], zeroed: 0.0}
    loss = FGDLoss(**config)
    loss.load_state_dict(case["state_dict"])
    loss.double()
    terms, _, _ = run(loss, case)
    skipped = {"alpha": "fg", "beta": "bg", "gamma": "attention", "lambda_": "global"}[zeroed]
    assert terms[skipped].item() == 0.0
    for name in TERMS:
        if name != skipped:
            torch.testing.assert_close(terms[name], full[name], rtol=1e-12, atol=0)
    if zeroed == "lambda_":  # the context blocks take no part
        assert all(p.grad is None for p in loss.student_context.parameters())
        assert all(p.grad is None for p in loss.teacher_context.parameters())


def test_all_weights_zero() -> None:
    loss = FGDLoss(4, 4, alpha=0, beta=0, gamma=0, lambda_=0)
    out = loss(torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3), [torch.zeros(0, 4)], (24, 24))
    assert all(v.item() == 0.0 and v.shape == () for v in out.values())


def test_no_boxes_anywhere() -> None:
    loss, student, teacher, _, batch_shape = random_small()
    boxes = [torch.zeros(0, 4, dtype=F64)] * 2
    out = loss(student, teacher, boxes, batch_shape)
    assert out["fg"].item() == 0.0
    assert out["bg"].item() > 0.0


def test_backward_twice_with_retained_graph() -> None:
    loss, student, teacher, boxes, batch_shape = random_small()
    student.requires_grad_(True)
    total = torch.stack(list(loss(student, teacher, boxes, batch_shape).values())).sum()
    (g1,) = torch.autograd.grad(total, student, retain_graph=True)
    (g2,) = torch.autograd.grad(total, student)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_half_precision_inputs_are_computed_in_float32() -> None:
    case = CASES[0]
    loss = build(case, torch.float32)
    student = case["student"].to(torch.bfloat16).requires_grad_(True)
    teacher = case["teacher"].to(torch.bfloat16)
    out = loss(student, teacher, case["boxes"], case["batch_shape"])
    assert all(v.dtype == torch.float32 for v in out.values())
    sum(out.values()).backward()
    assert student.grad is not None and student.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out["fg"].double(), case["weighted"]["fg"], rtol=0.05, atol=0)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], tuple[int, int]]:
    return torch.randn(2, 4, 3, 5), torch.randn(2, 8, 3, 5), [torch.zeros(0, 4)] * 2, (24, 40)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s, t, b, bs: (s[0], t, b, bs), "student must be .*rank 4"),
        (lambda s, t, b, bs: (s, t[0], b, bs), "teacher must be .*rank 4"),
        (lambda s, t, b, bs: (s[:1], t, b, bs), "batch sizes differ"),
        (lambda s, t, b, bs: (s, t[:, :, :2], b, bs), "spatial sizes differ"),
        (lambda s, t, b, bs: (s[:, :3], t, b, bs), "student has 3 channels"),
        (lambda s, t, b, bs: (s, t[:, :6], b, bs), "teacher has 6 channels"),
        (lambda s, t, b, bs: (s, t, b[:1], bs), "1 box tensors for a batch of 2"),
        (lambda s, t, b, bs: (s, t, torch.zeros(2, 0, 4), bs), "list of N tensors"),
        (lambda s, t, b, bs: (s, t, [torch.zeros(3, 5), b[1]], bs), r"boxes\[0\] must have shape"),
        (lambda s, t, b, bs: (s, t, [b[0], torch.zeros(4)], bs), r"boxes\[1\] must have shape"),
        (
            lambda s, t, b, bs: (s, t, [b[0], torch.full((1, 4), float("nan"))], bs),
            r"boxes\[1\].*NaN",
        ),
        (
            lambda s, t, b, bs: (s.index_fill(3, torch.tensor([1]), float("nan")), t, b, bs),
            "student.*NaN",
        ),
        (
            lambda s, t, b, bs: (s, t.index_fill(2, torch.tensor([0]), float("inf")), b, bs),
            "teacher.*Inf",
        ),
        (lambda s, t, b, bs: (s.long(), t, b, bs), "student must be floating point"),
        (lambda s, t, b, bs: (s, t, b, (0, 40)), "batch_shape must be positive"),
        (lambda s, t, b, bs: (s, t, b, 24), "batch_shape must be a pair"),
    ],
)
def test_input_validation(mutate: Any, match: str) -> None:
    loss = FGDLoss(4, 8)
    with pytest.raises(ValueError, match=match):
        loss(*mutate(*_inputs()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"student_channels": 0, "teacher_channels": 4}, "student_channels"),
        ({"student_channels": 4, "teacher_channels": 1}, "teacher_channels"),
        ({"student_channels": 4, "teacher_channels": 4, "temperature": 0.0}, "temperature"),
        ({"student_channels": 4, "teacher_channels": 4, "beta": -1.0}, "beta"),
    ],
)
def test_constructor_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FGDLoss(**kwargs)


@pytest.mark.parametrize("chunk", [0, 1, 7, 64], ids=["fused", "chunk1", "chunk7", "chunk64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_implementations_agree(case: dict[str, Any], chunk: int) -> None:
    """Fused (compile) and blocked (eager, streaming softmax) paths match the default path."""
    results = []
    for c in (None, chunk):
        loss = build(case)
        student = case["student"].detach().clone().requires_grad_(True)
        terms = loss._terms(student, case["teacher"], case["boxes"], case["batch_shape"], c)
        torch.stack(list(terms.values())).sum().backward()
        grads = {n: p.grad for n, p in loss.named_parameters()}
        results.append((terms, student.grad, grads))
    (t0, g0, p0), (t1, g1, p1) = results
    for name in TERMS:
        torch.testing.assert_close(t1[name], t0[name], rtol=1e-10, atol=0)
    torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-14)
    for name, grad in p0.items():
        torch.testing.assert_close(p1[name], grad, rtol=1e-9, atol=1e-14, msg=name)


def test_nan_found_after_the_fact_names_the_input() -> None:
    loss = FGDLoss(4, 4, alpha=1.0, beta=0.0, gamma=0.0, lambda_=0.0)
    student = torch.randn(1, 4, 3, 3)
    teacher = torch.randn(1, 4, 3, 3)
    teacher[0, 2, 1, 1] = float("nan")
    # a user-facing error (a ValueError too), so the command line prints one line
    with pytest.raises(NonFiniteError, match=r"teacher contains NaN or Inf.*teacher is frozen"):
        loss(student, teacher, [torch.tensor([[0.0, 0.0, 8.0, 8.0]])], (24, 24))
