"""Training data: the procedural shapes (shapes.py), captioned image folders (image_folder.py), the
dataset a config names (datasets.py), the batches training reads (batches.py) and the text states
kept for a folder's captions (text_states.py)."""
