"""The FGD reference cases (``tests/fixtures/fgd_reference_cases.pt``), loaded once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
CASES_PATH = ROOT / "tests" / "fixtures" / "fgd_reference_cases.pt"

CASES: list[dict[str, Any]] = torch.load(CASES_PATH, weights_only=True)["cases"]
CASE_IDS = [
    f"case{i}-cs{c['config']['student_channels']}-ct{c['config']['teacher_channels']}"
    for i, c in enumerate(CASES)
]
