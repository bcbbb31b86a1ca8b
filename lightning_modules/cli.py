"""Command line: ``python -m lightning_modules.cli {fit,validate,test,predict} --config <yaml> [--key=value ...]``,
and ``python -m lightning_modules.cli compare RUN [RUN ...]`` (finished runs and sweeps of any methods compared per
dataset: metrics, size, bytes per image, query time; :mod:`reporting.method_comparison`).

LightningCLI in subclass mode (``class_path`` / ``init_args``), with OmegaConf interpolation inside a config file
(``${model.init_args.latent_dim}``). On top of Lightning's CLI:

* every run gets its own run directory with its resolved config, checkpoints, metrics and W&B files, and
  ``--ckpt_path last`` resumes the newest interrupted run (:mod:`lightning_modules.run_directory`);
* the shared evaluation callback (``--evaluation.*``), a checkpoint callback (``--checkpoint.*``, saving
  ``last.ckpt``) and the ``predict`` writer of feature stores (``--predictions.*``) are always present;
* the datamodules place data on processes themselves, so Lightning's sampler injection is off;
* an error the project raises on purpose (a dataset layout, a feature store, a config, a checkpoint) prints
  one line instead of a traceback (``RETRIEVAL_TRACEBACK=1`` shows it), a config error without the usage
  dump, and a failed run leaves no empty run directory or W&B run to sync behind.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.prediction_writer import PredictionWriter
from callbacks.retrieval_evaluation import RetrievalEvaluation
from callbacks.run_config import SaveRunConfig
from callbacks.sweep_metric import SweepMetric
from datamodules.base import RetrievalDataModule
from lightning_modules import import_all_methods
from lightning_modules.base import MODEL_CLASS_KEY, RetrievalModule
from lightning_modules.run_directory import choose_run_directory, export_run_directory, is_global_zero, prepare_run
from reporting import method_comparison

import_all_methods()  # every method is a subclass the parser can name and list

SUBCOMMANDS = ("fit", "validate", "test", "predict")
TRACEBACK_ENV = "RETRIEVAL_TRACEBACK"
# --ckpt_path values Lightning resolves itself ("last" is resolved to a run's last.ckpt here).
LIGHTNING_CHECKPOINT_NAMES = ("best", "hpc", "registry")
# Packages whose errors are raised on purpose, with a message meant for the user.
PROJECT_PACKAGES = ("lightning_modules", "datamodules", "retrieval", "reporting", "callbacks")
DESCRIPTION = (
    "Train and evaluate image-retrieval methods with the subcommands below. One more command: "
    "'compare RUN [RUN ...]' tabulates and plots finished runs and sweeps of any methods per dataset (metrics, "
    "bytes per image, query time; accuracy against bytes or against embedding size) "
    "(python -m lightning_modules.cli compare --help). An error the project raises on purpose prints one line; "
    f"set {TRACEBACK_ENV}=1 for its traceback."
)
# OmegaConf interpolation within a config file. (Interpolating across files and command-line overrides,
# jsonargparse's "omegaconf+", resolves each subcommand's config file before the overrides are applied.)
PARSER_MODE = "omegaconf"
TRAINER_DEFAULTS = {
    # Datamodules shard data themselves (same global batches for any number of processes).
    "use_distributed_sampler": False,
    # Retrieval metrics need the whole evaluation set; a partial sanity pass has nothing to score.
    "num_sanity_val_steps": 0,
}


class ConfigError(ValueError):
    """A config or command line the parser refuses (unknown key, wrong type, missing file)."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read."""


class QuietArgumentParser(LightningArgumentParser):
    """The CLI's parser, reporting a refused config in one line instead of a usage dump."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        raise ConfigError(f"{message.strip()} (see --help)") from ex


class RunCheckpoint(ModelCheckpoint):
    """Lightning's checkpoint callback, whose ``last.ckpt`` also follows the epochs (or validations) that keep no
    top-k checkpoint. Lightning 2.6 writes ``last.ckpt`` only along with a top-k one, so with a monitor it would
    hold the best epoch rather than the newest, and ``--ckpt_path last`` would resume from there."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_newest_as_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_newest_as_last(trainer)

    def _save_newest_as_last(self, trainer) -> None:
        # After Lightning's own saving, so that a top-k checkpoint of this step is never skipped.
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class RetrievalCLI(LightningCLI):
    run_directory: Path | None = None
    _fresh_run_directory = False

    def __init__(self, args=None, run: bool = True):
        try:
            self._init(args, run)
        except BaseException:
            self._clean_up_failed_run()
            raise

    def _init(self, args, run: bool) -> None:
        super().__init__(
            model_class=RetrievalModule,
            subclass_mode_model=True,
            datamodule_class=RetrievalDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            parser_class=QuietArgumentParser,
            parser_kwargs={
                "parser_mode": PARSER_MODE,
                "prog": "python -m lightning_modules.cli",
                "description": DESCRIPTION,
                **{s: {"parser_mode": PARSER_MODE} for s in SUBCOMMANDS},
            },
            auto_configure_optimizers=False,
            # Its instantiator hands the `model` hparams to every RetrievalModule in the config (baselines too).
            load_from_checkpoint_support=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        count_batches_as_integers(parser)
        parser.add_lightning_class_args(RetrievalEvaluation, "evaluation")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-step{step:06d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # The evaluation callback prints the metrics; Lightning's per-dataloader table would repeat them.
        if subcommand in ("validate", "test"):
            parser.set_defaults(verbose=False)
        if subcommand == "predict":  # the prediction writer streams them to disk; do not also keep them in memory
            parser.set_defaults(return_predictions=False)
        return parser

    def _parse_ckpt_path(self) -> None:
        """Choose the run directory (resolving ``--ckpt_path last``), then take the model's hyperparameters
        from the checkpoint, as LightningCLI does for checkpoints written by its own instantiator."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        root = config.trainer.default_root_dir or default_run_root(config)
        self.run_directory, config.ckpt_path = choose_run_directory(root, subcommand, config.get("ckpt_path"))
        # A directory pinned with RETRIEVAL_RUN_DIR may not exist yet (prepare_run creates it).
        self._fresh_run_directory = not self.run_directory.is_dir() or not any(self.run_directory.iterdir())
        if not config.ckpt_path:
            return
        if config.ckpt_path in LIGHTNING_CHECKPOINT_NAMES:
            return
        if not Path(config.ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path {config.ckpt_path} does not exist (expected a .ckpt file or 'last')")
        try:
            checkpoint = torch.load(config.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch reports a truncated file without naming it
            raise CheckpointError(
                f"--ckpt_path {config.ckpt_path} is not a readable checkpoint (truncated or not a PyTorch file: "
                f"{str(error).split('. ')[0]})"
            ) from error
        class_path, hparams = checkpoint.get(MODEL_CLASS_KEY), checkpoint.get("hyper_parameters")
        if class_path and hparams:
            model = {"class_path": class_path, "init_args": dict(hparams)}
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        export_run_directory(self.run_directory)
        prepare_run(self.run_directory, self.config[self.subcommand].seed_everything)

    def instantiate_trainer(self, **kwargs):
        if self.subcommand is None:
            return super().instantiate_trainer(**kwargs)
        trainer = super().instantiate_trainer(default_root_dir=str(self.run_directory), **kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(Path(self.run_directory) / "checkpoints")
        trainer.callbacks.append(SweepMetric())  # best-so-far W&B summary, real run id, offline sweep progress
        return trainer

    def _clean_up_failed_run(self) -> None:
        """After a failure, remove what this invocation created that holds nothing of value: a run directory
        it created with no checkpoint in it, or else the W&B runs it started (``wandb sync`` would upload them)."""
        directory = self.run_directory
        if directory is None or not directory.is_dir() or not is_global_zero():
            return
        if self._fresh_run_directory and not any((directory / "checkpoints").glob("*.ckpt")):
            shutil.rmtree(directory, ignore_errors=True)
            return
        started = getattr(self, "_wandb_runs_before", None)
        if started is not None:
            for wandb_run in set(_wandb_runs(directory)) - started:
                shutil.rmtree(wandb_run, ignore_errors=True)

    def _run_subcommand(self, subcommand: str) -> None:
        self._wandb_runs_before = set(_wandb_runs(self.run_directory)) if self.run_directory else set()
        super()._run_subcommand(subcommand)


def _wandb_runs(directory: Path) -> list[Path]:
    return [p for p in (directory / "wandb").glob("*run-*") if p.is_dir()]


def count_batches_as_integers(parser: LightningArgumentParser) -> None:
    """``--trainer.limit_train_batches=1`` is one batch. Lightning types the ``limit_*_batches`` options
    ``float | int`` (a float is a fraction of the batches, an int a number of them) and the parser tries the types
    in that order, so "1" became 1.0, the whole epoch, and a single batch could not be asked for; with the integer
    tried first, "0.5" is still half."""
    for action in parser._actions:
        if action.dest.startswith("trainer.limit_") and getattr(action, "_typehint", None) == float | int | None:
            action._typehint = int | float | None


def default_run_root(config) -> Path:
    """``runs/<method>/<dataset>`` when ``trainer.default_root_dir`` is not set, e.g. ``runs/aesvc/embedded``."""
    method = config.model.class_path.rsplit(".", 1)[-1].lower()
    data_args = config.data.get("init_args") or {}
    module, _, class_name = config.data.class_path.rpartition(".")
    dataset = data_args.get("name") or getattr(getattr(importlib.import_module(module), class_name), "name", "dataset")
    return Path("runs") / method / dataset


def main(args=None) -> None:
    argv = [agent_argument(a) for a in (sys.argv[1:] if args is None else list(args))]
    try:
        if argv[:1] == ["compare"]:  # not a Lightning subcommand: compares finished runs
            method_comparison.main(argv[1:])
            return
        if args is None:  # the command line: LightningCLI reads sys.argv itself (and warns when also given args)
            sys.argv[1:] = argv
        RetrievalCLI(args=None if args is None else argv)
    except Exception as error:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or not raised_on_purpose(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)


def agent_argument(argument: str) -> str:
    """An argument as the parser reads it. A W&B sweep agent writes each parameter as ``--name=<str(value)>``:
    ``True``, ``[1024, 512]`` and ``1e-05`` parse as they are, but a null value arrives as ``None``, which YAML
    reads as a string: it becomes ``null``."""
    if argument.startswith("--") and argument.endswith("=None"):
        return argument[: -len("None")] + "null"
    return argument


def raised_on_purpose(error: BaseException) -> bool:
    """An error with a message for the user: a project error type, or a ValueError / FileNotFoundError raised
    by the project's own code (the innermost frame is in one of its packages)."""
    if type(error).__module__.split(".")[0] in PROJECT_PACKAGES:
        return True
    if not isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    innermost = Path(frames[-1].filename).resolve()
    repository = Path(__file__).resolve().parents[1]
    return innermost.is_relative_to(repository) and innermost.relative_to(repository).parts[0] in PROJECT_PACKAGES


if __name__ == "__main__":
    main()
