"""fgdistill.models."""
