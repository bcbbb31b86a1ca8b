"""What every pair re-ranker (AMES, RRT) shares: training on mined triplets, the fusion weights it was tuned
with, and the pair scoring the evaluation's re-ranking stage calls.

A re-ranker's retrieval embedding is the stored global descriptor, L2-normalised (the global search is the
plain one); the evaluation then scores the top-``shortlist`` of every query with :meth:`PairReranker.score_pairs`
and fuses (see :mod:`retrieval.reranking` and ``callbacks.retrieval_evaluation``). The fusion weights
``lambda``, ``gamma`` and the re-ranked depth are buffers of the module: tuned on the validation split (when
``tune_fusion``), saved in its checkpoints with the weights they were tuned for, and applied unchanged at test.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from lightning_modules.base import LRSchedule, RetrievalModule
from lightning_modules.nn.ames import split_local_columns

#: The scale column of stored local descriptors (x, y, scale, pad, weight, descriptor...).
SCALE_COLUMN = 2


class PairReranker(RetrievalModule):
    """Base of the pair re-rankers.

    Args:
        shortlist: how many global neighbours of each query are re-ranked (``m``).
        query_locals, database_locals: local descriptors per query / database image at evaluation
            (``L_q``, ``L_x``: the first ones stored, i.e. the strongest).
        eval_local_sizes: further ``[L_q, L_x]`` pairs evaluated by ``validate`` and ``test`` (a curve over
            memory; the validations during ``fit`` score only the main sizes), logged with the suffix
            ``@q<L_q>x<L_x>``.
        fusion_weight, fusion_temperature: ``lambda`` and ``gamma`` of ``s = lambda * s_global + (1 - lambda) *
            sigmoid(gamma * logit)`` until tuned.
        tune_fusion: tune ``lambda``, ``gamma`` and the re-ranked depth by a grid on each validation (the values
            are kept in the module, hence in its checkpoints, and applied unchanged at test).
        fusion_metric: the validation metric the grid maximises (a metric name such as ``mAP@100``).
        fusion_lambdas, fusion_gammas, fusion_depths: the grid (``None``: the defaults of
            :mod:`retrieval.reranking`; depths: only ``shortlist``).
        pair_batch_size: pairs scored per forward pass in evaluation (fixed chunks of the pair list, so every pair
            is scored in the same batch on 1 or N processes).
        lr, weight_decay, lr_schedule: AdamW settings.
    """

    def __init__(
        self,
        shortlist: int = 1600,
        query_locals: int = 600,
        database_locals: int = 600,
        eval_local_sizes: Sequence[Sequence[int]] | None = None,
        fusion_weight: float = 0.5,
        fusion_temperature: float = 0.2,
        tune_fusion: bool = True,
        fusion_metric: str = "mAP@100",
        fusion_lambdas: Sequence[float] | None = None,
        fusion_gammas: Sequence[float] | None = None,
        fusion_depths: Sequence[int] | None = None,
        pair_batch_size: int = 256,
        lr: float = 2e-4,
        weight_decay: float = 5e-4,
        lr_schedule: LRSchedule = "cosine",
    ):
        super().__init__()
        if shortlist < 1 or pair_batch_size < 1:
            raise ValueError(f"shortlist and pair_batch_size must be positive, got {shortlist}, {pair_batch_size}")
        self.register_buffer("fusion_lambda", torch.tensor(float(fusion_weight), dtype=torch.float64))
        self.register_buffer("fusion_gamma", torch.tensor(float(fusion_temperature), dtype=torch.float64))
        self.register_buffer("fusion_depth", torch.tensor(int(shortlist), dtype=torch.int64))
        #: 1 once tuned on a validation split (then test applies the tuned values).
        self.register_buffer("fusion_tuned", torch.tensor(0, dtype=torch.int64))
        self.save_hyperparameters()

    def save_method_hyperparameters(self) -> None:
        """``save_hyperparameters`` for a subclass that hands this class's settings over as ``**kwargs``: its own
        arguments, plus this class's for every setting it was not given (so defaults are recorded too)."""
        inherited = dict(self.hparams)
        self.save_hyperparameters(frame=inspect.currentframe().f_back)
        for key, value in inherited.items():
            self.hparams.setdefault(key, value)

    # ---- to implement ---------------------------------------------------------------------------------------
    def score_pairs(
        self,
        query_global: torch.Tensor,
        query_local: torch.Tensor,
        database_global: torch.Tensor,
        database_local: torch.Tensor,
        database_encoding: str = "float",
    ) -> torch.Tensor:
        """Logits ``[P]`` of ``P`` (query, database image) pairs from their global ``[P, Dg]`` and local
        ``[P, L, 5 + D]`` descriptors (stored columns; padding rows flagged in the pad column).
        ``database_encoding="binary"``: the database locals are stored binary codes (±1) of this re-ranker's
        projection (a compressed store), not descriptors."""
        raise NotImplementedError

    def database_bytes_per_image(self, database_locals: int, global_bytes: int) -> int:
        """Memory of one database image as this re-ranker stores it: its global descriptor (``global_bytes``, as
        stored) plus ``database_locals`` local descriptors in the re-ranker's storage form."""
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------------------------
    def data_local_dim(self) -> int:
        """Size of the stored local descriptors, read from the datamodule (for networks built lazily)."""
        dim = getattr(getattr(self.trainer, "datamodule", None), "local_dim", None)
        if dim is None:
            raise ValueError(
                f"{type(self).__name__}: local_dim is not set and the datamodule does not tell its local descriptor "
                "size; set model.init_args.local_dim (or use a feature-store datamodule with local descriptors)"
            )
        return int(dim)

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(batch["embedding"].float(), dim=-1)

    def local_size_configs(self) -> list[tuple[int, int]]:
        """``(L_q, L_x)`` of every evaluated configuration, the main one (``query_locals``, ``database_locals``)
        first."""
        main = (int(self.hparams.query_locals), int(self.hparams.database_locals))
        extra = [tuple(int(v) for v in pair) for pair in (self.hparams.eval_local_sizes or [])]
        for pair in extra:
            if len(pair) != 2:
                raise ValueError(f"eval_local_sizes entries are [L_q, L_x] pairs, got {list(pair)}")
        return list(dict.fromkeys([main, *extra]))

    @property
    def fusion(self) -> dict[str, float | int | bool]:
        return {
            "lambda": float(self.fusion_lambda),
            "gamma": float(self.fusion_gamma),
            "depth": int(self.fusion_depth),
            "tuned": bool(self.fusion_tuned),
        }

    def set_fusion(self, lam: float, gamma: float, depth: int, tuned: bool = True) -> None:
        self.fusion_lambda.fill_(float(lam))
        self.fusion_gamma.fill_(float(gamma))
        self.fusion_depth.fill_(int(depth))
        self.fusion_tuned.fill_(int(tuned))

    def triplets(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global [B, 3, Dg], local [B, 3, L, 5 + D])`` of a training batch of mined triplets."""
        if "local" not in batch or batch["local"].dim() != 4:
            raise ValueError(
                f"{type(self).__name__} trains on mined triplets with local descriptors: set "
                "data.init_args.triplet_mining (see configs/ames/)"
            )
        return batch["embedding"].float(), batch["local"].float()

    def configure_optimizers(self):
        hp = self.hparams
        return self.build_optimizer(hp.lr, hp.weight_decay, hp.lr_schedule)


def split_locals(local: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(descriptors [.., L, D], padding [.., L] bool)`` of stored local rows, keeping the first ``count``."""
    return split_local_columns(local if count is None else local[..., :count, :])


def pair_labels(num_triplets: int, device) -> torch.Tensor:
    """Labels of the pairs of a triplet batch, ``(anchor, positive)`` first then ``(anchor, negative)``: one
    positive and one negative pair per triplet, so the BCE is balanced."""
    return torch.cat([torch.ones(num_triplets, device=device), torch.zeros(num_triplets, device=device)])


def sampled_size(size: int | Sequence[int], generator: torch.Generator) -> int:
    """A fixed size, or one drawn uniformly from ``[low, high)`` (the universal model's training)."""
    if isinstance(size, int):
        return size
    low, high = (int(v) for v in size)
    if not 1 <= low < high:
        raise ValueError(f"a size range is [low, high) with 1 <= low < high, got {list(size)}")
    return int(torch.randint(low, high, (1,), generator=generator))
