"""Sampling: the pipeline that turns prompts into images and maps (pipeline.py) and the settings
of a render (settings.py)."""
