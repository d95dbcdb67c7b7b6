"""Write configs/shapes.yaml from the defaults and comments of diffusion/config.py.

python tools/write_default_config.py
"""

from pathlib import Path

from diffusion.config import commented_defaults

if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"
    path.write_text(commented_defaults())
    print(f"wrote {path}")
