"""fgdistill.evaluation: COCO metrics (percent, 0-100)."""

from fgdistill.evaluation.coco_eval import (
    IOU_TYPES,
    METRIC_NAMES,
    COCOEvaluator,
    score_results_file,
)

__all__ = ["IOU_TYPES", "METRIC_NAMES", "COCOEvaluator", "score_results_file"]
