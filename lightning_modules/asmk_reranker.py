"""ASMK / ASMK* as a pair re-ranker: the aggregated selective match kernel of Detect-to-Retrieve (Teichmann et
al., CVPR 2019; Tolias et al., ICCV 2013 / IJCV 2016) scoring the global shortlist in the same re-ranking stage
as AMES and RRT (:mod:`callbacks.reranking_stage`), so the two can be compared on the same shortlists.

The kernel (:class:`~lightning_modules.nn.asmk.AsmkKernel`) is :func:`retrieval.asmk.asmk_similarity` in batched
torch: a fixed codebook (``codebook_path``, a ``.npy`` written by ``python -m retrieval.codebook``), queries with
multiple assignment, ASMK (unit residual sums) or ASMK* (their signs), the selectivity ``sign(u) |u|^alpha`` above
``threshold``, and an image normalisation. Local descriptors are used as stored (extraction stores them
L2-normalised); the codebook must be trained on descriptors of the same kind, from another dataset than the one
searched.

There is nothing to train: ``fit`` refuses. ``validate`` tunes the fusion on the validation split and records it
in the run's ``fusion.json``; ``test`` in the same run directory applies it. Without a checkpoint the two
subcommands would each get a new run directory, so pin one for both (``RETRIEVAL_RUN_DIR=<run>``; see
``configs/asmk/embedded_local.yaml``), or set ``tune_fusion: false`` and give ``fusion_weight`` /
``fusion_temperature``.

**The logit** given to the fusion ``lambda * s_global + (1 - lambda) * sigmoid(gamma * logit)`` is the kernel
similarity itself. With ``normalisation="word_counts"`` (the default) it lies in ``[0, 1]`` (each shared word adds
``sigma(u) <= 1``, at most ``min(|C_q|, |C_x|)`` of them, divided by ``sqrt(|C_q| |C_x|)``), the range of a cosine
global score, but matching pairs score only 0.01 to 0.1 (a query with multiple assignment has many words), so
the tuning's temperature grid reaches ``gamma = 500`` (:data:`ASMK_FUSION_GAMMAS`) to weigh it against the global
score; the grid's ``lambda = 0`` orders the shortlist by the kernel alone. With ``"none"`` the raw sum grows with
the number of words, and the small ``gamma`` values of the grid bring it into the sigmoid's range.

**Speed.** The kernel runs on the evaluation's device in float32: on one H100, about 3,700 pairs per second at
``K = 65,536``, ``d = 128``, 400 descriptors per image and 5 words per query descriptor (1,100 at ``d = 768``,
2.3 GiB for 256 pairs), most of it the assignment of the database descriptors; allowing TF32 matrix products
(``torch.backends.cuda.matmul.allow_tf32``) makes it 2 to 4 times faster, at the price of rare changes of a
descriptor's nearest word.

**Memory per database image** (:meth:`AsmkReranker.database_bytes_per_image`), one entry per distinct visual word
of its ``L_x`` descriptors: the word id (2 bytes for up to 65,536 words, 4 beyond) and the vector, ``d / 8``
bytes of signs (ASMK*: 16 B at ``d = 128``) or ``4 d`` bytes of float32 (ASMK); plus the global descriptor as
stored. The number of distinct words depends on the image; the figure counts ``L_x`` of them (every descriptor
its own word), an upper bound: descriptors that share a word share an entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.nn.asmk import AsmkKernel
from lightning_modules.reranking import PairReranker, split_locals
from lightning_modules.run_directory import record_input
from retrieval.codebook import ASMK_QUERY_ASSIGNMENTS, Codebook
from retrieval.reranking import DEFAULT_GAMMAS

#: The fusion's temperature grid: the default one and larger values, since the normalised kernel of matching
#: pairs is of order 0.01 to 0.1 (a query with multiple assignment has many words), where ``sigmoid(gamma x)``
#: with ``gamma <= 10`` is almost flat.
ASMK_FUSION_GAMMAS = (*DEFAULT_GAMMAS, 20.0, 50.0, 100.0, 200.0, 500.0)


class AsmkReranker(PairReranker):
    """ASMK (``binary=False``) or ASMK* re-ranking of the global shortlist from local descriptors.

    Args:
        codebook_path: the visual words, a ``.npy`` file of ``float [K, d]`` centroids
            (``python -m retrieval.codebook --stores ... --size K --output <path>``).
        binary: ASMK* (binary signatures, the ``asmk`` package's default) rather than ASMK.
        alpha, threshold: selectivity exponent and threshold (3 and 0 in D2R and the ``asmk`` package).
        query_assignments: nearest words per query descriptor (the ``asmk`` package: 5; D2R: 1).
        normalisation: ``"word_counts"`` (``1 / sqrt(|C_q| |C_x|)``, the ``asmk`` package) or ``"none"`` (D2R's
            regional kernels).
        fusion_gammas: the temperatures the fusion tuning tries (:data:`ASMK_FUSION_GAMMAS`).
        **kwargs: the evaluation settings of :class:`PairReranker` (``shortlist``, ``query_locals``,
            ``database_locals``, ``eval_local_sizes``, the fusion and its tuning, ``pair_batch_size``).
    """

    def __init__(
        self,
        codebook_path: str,
        binary: bool = True,
        alpha: float = 3.0,
        threshold: float = 0.0,
        query_assignments: int = ASMK_QUERY_ASSIGNMENTS,
        normalisation: str = "word_counts",
        fusion_gammas: Sequence[float] | None = ASMK_FUSION_GAMMAS,
        **kwargs,
    ):
        super().__init__(fusion_gammas=fusion_gammas, **kwargs)
        self.save_method_hyperparameters()
        self.kernel: AsmkKernel | None = None

    @property
    def method_name(self) -> str:
        return "ASMK*" if self.hparams.binary else "ASMK"

    def setup(self, stage: str) -> None:
        if stage == "fit":
            raise ValueError(
                f"{self.method_name} re-ranking has nothing to train (a fixed codebook and kernel): use `validate` "
                "to tune the fusion on the validation split, then `test`"
            )
        if self.kernel is None:
            self.kernel = self._build_kernel()

    def _build_kernel(self) -> AsmkKernel:
        hp = self.hparams
        path = Path(hp.codebook_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"codebook_path {path} does not exist; train one on local descriptors of another dataset first: "
                f"python -m retrieval.codebook --stores <train store>.h5 --size <K> --output {path}"
            )
        codebook = Codebook.load(path)
        data_dim = getattr(getattr(self._trainer, "datamodule", None), "local_dim", None) if self._trainer else None
        if data_dim is not None and data_dim != codebook.dim:
            raise ValueError(
                f"codebook {path} has {codebook.dim}-d words but the local descriptors are {data_dim}-d: train the "
                "codebook on descriptors of this kind"
            )
        if self._trainer is not None:
            record_input("codebook", path)
        kernel = AsmkKernel(
            torch.from_numpy(codebook.centroids),
            binary=hp.binary,
            alpha=hp.alpha,
            threshold=hp.threshold,
            query_assignments=hp.query_assignments,
            normalisation=hp.normalisation,
        )
        rank_zero_info(
            f"{self.method_name}: codebook {path} ({codebook.size} words of {codebook.dim} dimensions), "
            f"{hp.query_assignments} word(s) per query descriptor, alpha={hp.alpha:g}, threshold={hp.threshold:g}, "
            f"normalisation={hp.normalisation}"
        )
        return kernel.to(self.device)

    def score_pairs(self, query_global, query_local, database_global, database_local, database_encoding="float"):
        if database_encoding != "float":
            raise ValueError(
                f"{self.method_name} aggregates local descriptors; it cannot read {database_encoding} database codes"
            )
        if self.kernel is None:
            self.kernel = self._build_kernel()
        return self.kernel.to(query_local.device)(*split_locals(query_local), *split_locals(database_local))

    def database_bytes_per_image(self, database_locals: int, global_bytes: int) -> int:
        if self.kernel is None:
            self.kernel = self._build_kernel()
        word_id = 2 if self.kernel.size <= 1 << 16 else 4
        vector = self.kernel.dim // 8 if self.hparams.binary else 4 * self.kernel.dim
        return global_bytes + database_locals * (word_id + vector)

    def training_step(self, batch, batch_idx: int):
        raise RuntimeError(f"{self.method_name} re-ranking has nothing to train: use validate and test")

    def configure_optimizers(self):
        return None
