"""fgdistill.cli."""
