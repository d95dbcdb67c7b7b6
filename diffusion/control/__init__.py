"""Attention control: the prompt syntax `a (red:1.5) circle` (prompts.py), how weights act
(weighting.py), and the controllers that record, reweight and inject maps (controllers.py)."""
