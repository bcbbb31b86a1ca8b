"""``predict``: write a method's embeddings of the datamodule's predict split as a feature store."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from callbacks.retrieval_evaluation import gather_by_index
from retrieval.feature_store import write_feature_store


class EmbeddingWriter(pl.Callback):
    """Gather the ``predict`` outputs by index and write them, with the split's ids and labels, atomically.

    Args:
        output: file to write; default ``<run dir>/embeddings/<predict split>.h5``.
    """

    def __init__(self, output: str | None = None):
        self.output = output
        self._outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._outputs = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._outputs.append((outputs["index"].detach().cpu(), outputs["embeddings"].detach().cpu()))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        loader = trainer.predict_dataloaders
        dataset = (loader[0] if isinstance(loader, (list, tuple)) else loader).dataset  # the one just embedded
        split = getattr(trainer.datamodule, "predict_split", "predict")
        embeddings = gather_by_index(trainer, self._outputs, len(dataset), f"{split} (predict)")
        self._outputs = []
        if not trainer.is_global_zero:
            return
        path = Path(self.output or Path(trainer.default_root_dir) / "embeddings" / f"{split}.h5")
        ids = getattr(dataset, "ids", None) or [str(i) for i in range(len(dataset))]
        config = {"method": type(pl_module).__name__, "hparams": dict(pl_module.hparams), "source_split": split}
        write_feature_store(path, ids, embeddings, labels=getattr(dataset, "labels", None), config=_jsonable(config))
        rank_zero_info(f"wrote {len(ids)} embeddings of size {embeddings.shape[1]} to {path}")


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
