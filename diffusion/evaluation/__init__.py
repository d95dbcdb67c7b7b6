"""Measuring a model on the shapes: the detector (detector.py), faithfulness and localisation
(metrics.py), what weights and swaps do (edits.py), and the report that runs them all (report.py)."""
