"""Studies: weight interpolation / merging and forgetting reports."""
