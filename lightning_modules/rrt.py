"""RRT: the Reranking Transformer (Tan, Yuan, Ordonez, "Instance-level Image Retrieval using Reranking
Transformers", ICCV 2021), the re-ranker AMES compares with, on the same data and evaluation path.

One transformer encoder reads ``[CLS, g_q, L_q, SEP, g_x, L_x]`` (global and local descriptors of both images,
with scale and segment embeddings; :class:`~lightning_modules.nn.rrt.RerankingTransformer`) and classifies the
pair from the CLS token. Trained with binary cross-entropy on the same mined triplets as AMES
(:mod:`datamodules.triplets`). The paper re-ranks the top-100 by RRT's score alone; here the fused score of the
shared re-ranking stage is used, whose grid includes ``lambda = 0`` (RRT alone), so the tuning can choose it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.nn.rrt import RerankingTransformer
from lightning_modules.reranking import SCALE_COLUMN, PairReranker, pair_labels, split_locals
from retrieval.compression import bytes_per_image


class RRT(PairReranker):
    """RRT re-ranker on stored global and local descriptors.

    Args:
        local_dim, global_dim: stored descriptor sizes; ``None`` reads them from the data.
        model_dim, num_layers, num_heads, ffn_dim, num_scales, dropout: the encoder (paper: 128, 6, 4, 1024).
        train_locals: local descriptors per image in training.
        shortlist, query_locals, database_locals, fusion_weight, fusion_temperature, lr: as in
            :class:`PairReranker`, with the paper's values (top-100 re-ranked by RRT's score alone, 500 locals,
            AdamW 1e-4).
        **kwargs: the other evaluation and optimisation settings of :class:`PairReranker`.
    """

    method_name = "RRT"

    def __init__(
        self,
        local_dim: int | None = None,
        global_dim: int | None = None,
        model_dim: int = 128,
        num_layers: int = 6,
        num_heads: int = 4,
        ffn_dim: int = 1024,
        num_scales: int = 7,
        dropout: float = 0.0,
        train_locals: int = 500,
        shortlist: int = 100,
        query_locals: int = 500,
        database_locals: int = 500,
        fusion_weight: float = 0.0,
        fusion_temperature: float = 1.0,
        lr: float = 1e-4,
        **kwargs,
    ):
        super().__init__(
            shortlist=shortlist,
            query_locals=query_locals,
            database_locals=database_locals,
            fusion_weight=fusion_weight,
            fusion_temperature=fusion_temperature,
            lr=lr,
            **kwargs,
        )
        self.save_method_hyperparameters()
        self.network: RerankingTransformer | None = None
        if local_dim is not None and global_dim is not None:
            self._build(local_dim, global_dim)

    def _build(self, local_dim: int, global_dim: int) -> None:
        hp = self.hparams
        self.network = RerankingTransformer(
            local_dim,
            global_dim,
            model_dim=hp.model_dim,
            num_layers=hp.num_layers,
            num_heads=hp.num_heads,
            ffn_dim=hp.ffn_dim,
            num_scales=hp.num_scales,
            dropout=hp.dropout,
        )
        self.hparams.local_dim, self.hparams.global_dim = local_dim, global_dim

    def setup(self, stage: str) -> None:
        if self.network is None:
            self._build(self.data_local_dim(), self.data_embedding_dim())

    def _pair_logits(self, query_global, query_local, database_global, database_local) -> torch.Tensor:
        query_desc, query_pad = split_locals(query_local)
        database_desc, database_pad = split_locals(database_local)
        return self.network(
            query_global,
            query_desc,
            query_local[..., SCALE_COLUMN].long(),
            query_pad,
            database_global,
            database_desc,
            database_local[..., SCALE_COLUMN].long(),
            database_pad,
        )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        global_, local = self.triplets(batch)
        local = local[:, :, : self.hparams.train_locals]
        anchor_global, anchor_local = global_[:, 0], local[:, 0]
        logits = self._pair_logits(
            torch.cat([anchor_global, anchor_global]),
            torch.cat([anchor_local, anchor_local]),
            torch.cat([global_[:, 1], global_[:, 2]]),
            torch.cat([local[:, 1], local[:, 2]]),
        )
        loss = F.binary_cross_entropy_with_logits(logits, pair_labels(len(local), logits.device))
        self.stop_if_not_finite(loss, {"bce": loss})
        self.log("train/bce", loss, prog_bar=True)
        self.log("train/loss", loss)
        return loss

    def score_pairs(self, query_global, query_local, database_global, database_local, database_encoding="float"):
        if database_encoding != "float":
            raise ValueError(f"RRT reads local descriptors, not {database_encoding} codes")
        return self._pair_logits(query_global, query_local, database_global, database_local)

    def database_bytes_per_image(self, database_locals: int, global_bytes: int) -> int:
        # RRT reads the stored local descriptors themselves (fp16 in the store), scale included in its input.
        return global_bytes + bytes_per_image(
            global_dim=0,
            global_storage=None,
            num_locals=database_locals,
            local_storage="fp16",
            local_dim=self.hparams.local_dim,
        )
