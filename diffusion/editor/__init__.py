"""The browser editor's model side, which app.py (the Gradio page) wires up: renders with per-step
maps, word swaps and the precision choice (service.py), their HTML views (views.py), and the
compiled UNet the service attaches for one-image renders (compiled.py)."""
