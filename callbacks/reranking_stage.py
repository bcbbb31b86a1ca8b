"""The re-ranking stage of the evaluation, for modules that score pairs (:class:`PairReranker`).

Per evaluation set: rank 0 searches the gathered global descriptors for every query's top-``m`` shortlist and
shares it; the ``queries x m`` pairs are cut into fixed chunks of ``pair_batch_size`` and each process scores
its chunks (chunk ``c`` on process ``c mod world_size``), reading the pairs' descriptors straight from the
evaluation datasets; rank 0 collects the logits and scores, with the benchmark's own protocol:

* ``<stage>/<set>/global/<metric>``: the global ranking alone;
* ``<stage>/<set>/<metric>``: the re-ranked ranking (head re-ranked by the fused score, tail untouched) at the
  module's ``(L_q, L_x)``; further ``(L_q, L_x)`` with the suffix ``@q<L_q>x<L_x>``;
* ``<stage>/<set>/bytes_per_image``: memory of one database image as stored for that configuration.

Rank 0 also times each configuration (into ``timing``, not a metric: :mod:`reporting.metrics_record`): the
shortlist search and global scoring (``<stage>/<set>/global/ms_per_query``), plus scoring the pairs and fusing
(``<stage>/<set>/ms_per_query`` with the metrics' suffix); tuning the fusion weights is not counted.

At validation with ``tune_fusion`` the fusion weights are tuned on the first evaluation set, stored in the module
(so its checkpoints carry them) and written to ``fusion.json`` in the run directory; test applies the module's
values. Because each pair is scored in the same chunk whatever the number of processes, 1 and N processes log
the same numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import EvalSet
from reporting.metrics_record import QUERY_TIME
from retrieval.files import write_text_atomic
from retrieval.reranking import PairChunks, RerankingEvaluation, global_shortlist, tune_fusion

FUSION_FILE = "fusion.json"


def rerank_eval_sets(
    trainer,
    module,
    eval_sets: list[EvalSet],
    stage: str,
    gathered: dict[str, np.ndarray],
    device=None,
    timing: dict[str, float] | None = None,
) -> dict[str, float]:
    """Metrics of the global and the re-ranked rankings of every evaluation set (on rank 0; every process
    must call this, it scores its share of the pairs). ``gathered``: each part's global descriptors (rank 0).
    ``timing`` receives the milliseconds per query (rank 0; see the module docstring)."""
    timing = {} if timing is None else timing
    metrics: dict[str, float] = {}
    configs = module.local_size_configs()
    if getattr(trainer.state.fn, "value", trainer.state.fn) == "fit":
        configs = configs[:1]  # the validations of training score the main sizes; the curve is for validate/test
    if stage == "test" and module.hparams.tune_fusion and not module.fusion["tuned"]:
        _use_recorded_fusion(trainer, module)
    for set_number, eval_set in enumerate(eval_sets):
        name = eval_set.name
        leave_one_out = eval_set.queries is None
        queries = database = None
        shortlist = None
        started = time.perf_counter()
        if trainer.is_global_zero:
            queries = _concatenate([gathered[p] for p in eval_set.query_parts]) if not leave_one_out else None
            database = _concatenate([gathered[p] for p in eval_set.database_parts])
            m = min(int(module.hparams.shortlist), len(database) - int(leave_one_out))
            shortlist = global_shortlist(
                queries if queries is not None else database, database, m, leave_one_out, device
            )
        shortlist = trainer.strategy.broadcast(shortlist, src=0)
        evaluation = None
        if trainer.is_global_zero:
            evaluation = RerankingEvaluation(eval_set.ground_truth, queries, database, *shortlist, device=device)
            metrics.update({f"{stage}/{name}/global/{k}": v for k, v in evaluation.global_metrics().items()})
            timing[f"{stage}/{name}/global/{QUERY_TIME}"] = ms_per_query(started, eval_set)
        global_seconds = time.perf_counter() - started
        for number, (query_locals, database_locals) in enumerate(configs):
            started = time.perf_counter()
            logits = score_shortlist(trainer, module, eval_set, shortlist[1], query_locals, database_locals)
            if not trainer.is_global_zero:
                continue
            scoring_seconds = time.perf_counter() - started
            suffix = "" if number == 0 else f"@q{query_locals}x{database_locals}"
            if number == 0 and set_number == 0 and stage == "val" and module.hparams.tune_fusion:
                _tune(trainer, module, evaluation, logits, name)
            fusion = module.fusion
            started = time.perf_counter() - global_seconds - scoring_seconds  # the tuning above is not counted
            scores = evaluation.metrics(logits, fusion["lambda"], fusion["gamma"], fusion["depth"])
            timing[f"{stage}/{name}/{QUERY_TIME}{suffix}"] = ms_per_query(started, eval_set)
            scores["bytes_per_image"] = module.database_bytes_per_image(
                database_locals, global_bytes_per_image(eval_set)
            )
            metrics.update({f"{stage}/{name}/{k}{suffix}": v for k, v in scores.items()})
        if trainer.is_global_zero:
            fusion = module.fusion
            metrics.update({f"{stage}/{name}/fusion_{k}": float(fusion[k]) for k in ("lambda", "gamma", "depth")})
    return metrics


def ms_per_query(started: float, eval_set: EvalSet) -> float:
    """Milliseconds per query of ``eval_set`` since ``started`` (a ``time.perf_counter()`` value)."""
    return 1000.0 * (time.perf_counter() - started) / max(eval_set.ground_truth.num_queries, 1)


def score_shortlist(trainer, module, eval_set: EvalSet, shortlist: np.ndarray, query_locals: int, database_locals: int):
    """Logits ``[Q, m]`` of every (query, shortlisted item) pair on rank 0 (``None`` elsewhere); each process
    scores its chunks of pairs."""
    num_queries, m = shortlist.shape
    chunks = PairChunks(num_queries, m, int(module.hparams.pair_batch_size))
    query_parts = eval_set.query_parts or eval_set.database_parts
    encoding = database_encoding(eval_set)
    results = {}
    with torch.inference_mode():
        for chunk, query_rows, columns in chunks.chunks_for(trainer.global_rank, trainer.world_size):
            database_rows = shortlist[query_rows, columns]
            query_global, query_local = read_rows(query_parts, query_rows, query_locals, module.device)
            database_global, database_local = read_rows(
                eval_set.database_parts, database_rows, database_locals, module.device
            )
            logits = module.score_pairs(query_global, query_local, database_global, database_local, encoding)
            results[chunk] = logits.float().cpu().numpy()
    if trainer.world_size > 1:
        everyone = [None] * trainer.world_size if trainer.is_global_zero else None
        dist.gather_object(results, everyone, dst=0)
        if trainer.is_global_zero:
            results = {chunk: logits for part in everyone for chunk, logits in part.items()}
    return chunks.assemble(results) if trainer.is_global_zero else None


def read_rows(parts: dict, rows: np.ndarray, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ``[n, Dg]`` and first ``count`` local descriptors ``[n, count, 5 + D]`` of ``rows``, indices into
    the concatenation of ``parts`` (e.g. a database and its 1M distractors), each distinct row read once."""
    unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
    sizes = [len(dataset) for dataset in parts.values()]
    starts = np.cumsum([0] + sizes)
    global_rows, local_rows = [], []
    for (name, dataset), start, stop in zip(parts.items(), starts, starts[1:]):
        mine = unique[(unique >= start) & (unique < stop)] - start
        if not len(mine):
            continue
        if not hasattr(dataset, "local_descriptors"):
            raise ValueError(f"evaluation part '{name}' has no local descriptors; a re-ranker needs them")
        batch = dataset.__getitems__(mine.tolist())
        global_rows.append(torch.as_tensor(batch.embedding if hasattr(batch, "embedding") else batch["embedding"]))
        local_rows.append(torch.from_numpy(dataset.local_descriptors(mine, count)))
    inverse = torch.from_numpy(inverse)
    return (
        torch.cat(global_rows)[inverse].to(device, torch.float32),
        torch.cat(local_rows)[inverse].to(device, torch.float32),
    )


def global_bytes_per_image(eval_set: EvalSet) -> int:
    """Bytes of one database image's global descriptor as stored (the store's own accounting: float32, float16
    or product-quantisation codes)."""
    dataset = next(iter(eval_set.database_parts.values()))
    store = getattr(dataset, "store", None)
    if store is None:
        raise ValueError(f"evaluation set '{eval_set.name}': its database is not read from a feature store")
    return int(store.stored_bytes_per_image(num_locals=0))


def database_encoding(eval_set: EvalSet) -> str:
    """How the database's locals are stored (``"binary"``: ±1 codes of a binary re-ranker's projection)."""
    encodings = {getattr(dataset, "local_encoding", "float") for dataset in eval_set.database_parts.values()}
    if len(encodings) != 1:
        raise ValueError(f"evaluation set '{eval_set.name}': database parts store locals differently ({encodings})")
    return encodings.pop()


def _tune(trainer, module, evaluation, logits: np.ndarray, set_name: str) -> None:
    hp = module.hparams
    grid = {}
    if hp.fusion_lambdas is not None:
        grid["lambdas"] = hp.fusion_lambdas
    if hp.fusion_gammas is not None:
        grid["gammas"] = hp.fusion_gammas
    if hp.fusion_depths is not None:
        grid["depths"] = [d for d in hp.fusion_depths if d <= logits.shape[1]]
    (lam, gamma, depth), value, _ = tune_fusion(evaluation, logits, metric=hp.fusion_metric, **grid)
    depth = int(logits.shape[1] if depth is None else depth)
    module.set_fusion(lam, gamma, depth)
    record = {
        "tuned_on": f"val/{set_name}",
        "metric": hp.fusion_metric,
        "value": value,
        "lambda": lam,
        "gamma": gamma,
        "depth": depth,
        "epoch": trainer.current_epoch,
        "step": trainer.global_step,
        "local_sizes": list(module.local_size_configs()[0]),
    }
    path = Path(trainer.default_root_dir) / FUSION_FILE
    history = json.loads(path.read_text()) if path.is_file() else []
    write_text_atomic(path, json.dumps([*history, record], indent=2))
    rank_zero_info(
        f"fusion tuned on val/{set_name}: lambda={lam:g}, gamma={gamma:g}, depth={depth} ({hp.fusion_metric}={value:.4f})"
    )


def _use_recorded_fusion(trainer, module) -> None:
    """Test of a module whose fusion was never tuned in its checkpoint (e.g. published weights): the values the
    last ``validate`` of this run directory tuned, or a clear error."""
    path = Path(trainer.default_root_dir) / FUSION_FILE
    if not path.is_file():
        raise ValueError(
            f"{type(module).__name__}: the fusion weights were never tuned on a validation split (tune_fusion is set, "
            f"and neither the checkpoint nor {path} holds tuned values): run `validate` first with the same "
            "checkpoint (without a checkpoint, in the same run directory: RETRIEVAL_RUN_DIR=<run> for both), or set "
            "model.init_args.tune_fusion=false to apply fusion_weight and fusion_temperature"
        )
    record = json.loads(path.read_text())[-1]
    module.set_fusion(record["lambda"], record["gamma"], record["depth"])
    rank_zero_info(
        f"fusion weights from {path} (tuned on {record['tuned_on']}): lambda={record['lambda']:g}, "
        f"gamma={record['gamma']:g}, depth={record['depth']}"
    )


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
