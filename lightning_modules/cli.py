"""Command line: ``python -m lightning_modules.cli {fit,validate,test,predict} --config <yaml> [--key=value ...]``,
and ``python -m lightning_modules.cli compare RUN [RUN ...]`` (accuracy against embedding size of finished runs,
:mod:`retrieval.size_curves`).

LightningCLI in subclass mode (``class_path`` / ``init_args``), with OmegaConf interpolation inside a config file
(``${model.init_args.latent_dim}``). On top of Lightning's CLI:

* every run gets its own run directory with its resolved config, checkpoints, metrics and W&B files, and
  ``--ckpt_path last`` resumes the newest interrupted run (:mod:`lightning_modules.run_directory`);
* the shared evaluation callback (``--evaluation.*``), a checkpoint callback (``--checkpoint.*``, saving
  ``last.ckpt``) and the ``predict`` writer of feature stores (``--predictions.*``) are always present;
* the datamodules place data on processes themselves, so Lightning's sampler injection is off.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.prediction_writer import PredictionWriter
from callbacks.retrieval_evaluation import RetrievalEvaluation
from callbacks.run_config import SaveRunConfig
from datamodules.base import RetrievalDataModule
from lightning_modules.base import MODEL_CLASS_KEY, RetrievalModule
from lightning_modules.run_directory import choose_run_directory, export_run_directory, prepare_run
from retrieval import size_curves

SUBCOMMANDS = ("fit", "validate", "test", "predict")
# OmegaConf interpolation within a config file. (Interpolating across files and command-line overrides,
# jsonargparse's "omegaconf+", resolves each subcommand's config file before the overrides are applied.)
PARSER_MODE = "omegaconf"
TRAINER_DEFAULTS = {
    # Datamodules shard data themselves (same global batches for any number of processes).
    "use_distributed_sampler": False,
    # Retrieval metrics need the whole evaluation set; a partial sanity pass has nothing to score.
    "num_sanity_val_steps": 0,
}


class RetrievalCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            model_class=RetrievalModule,
            subclass_mode_model=True,
            datamodule_class=RetrievalDataModule,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            parser_kwargs={"parser_mode": PARSER_MODE, **{s: {"parser_mode": PARSER_MODE} for s in SUBCOMMANDS}},
            auto_configure_optimizers=False,
            # Its instantiator hands the `model` hparams to every RetrievalModule in the config (baselines too).
            load_from_checkpoint_support=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RetrievalEvaluation, "evaluation")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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
        if not config.ckpt_path or not Path(config.ckpt_path).is_file():
            return
        checkpoint = torch.load(config.ckpt_path, map_location="cpu", weights_only=True)
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
        return trainer


def default_run_root(config) -> Path:
    """``runs/<method>/<dataset>`` when ``trainer.default_root_dir`` is not set, e.g. ``runs/aesvc/embedded``."""
    method = config.model.class_path.rsplit(".", 1)[-1].lower()
    data_args = config.data.get("init_args") or {}
    module, _, class_name = config.data.class_path.rpartition(".")
    dataset = data_args.get("name") or getattr(getattr(importlib.import_module(module), class_name), "name", "dataset")
    return Path("runs") / method / dataset


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["compare"]:  # not a Lightning subcommand: plots finished runs against embedding size
        size_curves.main(argv[1:])
        return
    RetrievalCLI(args=args)


if __name__ == "__main__":
    main()
