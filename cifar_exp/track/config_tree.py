"""The run's config as a tree (rich), as lightning-hydra-template prints it. The run record
saves it in every run folder as config_tree.log, and prints it at the start of a single run or
of a sweep's first job (the other jobs differ only in their overrides, which Hydra prints)."""

from __future__ import annotations

import io

import yaml
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

CONFIG_TREE = "config_tree.log"
# The sections in the order a run uses them; the other top-level keys follow.
ORDER = ("data", "model", "augment", "optimizer", "scheduler", "trainer", "logger")
LEFT_OUT = ("runtime_keys",)  # not the run's settings: which of them a resumed run may change


def config_tree(cfg: DictConfig) -> Tree:
    """One branch per top-level key, its values as YAML (interpolations resolved)."""
    root = Tree("config", guide_style="dim")
    for name in [*ORDER, *(key for key in cfg if key not in (*ORDER, *LEFT_OUT))]:
        value = (
            OmegaConf.to_container(cfg[name], resolve=True)
            if OmegaConf.is_config(cfg[name])
            else cfg[name]
        )
        # Lists of numbers or names on one line (mean, std, runtime_keys): a shorter tree.
        text = yaml.safe_dump(value, default_flow_style=None, sort_keys=False, width=90)
        root.add(name).add(
            Syntax(text.removesuffix("...\n").rstrip(), "yaml", background_color="default")
        )
    return root


def as_text(tree: Tree) -> str:
    """The tree as plain text, as config_tree.log holds it."""
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(tree)
    return console.file.getvalue()
