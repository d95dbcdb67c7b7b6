"""The network: the UNet (unet.py), its attention layers and the hook controllers plug into
(attention.py), and the frozen CLIP text encoder that gives the keys and values (text_encoder.py)."""
