"""Command line: ``python -m lightning_modules.cli {fit,validate,test,predict} --config <yaml> [--key=value ...]``.

LightningCLI in subclass mode (``class_path`` / ``init_args``) with OmegaConf interpolation resolved after all
configs and overrides are merged (``${model.init_args.latent_dim}`` follows ``--model.init_args.latent_dim``).
On top of Lightning's CLI:

* every run gets its own run directory with its resolved config, checkpoints, metrics and W&B files, and
  ``--ckpt_path last`` resumes the newest interrupted run (:mod:`lightning_modules.run_directory`);
* the shared evaluation callback (``--evaluation.*``) and a checkpoint callback (``--checkpoint.*``, saving
  ``last.ckpt``) are always present;
* the datamodules place data on processes themselves, so Lightning's sampler injection is off.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.retrieval_evaluation import RetrievalEvaluation
from callbacks.run_config import SaveRunConfig
from datamodules.base import RetrievalDataModule
from lightning_modules.base import RetrievalModule
from lightning_modules.run_directory import choose_run_directory, export_run_directory, prepare_run

SUBCOMMANDS = ("fit", "validate", "test", "predict")
PARSER_MODE = "omegaconf+"
TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
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
            parser_kwargs={"parser_mode": "omegaconf", **{s: {"parser_mode": PARSER_MODE} for s in SUBCOMMANDS}},
            auto_configure_optimizers=False,
            # Its instantiator hands the `model` hparams to every RetrievalModule in the config (baselines too).
            load_from_checkpoint_support=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RetrievalEvaluation, "evaluation")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-step{step:06d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        root = config.trainer.default_root_dir or TRAINER_DEFAULTS["default_root_dir"]
        self.run_directory, ckpt_path = choose_run_directory(root, self.subcommand, config.get("ckpt_path"))
        config.ckpt_path = ckpt_path
        export_run_directory(self.run_directory)
        self.run_info = prepare_run(self.run_directory, config.seed_everything)

    def instantiate_trainer(self, **kwargs):
        if self.subcommand is None:
            return super().instantiate_trainer(**kwargs)
        trainer = super().instantiate_trainer(default_root_dir=str(self.run_directory), **kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(Path(self.run_directory) / "checkpoints")
        return trainer


def main(args=None) -> None:
    RetrievalCLI(args=args)


if __name__ == "__main__":
    main(sys.argv[1:])
