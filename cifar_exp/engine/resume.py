"""Continuing a stopped run (`trainer.resume`), all in one place: which folder it continues in
(asked by the Hydra callback before the run starts), its checkpoint read once, the config it
continues with, and its state restored once the model is on its device.

A resumed run keeps its saved config; only the keys listed in `runtime_keys`
(conf/train.yaml: where and how it runs, never what it is) may change on the command line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cifar_exp.engine import checkpoint
from cifar_exp.engine.checkpoint import CheckpointError
from cifar_exp.errors import UserError

if TYPE_CHECKING:
    from cifar_exp.engine.learner import Learner

log = logging.getLogger(__name__)

LAST = Path("checkpoints") / "last.pt"


def checkpoint_path(resume: str, run_dir: Path) -> Path:
    """The checkpoint `trainer.resume` names: a file as given, else the run's last.pt."""
    path = Path(resume).expanduser()
    return path if resume != "auto" and path.suffix == ".pt" else run_dir / LAST


def folder_of(resume: str) -> Path:
    """The run folder of `trainer.resume=<run folder or checkpoint file>`."""
    path = Path(resume).expanduser()
    if path.suffix == ".pt":
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path


def job_config(config: DictConfig) -> dict:
    """The resolved config without Hydra's own node: what a checkpoint saves."""
    keys = [key for key in config if key != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(config, keys), resolve=True)


def experiment(config: dict, ignored: list[str]) -> dict:
    """The config without the `ignored` dotted keys (and their list): what two runs of one
    experiment share."""
    cfg = OmegaConf.create(config)
    for key in [*ignored, "runtime_keys"]:
        *parents, leaf = key.split(".")
        node = OmegaConf.select(cfg, ".".join(parents)) if parents else cfg
        if isinstance(node, DictConfig) and leaf in node:
            del node[leaf]
    return OmegaConf.to_container(cfg)


def find_resumable(root: Path, config: dict, ignored: list[str]) -> Path:
    """The newest run folder under `root` whose checkpoint was trained with `config`."""
    wanted = experiment(config, ignored)
    candidates = sorted(root.rglob(str(LAST)), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            saved = checkpoint.load(path)["config"]
        except CheckpointError:  # a damaged or foreign file is simply not a match
            continue
        if experiment(saved, ignored) == wanted:
            return path.parent.parent
    raise UserError(
        f"trainer.resume=auto: no run under output_root={root} has a checkpoint with this "
        f"config ({len(candidates)} checkpoints looked at); give the run folder instead "
        "(trainer.resume=<run folder>) or drop trainer.resume to start a new run"
    )


def run_folder(config: DictConfig) -> Path:
    """The folder the run continues in: the one `trainer.resume` names (whose checkpoint must
    exist), or with `auto` the newest run under `output_root` with this config."""
    resume, runtime_keys = config.trainer.resume, list(config.runtime_keys)
    if resume == "auto":
        return find_resumable(Path(config.output_root), job_config(config), runtime_keys)
    folder = folder_of(resume)
    checkpoint.require_file(checkpoint_path(resume, folder))
    return folder


def overridden(overrides: list[str]) -> dict[str, str]:
    """The keys (or groups) that command-line overrides set, with the override text."""
    return {
        o.key_or_group: o.input_line for o in OverridesParser.create().parse_overrides(overrides)
    }


def saved_choices(run_dir: Path) -> dict[str, str] | None:
    """The config-group options the run in `run_dir` was composed with (its first session's
    .hydra/hydra.yaml), or None when that record is missing."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None
    choices = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.choices", default={})
    return {str(k): str(v) for k, v in OmegaConf.to_container(choices).items()}


@dataclass(frozen=True)
class RunChoices:
    """The config groups' options: those this command composed, and those of the run it
    continues (None: not recorded)."""

    given: dict[str, str]
    saved: dict[str, str] | None


def check_overrides(
    overrides: list[str], composed: dict, saved: dict, ignored: list[str], run: RunChoices
) -> None:
    """A resumed run keeps its saved config: refuse command-line changes to the experiment,
    whether they set a value or choose a config group's option (`run`: the options given
    and the ones the run was composed with)."""
    for key, text in overridden(overrides).items():
        if key in ignored:
            continue
        if key in run.given:  # a config group: compare the options
            new = run.given[key]
            old = run.saved.get(key) if run.saved is not None else "unknown, no .hydra/hydra.yaml"
        else:
            new = OmegaConf.select(OmegaConf.create(composed), key, default=None)
            old = OmegaConf.select(OmegaConf.create(saved), key, default=None)
            if OmegaConf.is_config(new):
                new, old = OmegaConf.to_container(new), OmegaConf.to_container(old or {})
        if new != old:
            raise UserError(
                f"trainer.resume continues a run with its saved config, but the command line "
                f"changes {key} (saved: {old}, given: {new}); drop {text} "
                "or start a new run"
            )


@dataclass
class Resumed:
    """The checkpoint a run continues from, read once, and the config it continues with."""

    path: Path
    state: dict
    config: DictConfig

    @property
    def epoch(self) -> int:
        return self.state["epoch"]

    @property
    def wandb_run_id(self) -> str | None:
        return self.state.get("wandb_run_id")

    @property
    def wandb_tags(self) -> list[str]:
        return self.state.get("wandb_tags", [])

    def restore_model(self, model: nn.Module) -> None:
        """The weights, into the model on its device; or why they do not fit it."""
        try:
            model.load_state_dict(self.state["model"])
        except RuntimeError as err:
            detail = str(err).strip().splitlines()[1:2] or [""]
            raise CheckpointError(
                f"{self.path} holds the weights of another model ({detail[0].strip()}): "
                "the network its config builds differs (another model, or a cifar_exp version "
                "that named its layers otherwise); start a new run"
            ) from None

    def restore_training(self, learner: Learner) -> None:
        """Optimizer, scheduler and loss-scaler state, after the model is on its device (the
        optimizer's state then follows its parameters there)."""
        learner.load_state_dict(self.state)

    def restore_rng(self) -> None:
        """The saved random-number states: call last, as building the run drew others."""
        checkpoint.set_rng_state(self.state["rng"])


def continues(cfg: DictConfig, run_dir: Path) -> bool:
    """Whether the run continues one: `trainer.resume`, or its own folder already holds a
    checkpoint. A new run gets a new folder (run_folders), so a checkpoint there means the same
    job started again: submitit requeues a job stopped at its time limit or preempted
    (hydra.launcher.max_num_timeout) into the folder it had."""
    return bool(cfg.trainer.resume) or (run_dir / LAST).is_file()


def load(cfg: DictConfig, run_dir: Path, overrides: list[str], choices: dict[str, str]) -> Resumed:
    """Read the checkpoint `cfg.trainer.resume` names in `run_dir` (without it, the folder's
    own last.pt), and the config to continue with: the saved one, with the `runtime_keys` that
    the command line (`overrides`, composed with the config groups' `choices`) sets."""
    path = checkpoint_path(cfg.trainer.resume or "auto", run_dir)
    state = checkpoint.load(path)
    if "step" in state:
        raise CheckpointError(
            f"trainer.resume={path} holds mid-epoch weights saved on a stop signal; "
            "resume from the run folder (its checkpoints/last.pt) instead"
        )
    runtime_keys = list(cfg.runtime_keys)
    composed = OmegaConf.to_container(cfg, resolve=True)
    if not cfg.trainer.resume and experiment(composed, runtime_keys) != experiment(
        state["config"], runtime_keys
    ):
        raise UserError(
            f"the run folder {run_dir} already holds another run's checkpoint ({LAST}); "
            f"choose an empty folder (hydra.run.dir=<folder>), or continue that run with "
            f"trainer.resume={run_dir}"
        )
    run = RunChoices(choices, saved_choices(run_dir))
    check_overrides(overrides, composed, state["config"], runtime_keys, run)
    config = OmegaConf.create(state["config"])
    given = overridden(overrides)
    for key in [k for k in runtime_keys if k in given]:
        value = OmegaConf.select(cfg, key, default=None)
        if not OmegaConf.is_config(value):  # a key, not a group such as debug
            OmegaConf.update(config, key, value, force_add=True)
    config.runtime_keys = runtime_keys
    log.info("Resuming %s after epoch %d", run_dir, state["epoch"])
    return Resumed(path, state, config)
