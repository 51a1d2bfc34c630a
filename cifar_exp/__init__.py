"""Hydra-configured CIFAR-10 experiments."""

import os
from pathlib import Path

# albumentations 2.0.x asks PyPI for a newer version on import and warns when offline; a
# training run must not depend on the network. A user's own setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# The configs ship inside the package (a wheel installs them), so every entry point finds them
# from any working folder. An absolute path: Hydra takes it whether a module runs as __main__,
# is imported, or is started by a console script.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
