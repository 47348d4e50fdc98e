import dataclasses

import pytest
import torch

from fgdistill.errors import NonFiniteError
from fgdistill.losses import (
    ONE_STAGE_HPARAMS,
    CWDLoss,
    FeatureImitationLoss,
    FGDHyperParams,
    FGDLoss,
    MGDLoss,
    MultiLevelFGD,
    PKDLoss,
)
from fgdistill.losses.multilevel import METHODS, CWDHyperParams, MGDHyperParams, PKDHyperParams

LEVELS = ("p3", "p4")
SIZES = {"p3": (6, 8), "p4": (3, 4)}


def features(channels: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {lv: torch.randn(2, channels, *SIZES[lv], generator=gen) for lv in LEVELS}


BOXES = [torch.tensor([[4.0, 4.0, 30.0, 20.0]]), torch.zeros(0, 4)]
BATCH = (48, 64)


# settings of the released configs, written out here: the losses know no detector names
TWO_STAGE = FGDHyperParams(0.5, 5e-5, 2.5e-5, 5e-5, 5e-7)
FCOS_LIKE = FGDHyperParams(0.8, 1.6e-3, 8e-4, 8e-4, 8e-6)


def test_hyperparameter_defaults() -> None:
    assert FGDHyperParams(0.5, 1e-3, 5e-4, 5e-4, 5e-6) == ONE_STAGE_HPARAMS
    # the dataclass defaults are FGDLoss's keyword defaults
    assert dataclasses.asdict(FGDHyperParams()) == {
        "temperature": 0.5,
        "alpha": 1e-3,
        "beta": 5e-4,
        "gamma": 1e-3,
        "lambda_": 5e-6,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        FCOS_LIKE.alpha = 1.0  # type: ignore[misc]


def test_terms_and_total_match_per_level_losses() -> None:
    torch.manual_seed(0)
    ml = MultiLevelFGD(LEVELS, 8, 8, FCOS_LIKE)
    student, teacher = features(8, 1), features(8, 2)
    terms, total = ml(student, teacher, BOXES, BATCH)
    assert list(terms) == [
        f"fgd/{lv}/{t}" for lv in LEVELS for t in ("fg", "bg", "attention", "global")
    ]
    torch.testing.assert_close(total, sum(terms.values()))
    for lv in LEVELS:
        loss = ml.losses[lv]
        assert isinstance(loss, FGDLoss) and loss.temperature == 0.8 and loss.alpha == 1.6e-3
        single = loss(student[lv], teacher[lv], BOXES, BATCH)
        for t, v in single.items():
            torch.testing.assert_close(terms[f"fgd/{lv}/{t}"], v)


def test_per_level_channels_and_hparams_and_backward() -> None:
    hp = {"p3": ONE_STAGE_HPARAMS, "p4": FGDHyperParams(gamma=0.0)}
    ml = MultiLevelFGD(LEVELS, {"p3": 4, "p4": 8}, 8, hp)
    assert ml.losses["p3"].align is not None and ml.losses["p4"].align is None
    student = {"p3": features(4, 1)["p3"], "p4": features(8, 1)["p4"]}
    for x in student.values():
        x.requires_grad_(True)
    teacher = features(8, 2)
    teacher["p5"] = torch.randn(2, 8, 2, 2)  # extra levels are ignored
    terms, total = ml(student, teacher, BOXES, BATCH)
    assert terms["fgd/p4/attention"].item() == 0.0
    total.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in student.values())


def test_mse_baseline() -> None:
    ml = MultiLevelFGD(LEVELS, 8, 8, TWO_STAGE, method="mse")
    assert all(isinstance(m, FeatureImitationLoss) for m in ml.losses.values())
    student, teacher = features(8, 1), features(8, 2)
    terms, total = ml(student, teacher, BOXES, BATCH)
    assert list(terms) == ["fgd/p3/mse", "fgd/p4/mse"]
    expected = sum(((student[lv] - teacher[lv]) ** 2).sum() / 2 * 5e-7 for lv in LEVELS)
    torch.testing.assert_close(total, expected)


@pytest.mark.parametrize("loss_type", ["fgd", "mse"])
def test_teacher_rms_normalisation_removes_the_feature_scale(loss_type: str) -> None:
    torch.manual_seed(0)
    raw = MultiLevelFGD(LEVELS, 8, 8, ONE_STAGE_HPARAMS, method=loss_type)
    norm = MultiLevelFGD(LEVELS, 8, 8, ONE_STAGE_HPARAMS, method=loss_type)
    norm.load_state_dict(raw.state_dict())
    assert norm.normalize == "none" and "normalize='none'" in repr(norm)
    norm.normalize = "teacher_rms"
    student, teacher = features(8, 1), features(8, 2)
    big_s = {lv: 30.0 * x for lv, x in student.items()}
    big_t = {lv: 30.0 * x for lv, x in teacher.items()}
    small, _ = norm(student, teacher, BOXES, BATCH)
    big, _ = norm(big_s, big_t, BOXES, BATCH)
    # Normalised: the same terms whatever the common scale of both maps.
    for name, value in small.items():
        torch.testing.assert_close(big[name], value, rtol=1e-4, atol=1e-7)
    # Raw (the released code): the squared-error terms grow with the square of the scale.
    raw_small, _ = raw(student, teacher, BOXES, BATCH)
    raw_big, _ = raw(big_s, big_t, BOXES, BATCH)
    key = "fgd/p3/fg" if loss_type == "fgd" else "fgd/p3/mse"
    assert raw_big[key] > 100 * raw_small[key]
    # Normalised equals raw on the maps divided by the teacher's root mean square.
    rms = {lv: t.pow(2).mean().sqrt() for lv, t in big_t.items()}
    by_hand, _ = raw(
        {lv: x / rms[lv] for lv, x in big_s.items()},
        {lv: x / rms[lv] for lv, x in big_t.items()},
        BOXES,
        BATCH,
    )
    for name, value in by_hand.items():
        torch.testing.assert_close(big[name], value)


def test_missing_level_is_named() -> None:
    ml = MultiLevelFGD(LEVELS, 8, 8)
    student, teacher = features(8, 1), features(8, 2)
    del teacher["p4"]
    with pytest.raises(ValueError, match=r"teacher features lack level\(s\) \['p4'\]"):
        ml(student, teacher, BOXES, BATCH)


def test_level_errors_name_the_level() -> None:
    ml = MultiLevelFGD(LEVELS, 8, 8)
    student, teacher = features(8, 1), features(8, 2)
    teacher["p4"] = teacher["p4"][:, :4]
    with pytest.raises(ValueError, match="level p4: teacher has 4 channels"):
        ml(student, teacher, BOXES, BATCH)


def test_a_diverged_level_is_a_user_facing_error_that_names_it() -> None:
    ml = MultiLevelFGD(LEVELS, 8, 8)
    student, teacher = features(8, 1), features(8, 2)
    student["p4"][0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="level p4: student contains NaN or Inf"):
        ml(student, teacher, BOXES, BATCH)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (((), 8, 8), {}, "at least one"),
        ((("p3", "p3"), 8, 8), {}, "unique"),
        (("p3", 8, 8), {}, "sequence of level names"),
        ((LEVELS, {"p3": 8}, 8), {}, r"student_channels has no entry for level\(s\) \['p4'\]"),
        ((LEVELS, 8, 8, {"p3": FCOS_LIKE}), {}, "hparams has no entry"),
        ((LEVELS, 8, 8), {"method": "kd"}, "method"),
        ((LEVELS, 8, 8), {"normalize": "batchnorm"}, "normalize must be one of"),
        ((LEVELS, 8.0, 8), {}, "must be int"),
    ],
)
def test_constructor_validation(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultiLevelFGD(*args, **kwargs)


def test_hyperparams_validation() -> None:
    with pytest.raises(ValueError, match="temperature"):
        FGDHyperParams(temperature=0)
    with pytest.raises(ValueError, match="lambda_"):
        FGDHyperParams(lambda_=-1e-6)


@pytest.mark.parametrize(
    ("method", "hparams", "loss_cls"),
    [
        ("pkd", PKDHyperParams(loss_weight=3.0), PKDLoss),
        ("cwd", CWDHyperParams(tau=2.0), CWDLoss),
        ("mgd", MGDHyperParams(alpha_mgd=1e-3), MGDLoss),
    ],
)
def test_other_methods_give_one_term_per_level_equal_to_their_loss(
    method: str, hparams: object, loss_cls: type
) -> None:
    student, teacher = features(8, 0), features(8, 1)
    ml = MultiLevelFGD(LEVELS, 8, 8, hparams, method=method)
    assert ml.method == method and method in METHODS
    torch.manual_seed(3)  # MGD draws its mask from the global generator
    terms, total = ml(student, teacher, BOXES, BATCH)
    assert set(terms) == {f"fgd/{lv}/{method}" for lv in LEVELS}
    torch.manual_seed(3)
    for lv in LEVELS:
        single = ml.losses[lv]
        assert isinstance(single, loss_cls)
        assert torch.allclose(terms[f"fgd/{lv}/{method}"], single(student[lv], teacher[lv]))
    assert torch.allclose(total, sum(terms.values()))
    assert (len(list(ml.parameters())) > 0) == (method == "mgd")


def test_methods_without_an_align_layer_need_equal_channels() -> None:
    for method in ("pkd", "cwd"):
        with pytest.raises(ValueError, match=rf"level p3: {method} needs the same channels.*8.*16"):
            MultiLevelFGD(LEVELS, 8, 16, method=method)
    mgd = MultiLevelFGD(LEVELS, 8, 16, method="mgd")  # aligned by a 1x1 conv
    assert mgd.losses["p3"].align is not None
    assert mgd.hparams["p3"] == MGDHyperParams()  # the method's defaults
    with pytest.raises(ValueError, match="hparams\\['p3'\\] must be PKDHyperParams"):
        MultiLevelFGD(LEVELS, 8, 8, ONE_STAGE_HPARAMS, method="pkd")


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (PKDHyperParams, {"loss_weight": -1.0}, "loss_weight must be finite and >= 0"),
        (PKDHyperParams, {"resize_student": "yes"}, "resize_student must be true or false"),
        (CWDHyperParams, {"tau": 0.0}, "tau must be finite and > 0"),
        (MGDHyperParams, {"lambda_mgd": 1.5}, "lambda_mgd is a probability"),
        (MGDHyperParams, {"alpha_mgd": float("inf")}, "alpha_mgd must be finite"),
    ],
)
def test_bad_method_hyperparameters_are_refused(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)
