"""The browser editor's model side: renders with per-step maps (service.py) and the compiled UNet it
attaches for one-image renders (compiled.py). app.py is the page."""
