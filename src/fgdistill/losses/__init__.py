"""fgdistill.losses."""
