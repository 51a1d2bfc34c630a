# Makes conf/ the package cifar_exp.conf (pyproject.toml maps it there), which Hydra reads as
# pkg://cifar_exp.conf: the same configs from a source checkout, an editable install or a wheel.
