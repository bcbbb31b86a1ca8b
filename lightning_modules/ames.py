"""AMES: a transformer that scores a pair of images from their local descriptors, for re-ranking.

Suma, Tolias, Chum et al., "AMES: Asymmetric and Memory-Efficient Similarity Estimation for Instance-level
Retrieval", ECCV 2024. The network (:class:`~lightning_modules.nn.ames.AMESTransformer`) maps each local
descriptor to 128 dimensions (full precision, or a binary code of an ITQ-initialised projection) and lets a
matching token attend within and across the two images; its output is a logit. The evaluation re-ranks the
global shortlist with it (:mod:`callbacks.reranking_stage`).

Training follows the authors' training code (constants in METHOD defaults below, each configurable): mined
triplets (:mod:`datamodules.triplets`), binary cross-entropy on the (anchor, positive) and (anchor, negative)
pairs, AdamW with a per-step cosine schedule.

* **Universal** (``query_train_locals`` / ``database_train_locals`` ranges, default ``[10, 400)``): the query and
  database set sizes are drawn independently for each batch (the same on every process: drawn from the step),
  so one model serves any ``(L_q, L_x)`` at test time. **Specific**: fixed sizes (two integers).
* **Distilled** (``teacher``): a trained full-precision AMES (a checkpoint or a run directory) sees the large
  sets (``teacher_locals``); the student (typically binary) sees the first ``n`` of them, ``n`` drawn as above;
  loss = BCE + ``distill_weight`` x MSE between the student's last-block tokens and the teacher's at the same
  positions (token, the student's query descriptors, its database descriptors). ``distill_weight = 0`` is plain
  BCE. Choice where the paper is silent: the student's subset is the first ``n`` descriptors by detector weight
  (what the student sees at test), and the MSE runs over all kept positions, padding included, as in the
  authors' code.
* ``published_checkpoint``: the authors' released model file, mapped to this network
  (:func:`~lightning_modules.nn.ames.load_published_ames`), e.g. to evaluate the published weights here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.base import load_frozen_module
from lightning_modules.nn.ames import AMESTransformer, load_published_ames
from lightning_modules.reranking import PairReranker, pair_labels, sampled_size, split_locals
from lightning_modules.ss2d import resolve_checkpoint
from retrieval.compression import bytes_per_image, itq_projection


class AMES(PairReranker):
    """AMES re-ranker on stored local descriptors.

    Args:
        binary: binary local codes (ITQ-initialised projection, erf relaxation in training, sign at test).
        local_dim: size of the stored local descriptors; ``None`` reads it from the data.
        model_dim, num_layers, num_heads, ffn_dim, dropout: the transformer (paper: 128, 5, 2, 1024, 0).
        sigma: the erf relaxation's ``sigma`` (binary training).
        itq_init: initialise the binary projection by ITQ on ``itq_samples`` training local descriptors.
        query_train_locals, database_train_locals: training set sizes: ``[low, high)`` drawn per batch
            (universal) or an integer (specific).
        teacher: a trained full-precision AMES for distillation (checkpoint file or run directory).
        teacher_locals: descriptors per image the teacher sees.
        distill_weight: ``beta`` of the distillation term.
        published_checkpoint: the authors' released model file to start from.
        seed: seed of the per-batch set sizes and of ITQ's sample.
        **kwargs: evaluation and optimisation settings of :class:`PairReranker`.
    """

    method_name = "AMES"

    def __init__(
        self,
        binary: bool = False,
        local_dim: int | None = None,
        model_dim: int = 128,
        num_layers: int = 5,
        num_heads: int = 2,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        sigma: float = 1e-6,
        itq_init: bool = True,
        itq_samples: int = 100_000,
        query_train_locals: int | Sequence[int] = (10, 400),
        database_train_locals: int | Sequence[int] = (10, 400),
        teacher: str | None = None,
        teacher_locals: int = 400,
        distill_weight: float = 10.0,
        published_checkpoint: str | None = None,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.save_method_hyperparameters()
        self.network: AMESTransformer | None = None
        # The teacher stays outside the module tree: not a parameter, not in checkpoints, not wrapped by DDP.
        self._teacher: list[AMES] = []
        if published_checkpoint is not None:
            self.network = load_published_ames(published_checkpoint)
            if self.network.binary != binary:
                raise ValueError(
                    f"{published_checkpoint} holds a {'binary' if self.network.binary else 'full-precision'} AMES "
                    f"but binary={binary} was asked"
                )
        elif local_dim is not None:
            self._build(local_dim)

    def _build(self, local_dim: int) -> None:
        hp = self.hparams
        self.network = AMESTransformer(
            local_dim,
            model_dim=hp.model_dim,
            num_layers=hp.num_layers,
            num_heads=hp.num_heads,
            ffn_dim=hp.ffn_dim,
            binary=hp.binary,
            sigma=hp.sigma,
            dropout=hp.dropout,
        )
        self.hparams.local_dim = local_dim

    # ---- building, teacher, ITQ ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.network is None:
            self._build(self.data_local_dim())
        if stage == "fit" and self.hparams.teacher is not None and not self._teacher:
            teacher = load_frozen_module(resolve_checkpoint(self.hparams.teacher), "teacher")
            if not isinstance(teacher, AMES) or teacher.hparams.binary:
                raise ValueError(f"teacher {self.hparams.teacher} must be a full-precision AMES checkpoint")
            self._teacher.append(teacher)

    def on_fit_start(self) -> None:
        if self._teacher:
            self._teacher[0].to(self.device)
        if (
            self.hparams.binary
            and self.hparams.itq_init
            and self.global_step == 0
            and self.hparams.published_checkpoint is None
        ):
            sample = self._itq_sample()
            projection = binary_projection(sample, self.hparams.model_dim, self.hparams.seed)
            self.network.init_projection(torch.as_tensor(projection, dtype=torch.float32, device=self.device))
            rank_zero_info(f"AMES: binary projection initialised by ITQ on {len(sample)} training local descriptors")

    def _itq_sample(self) -> np.ndarray:
        """L2-normalised local descriptors of seeded random training images (the same on every process)."""
        dataset = self.trainer.datamodule.train_dataset()
        generator = np.random.default_rng(self.hparams.seed)
        rows = generator.permutation(len(dataset))
        descriptors, total = [], 0
        for start in range(0, len(rows), 256):
            local = torch.from_numpy(dataset.local_descriptors(np.sort(rows[start : start + 256])))
            values, padding = split_locals(local)
            kept = values[~padding]
            descriptors.append(F.normalize(kept, dim=-1).numpy())
            total += len(kept)
            if total >= self.hparams.itq_samples:
                break
        return np.concatenate(descriptors)[: self.hparams.itq_samples]

    # ---- training -------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        _, local = self.triplets(batch)
        generator = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        query_size = sampled_size(self.hparams.query_train_locals, generator)
        database_size = sampled_size(self.hparams.database_train_locals, generator)
        query, database = _pairs_of_triplets(local)
        query_desc, query_pad = split_locals(query, query_size)
        database_desc, database_pad = split_locals(database, database_size)
        distilling = bool(self._teacher) and self.hparams.distill_weight > 0
        output = self.network(query_desc, query_pad, database_desc, database_pad, return_tokens=distilling)
        logits, tokens = output if distilling else (output, None)
        labels = pair_labels(len(local), logits.device)
        bce = F.binary_cross_entropy_with_logits(logits, labels)
        terms = {"bce": bce}
        loss = bce
        if distilling:
            terms["distill_mse"] = self._distillation(
                query, database, tokens, query_desc.shape[1], database_desc.shape[1]
            )
            loss = bce + self.hparams.distill_weight * terms["distill_mse"]
        self.stop_if_not_finite(loss, terms)
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "bce")
        self.log("train/loss", loss)
        self.log("train/query_locals", float(query_desc.shape[1]))
        self.log("train/database_locals", float(database_desc.shape[1]))
        return loss

    def _distillation(self, query, database, student_tokens, query_size: int, database_size: int) -> torch.Tensor:
        """MSE between the student's last-block tokens and the teacher's at the student's positions."""
        teacher = self._teacher[0].network
        size = self.hparams.teacher_locals
        with torch.no_grad():
            teacher_query, teacher_query_pad = split_locals(query, size)
            teacher_database, teacher_database_pad = split_locals(database, size)
            _, teacher_tokens = teacher(
                teacher_query, teacher_query_pad, teacher_database, teacher_database_pad, return_tokens=True
            )
        teacher_query_len = teacher_query.shape[1]
        if query_size > teacher_query_len or database_size > teacher_database.shape[1]:
            raise ValueError(
                f"the student sees {query_size}/{database_size} descriptors, more than the teacher's {size}: "
                "raise teacher_locals"
            )
        kept = torch.cat(
            [
                teacher_tokens[:, : 1 + query_size],
                teacher_tokens[:, 1 + teacher_query_len : 1 + teacher_query_len + database_size],
            ],
            dim=1,
        )
        return F.mse_loss(student_tokens, kept)

    # ---- evaluation -----------------------------------------------------------------------------------------
    def score_pairs(self, query_global, query_local, database_global, database_local, database_encoding="float"):
        query_desc, query_pad = split_locals(query_local)
        database_desc, database_pad = split_locals(database_local)
        if database_encoding == "float":
            return self.network(query_desc, query_pad, database_desc, database_pad)
        if database_encoding != "binary" or not self.hparams.binary:
            raise ValueError(
                f"AMES ({'binary' if self.hparams.binary else 'full precision'}) cannot read {database_encoding} "
                "database locals; a store of binary codes is read by the binary AMES whose projection made it"
            )
        database_tokens = self.network.tokens_from_codes(database_desc)
        return self.network.score_tokens(self.network.encode(query_desc), query_pad, database_tokens, database_pad)

    def binary_projection(self) -> np.ndarray:
        """``[local_dim, 128]`` projection whose signs are this binary model's codes: what
        ``retrieval.feature_store.compress_feature_store(local_projection=...)`` stores the database with."""
        if not self.hparams.binary:
            raise ValueError("binary_projection needs a binary AMES")
        return self.network.remap.projection.detach().cpu().numpy()

    def database_bytes_per_image(self, database_locals: int, global_bytes: int) -> int:
        # Database locals are stored after the remap: 128-bit codes (16 B) or fp16 128-d tokens (256 B).
        return global_bytes + bytes_per_image(
            global_dim=0,
            global_storage=None,
            num_locals=database_locals,
            local_storage="binary" if self.hparams.binary else "fp16",
            local_dim=self.hparams.model_dim,
        )


def binary_projection(descriptors: np.ndarray, bits: int, seed: int) -> np.ndarray:
    """``[D, bits]`` initial projection of the binary remap: ITQ (as the authors). ITQ rotates a PCA basis, so it
    gives at most ``D`` bits; for descriptors of fewer than ``bits`` dimensions (e.g. a small benchmark's) the
    remaining columns are random unit directions (sign random projections), seeded."""
    dim = descriptors.shape[1]
    projection = itq_projection(descriptors, bits=min(bits, dim), seed=seed)
    if bits > dim:
        extra = np.random.default_rng(seed).standard_normal((dim, bits - dim))
        projection = np.concatenate([projection, extra / np.linalg.norm(extra, axis=0, keepdims=True)], axis=1)
    return projection.astype(np.float32)


def _pairs_of_triplets(local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and database sides of the ``(anchor, positive)`` then ``(anchor, negative)`` pairs of triplets
    ``[B, 3, L, C]``: ``[2B, L, C]`` each, in the order of :func:`pair_labels`."""
    anchor = local[:, 0]
    return torch.cat([anchor, anchor]), torch.cat([local[:, 1], local[:, 2]])
