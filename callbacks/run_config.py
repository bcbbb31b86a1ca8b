"""Save the fully resolved config of a run next to its checkpoints and into its W&B run."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from retrieval.files import write_text_atomic


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's config saver, writing into the run directory and uploading to W&B.

    ``fit`` writes ``config.yaml`` (a resumed ``fit`` rewrites it) and stores it as the W&B run's config;
    ``validate`` / ``test`` / ``predict`` on a run's checkpoint write ``config.<subcommand>.yaml`` beside it, so
    the record of how the run was trained is never replaced. Every run has its own directory (see
    :mod:`lightning_modules.run_directory`): Lightning's saver writes into the logger's ``save_dir``, shared by
    all runs, and refuses the second one. The config includes the seed actually used.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            stage = getattr(stage, "value", stage)  # a TrainerFn enum or its string
            name = self.config_filename if stage == "fit" else f"config.{stage}.yaml"
            path = Path(trainer.default_root_dir) / name
            write_text_atomic(path, self.parser.dump(self.config, skip_none=False))
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    if stage == "fit":
                        logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)
                    logger.experiment.save(str(path), base_path=str(path.parent), policy="now")
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)
