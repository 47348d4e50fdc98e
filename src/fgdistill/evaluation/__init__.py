"""fgdistill.evaluation."""
