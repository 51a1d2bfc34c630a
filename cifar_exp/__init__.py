"""Hydra-configured CIFAR-10 experiments.

The package is layered; a module imports only from its own layer or those below it (the
contracts in pyproject.toml, checked by `make lint`):

    train, evaluate, report, bench, gpucheck   the commands (report, bench and gpucheck are
                                                cifar_exp.tools' under the names users type)
    tools/       report, aggregate, search (a search's study in the report), bench, gpucheck
    track/       the run record, plots, per-class views, and the one module that talks to W&B
    engine/      building a run, the training loop, inference, device and precision,
                 optimizers, checkpoints, resume, signals, run folders, Hydra jobs
    model/ data/ the YAML network and its budget; images, loaders and augmentations
    distributed  the process group (DDP), which data and engine both follow
    settings     the typed config schema and every vocabulary (formats, precisions, metrics)
    errors       user errors and exit codes

The configs live in the repository's conf/ and ship in the wheel as cifar_exp.conf.
"""

import os

# albumentations 2.0.x asks PyPI for a newer version on import and warns when offline; a
# training run must not depend on the network. A user's own setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
