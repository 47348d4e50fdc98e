"""fgdistill.data."""
