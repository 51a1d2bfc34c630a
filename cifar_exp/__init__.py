"""Hydra-configured CIFAR-10 experiments."""

import os

# albumentations 2.0.x asks PyPI for a newer version on import and warns when offline; a
# training run must not depend on the network. A user's own setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
