"""fgdistill.engine."""
