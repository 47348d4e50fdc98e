"""fgdistill.viz."""
