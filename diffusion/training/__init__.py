"""Training: the loop (loop.py, `train`), the small CLIP trained on the captions (clip.py) and the
grounding loss of the cross-attention maps (grounding.py)."""
