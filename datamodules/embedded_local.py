"""The embedded local-descriptor benchmark: seeded, generated images of rigid objects described by local descriptors.

Made for re-rankers that compare two sets of local descriptors (AMES): small enough to train and evaluate on a
CPU in minutes, built so that the global ranking leaves room that local matching can take back. Every image
shows one object:

* **objects**: ``parts_per_object`` parts, each a unit descriptor in ``local_dim`` dimensions, a position in
  the object's frame (uniform in the unit disk), an intrinsic scale and a saliency (how strongly a detector
  responds to it in every image). Training, validation and test use disjoint objects, as in GLDv2;
* **views**: a random similarity transform (rotation within ``max_rotation``, zoom ``2^U(-zoom_range,
  zoom_range)`` of an ``object_radius`` pixel radius, shift within ``max_shift`` of the image) places the
  parts in an ``image_size`` square image. A part is visible if it lands inside the image, is not behind the
  occluder (with ``occlusion_probability``, a random half-plane hides 20% to 80% of the object's area) and
  survives a random drop
  (kept with ``visible_fraction``). Its descriptor is the part's plus isotropic noise (``descriptor_noise``,
  relative to the unit norm), re-normalised, so matches are strong but not exact;
* **clutter**: background descriptors from a pool of ``clutter_pool_size`` textures shared by all objects,
  repeated within an image (each image draws ``clutter_per_image`` on average from ``clutter_textures`` of
  them), at random positions and scales. As with foliage or windows, clutter matches across different
  objects, and repeated textures make bursts of similar descriptors;
* **detection**: each candidate gets a log-normal detector weight, higher for parts (``part_weight_offset``
  plus the part's saliency) than for clutter, with noise (``weight_noise``); the image keeps its top ``n``
  candidates by weight, ``n`` uniform in ``[min_valid, num_locals]``, so images differ in their number of
  valid descriptors and the kept set is enriched in parts but never clean (with the defaults, about 87% of the
  10 strongest rows are parts, 73% of the 20 strongest, 46% of all valid rows);
* **scale**: the index (0..6) of the extraction scale, from the part's intrinsic scale and the view's zoom, so
  matching parts of two views differ by about the same offset (up to rounding and clipping); clutter scales
  are random;
* **global descriptor**: a weak summary of *all* the image's candidates, kept or not: their sum through a
  fixed random projection to ``global_dim``, with clutter down-weighted by ``global_clutter_weight`` (a
  learnt global descriptor attends to the object, imperfectly), normalised, plus isotropic noise
  (``global_noise``), normalised again. Shared textures pull unrelated images together, occlusion pushes
  views of one object apart.

Splits are written as feature stores (``train.h5``, ``{val,test}_{query,database}.h5``) with ``ids``,
``labels`` (object ids), ``global [N, global_dim]`` float32 and ``local [N, num_locals, 5 + local_dim]``
float16 with columns x, y (pixels), scale, pad (1 = padding), weight, descriptor..., sorted by weight
descending, padding rows last (pad = 1, zeros elsewhere). They are regenerated only when the spec changes.

Sizes with the default spec: training 8,000 images (2,000 objects x 4); validation and test each 140 queries and
350 database images of 70 unseen objects (2 queries and 5 database images per object); 64 stored local
descriptors per image (40 to 64 valid, 24 of them parts on average) of 64 dimensions, 64-d global descriptors;
83 MB in all, generated in about 3 seconds. Many training objects with few images each, because a re-ranker
trained on few objects with many images learns to recognise the training objects' parts instead of matching
descriptors (with 360 objects x 7 images, a 2-block AMES fitted its training triplets while its validation
mAP@100 never left the global ranking's). :func:`baseline_metrics` scores the global ranking and hand-written
local scores with the repository's metrics (``python -m datamodules.embedded_local`` prints them). With the
defaults, validation mAP@100 (Recall@1): global 0.40 (0.60), Chamfer similarity 0.57 (0.78), mutual nearest
neighbours above a similarity of 0.6 0.85 (0.94), the same counting only matches with a consistent scale
offset 0.93 (0.99).

What it can show: whether a re-ranker learns to count consistent part matches, to discount clutter that a
fixed similarity cannot tell from an object (the clutter pool is shared by all splits, so it can be learnt;
the parts of test objects are new) and to use the geometry columns, and how it degrades with fewer
descriptors. What it cannot: the descriptors are isotropic perturbations of random unit vectors, the geometry
is a 2-D similarity transform of independent points, and there are no near-duplicate objects, so numbers here
are not numbers on any real benchmark.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datamodules.embedded import _store_matches
from datamodules.feature_store import LabelledFeatureStores
from datamodules.triplets import TripletMining
from retrieval.feature_store import FeatureStore, write_feature_store
from retrieval.ground_truth import LabelGroundTruth
from retrieval.search import knn

SPLITS = ("train", "val_query", "val_database", "test_query", "test_database")
NUM_SCALES = 7
# Columns before the descriptor in the ``local`` dataset (see retrieval.feature_store.LOCAL_COLUMNS).
X, Y, SCALE, PAD, WEIGHT, DESCRIPTOR = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True)
class EmbeddedLocalBenchmarkSpec:
    """Generation parameters; stored in every file's config so a change regenerates the data."""

    seed: int = 0
    local_dim: int = 64
    global_dim: int = 64
    num_locals: int = 64
    min_valid: int = 40
    parts_per_object: int = 48
    image_size: float = 512.0
    object_radius: float = 160.0
    max_rotation: float = 0.5
    zoom_range: float = 0.75
    max_shift: float = 0.15
    occlusion_probability: float = 0.5
    visible_fraction: float = 0.8
    descriptor_noise: float = 0.6
    clutter_pool_size: int = 64
    clutter_textures: int = 12
    clutter_per_image: int = 48
    part_weight_offset: float = 0.6
    part_saliency_std: float = 0.5
    weight_noise: float = 0.4
    global_clutter_weight: float = 0.2
    global_noise: float = 0.25
    train_objects: int = 2000
    train_per_object: int = 4
    eval_objects: int = 70
    queries_per_object: int = 2
    database_per_object: int = 5


def generate_embedded_local_benchmark(
    root: str | Path, spec: EmbeddedLocalBenchmarkSpec = EmbeddedLocalBenchmarkSpec()
) -> Path:
    """Write the benchmark's feature stores under ``root`` (skipped when they exist with the same spec)."""
    root = Path(root)
    config = {"generator": "embedded_local_benchmark", **asdict(spec)}
    if all(_store_matches(root / f"{split}.h5", config) for split in SPLITS):
        return root
    if spec.min_valid < 1 or spec.min_valid > spec.num_locals:
        raise ValueError(f"min_valid must be in [1, num_locals={spec.num_locals}], got {spec.min_valid}")
    # Independent streams: the shared pieces, then each stage's objects and views, so that resizing training
    # leaves the validation and test descriptors unchanged.
    shared_seed, *stage_seeds = np.random.SeedSequence(spec.seed).spawn(4)
    shared = np.random.default_rng(shared_seed)
    clutter_pool = _unit(shared.standard_normal((spec.clutter_pool_size, spec.local_dim)))
    projection = shared.standard_normal((spec.local_dim, spec.global_dim)) / math.sqrt(spec.global_dim)

    splits = {}
    label_offset = 0
    stages = (("train", spec.train_objects), ("val", spec.eval_objects), ("test", spec.eval_objects))
    for (stage, count), seed in zip(stages, stage_seeds):
        rng = np.random.default_rng(seed)
        objects = _Objects(rng, count, spec)
        if stage == "train":
            views = {"train": np.repeat(np.arange(count), spec.train_per_object)}
        else:
            views = {
                f"{stage}_query": np.repeat(np.arange(count), spec.queries_per_object),
                f"{stage}_database": np.repeat(np.arange(count), spec.database_per_object),
            }
        for split, objects_shown in views.items():
            local, global_ = _render(rng, objects, objects_shown, clutter_pool, projection, spec)
            splits[split] = (local, global_, objects_shown + label_offset)
        label_offset += count
    for split, (local, global_, labels) in splits.items():
        ids = [f"{split}/{i:06d}" for i in range(len(labels))]
        write_feature_store(
            root / f"{split}.h5",
            ids,
            global_descriptors=global_,
            local_descriptors=local,
            labels=labels,
            config={**config, "split": split},
        )
    return root


class _Objects:
    """Parts of ``count`` objects: descriptors, positions in the unit disk, intrinsic scales, saliencies."""

    def __init__(self, rng: np.random.Generator, count: int, spec: EmbeddedLocalBenchmarkSpec):
        shape = (count, spec.parts_per_object)
        self.descriptors = _unit(rng.standard_normal((*shape, spec.local_dim)))
        radius, angle = np.sqrt(rng.random(shape)), rng.uniform(0, 2 * math.pi, shape)
        self.positions = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1)
        self.log2_scales = rng.uniform(-1, 1, shape)
        self.saliencies = spec.part_saliency_std * rng.standard_normal(shape)


def _render(rng, objects: _Objects, shown: np.ndarray, clutter_pool, projection, spec: EmbeddedLocalBenchmarkSpec):
    """Local ``[N, L, 5 + D]`` and global ``[N, Dg]`` descriptors of one view of each object in ``shown``."""
    n, parts, dim = len(shown), spec.parts_per_object, spec.local_dim
    local = np.zeros((n, spec.num_locals, DESCRIPTOR + dim), dtype=np.float32)
    local[:, :, PAD] = 1.0
    global_ = np.empty((n, spec.global_dim), dtype=np.float32)
    # Per-view draws that have a fixed size are drawn for all views at once (fewer, larger calls are faster).
    angles = rng.uniform(-spec.max_rotation, spec.max_rotation, n)
    zooms = rng.uniform(-spec.zoom_range, spec.zoom_range, n)
    shifts = rng.uniform(-spec.max_shift, spec.max_shift, (n, 2)) * spec.image_size
    occluded = rng.random(n) < spec.occlusion_probability
    occluder_angles = rng.uniform(0, 2 * math.pi, n)
    occluder_offsets = rng.uniform(-0.5, 0.5, n)
    kept = rng.random((n, parts)) < spec.visible_fraction
    part_noise = rng.standard_normal((n, parts, dim)) * (spec.descriptor_noise / math.sqrt(dim))
    part_weight_noise = spec.weight_noise * rng.standard_normal((n, parts))
    valid_counts = rng.integers(spec.min_valid, spec.num_locals + 1, n)
    clutter_counts = rng.poisson(spec.clutter_per_image, n)
    for i, obj in enumerate(shown):
        cos, sin = math.cos(angles[i]), math.sin(angles[i])
        rotation = np.array([[cos, -sin], [sin, cos]])
        xy = spec.image_size / 2 + shifts[i] + spec.object_radius * 2 ** zooms[i] * objects.positions[obj] @ rotation.T
        visible = kept[i] & np.all((xy >= 0) & (xy < spec.image_size), axis=1)
        if occluded[i]:
            normal = np.array([math.cos(occluder_angles[i]), math.sin(occluder_angles[i])])
            visible &= objects.positions[obj] @ normal < occluder_offsets[i]
        seen = np.flatnonzero(visible)
        part_descriptors = _unit(objects.descriptors[obj, seen] + part_noise[i, seen])
        part_scales = np.clip(np.rint(3 + 1.5 * (objects.log2_scales[obj, seen] + zooms[i])), 0, NUM_SCALES - 1)
        part_weights = spec.part_weight_offset + objects.saliencies[obj, seen] + part_weight_noise[i, seen]

        # Enough clutter that the image can fill its valid rows however little of the object is visible.
        num_clutter = max(int(clutter_counts[i]), int(valid_counts[i]) - len(seen))
        textures = rng.choice(spec.clutter_pool_size, size=spec.clutter_textures)
        clutter = clutter_pool[rng.choice(textures, size=num_clutter)]
        clutter_descriptors = _unit(
            clutter + rng.standard_normal(clutter.shape) * (spec.descriptor_noise / math.sqrt(dim))
        )
        clutter_xy = rng.uniform(0, spec.image_size, (num_clutter, 2))
        clutter_scales = rng.integers(0, NUM_SCALES, num_clutter)
        clutter_weights = spec.weight_noise * rng.standard_normal(num_clutter)

        descriptors = np.concatenate([part_descriptors, clutter_descriptors])
        weights = np.exp(np.concatenate([part_weights, clutter_weights]))
        # The global descriptor's own attention: it discounts background, but not as well as it should.
        attention = np.concatenate([np.ones(len(seen)), np.full(num_clutter, spec.global_clutter_weight)])
        pooled = _unit(attention @ descriptors @ projection)
        noisy = pooled + rng.standard_normal(spec.global_dim) * (spec.global_noise / math.sqrt(spec.global_dim))
        global_[i] = _unit(noisy)

        top = np.argsort(-weights, kind="stable")[: valid_counts[i]]
        rows = local[i, : len(top)]
        rows[:, [X, Y]] = np.concatenate([xy[seen], clutter_xy])[top]
        rows[:, SCALE] = np.concatenate([part_scales, clutter_scales])[top]
        rows[:, PAD] = 0.0
        rows[:, WEIGHT] = weights[top]
        rows[:, DESCRIPTOR:] = descriptors[top]
    return local.astype(np.float16), global_


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def descriptor_similarities(query: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Cosine similarities ``[N, q, L']`` of the query's ``q`` valid descriptors to every database image's.

    ``query`` ``[L, 5 + D]`` and ``database`` ``[N, L', 5 + D]`` in the stored layout; similarities to padding
    rows are ``-inf``, so they are never anyone's nearest neighbour.
    """
    q = query[query[:, PAD] == 0, DESCRIPTOR:].astype(np.float32)
    n, rows, _ = database.shape
    db = database[..., DESCRIPTOR:].reshape(n * rows, -1).astype(np.float32)
    similarity = (db @ q.T).reshape(n, rows, len(q)).transpose(0, 2, 1)
    return np.where(database[:, None, :, PAD] == 0, similarity, -np.inf)


def mutual_nn_matches(similarity: np.ndarray, threshold: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest-neighbour descriptor pairs above ``threshold``, from :func:`descriptor_similarities`:
    ``(matched [N, q], partner [N, q])``, whether each query descriptor is matched and to which row."""
    best_db = similarity.argmax(axis=2)  # [N, q]: each query descriptor's nearest database descriptor
    best_q = similarity.argmax(axis=1)  # [N, L']
    mutual = np.take_along_axis(best_q, best_db, axis=1) == np.arange(similarity.shape[1])
    strong = np.take_along_axis(similarity, best_db[..., None], axis=2)[..., 0] > threshold
    return mutual & strong, best_db


def mutual_nn_scores(similarity: np.ndarray, threshold: float = 0.6) -> np.ndarray:
    """Per database image, the count of mutual nearest-neighbour pairs: the hand-written local score that a
    learnt re-ranker should beat."""
    return mutual_nn_matches(similarity, threshold)[0].sum(axis=1).astype(np.float32)


def scale_consistent_scores(query: np.ndarray, database: np.ndarray, similarity: np.ndarray, threshold: float = 0.6):
    """Per database image, the most mutual nearest-neighbour pairs whose scale indices differ by one of two
    adjacent offsets: a zoom between two views shifts every part's scale index alike (up to rounding), while
    clutter scales are random. The simplest geometric check the stored columns allow."""
    matched, partner = mutual_nn_matches(similarity, threshold)
    query_scales = query[query[:, PAD] == 0, SCALE].astype(np.int64)
    database_scales = np.take_along_axis(database[..., SCALE].astype(np.int64), partner, axis=1)
    offsets = database_scales - query_scales + NUM_SCALES - 1  # [N, q] in [0, 2 * NUM_SCALES - 2]
    votes = np.zeros((len(database), 2 * NUM_SCALES - 1), dtype=np.int64)
    np.add.at(votes, (np.nonzero(matched)[0], offsets[matched]), 1)
    return (votes[:, :-1] + votes[:, 1:]).max(axis=1).astype(np.float32)


def chamfer_scores(similarity: np.ndarray) -> np.ndarray:
    """Per database image, the mean over the query's descriptors of their best similarity in it."""
    return similarity.max(axis=2).mean(axis=1)


def baseline_metrics(root: str | Path, stage: str = "val", threshold: float = 0.6) -> dict[str, dict[str, float]]:
    """Recall@1/10 and mAP@100 on ``stage`` of the global ranking and of hand-written local scores.

    The local scores rank the whole database for every query (ties broken by the global similarity): the
    database is small enough to re-rank all of it, the limit of a long global shortlist.
    """
    queries = FeatureStore(Path(root) / f"{stage}_query.h5")
    database = FeatureStore(Path(root) / f"{stage}_database.h5")
    truth = LabelGroundTruth(queries.labels, database.labels, recall_ks=(1, 10), map_ks=(100,))
    global_q, global_db = np.asarray(queries.global_descriptors()), np.asarray(database.global_descriptors())
    _, global_ranks = knn(global_q, global_db, truth.depth)
    local_db = database.local_descriptors(slice(None))
    scores = {"mutual NN": [], "mutual NN + scale": [], "chamfer": []}
    for query in queries.local_descriptors(slice(None)):
        similarity = descriptor_similarities(query, local_db)
        scores["mutual NN"].append(mutual_nn_scores(similarity, threshold))
        scores["mutual NN + scale"].append(scale_consistent_scores(query, local_db, similarity, threshold))
        scores["chamfer"].append(chamfer_scores(similarity))
    tie_break = global_q @ global_db.T
    metrics = {"global": truth.evaluate(global_ranks)}
    for name, score in scores.items():
        metrics[name] = truth.evaluate(np.lexsort((-tie_break, -np.stack(score)), axis=1)[:, : truth.depth])
    return metrics


class EmbeddedLocalBenchmark(LabelledFeatureStores):
    """The embedded local-descriptor benchmark as a datamodule: generated on first use, then read from its
    feature stores, with local descriptors for re-ranking and triplet mining for training (the AMES training
    code's defaults except fewer neighbours and positives: each training object has only 4 images, and with a
    weak global descriptor a third of the anchors have none of their 3 positives among their top-100 neighbours).

    Metrics as on the embedded benchmark: Recall@1/10 and mAP@100 (same object = relevant).
    """

    name = "embedded_local"

    def __init__(
        self,
        root: str = "data/embedded_local",
        spec: EmbeddedLocalBenchmarkSpec | None = None,
        recall_ks: tuple[int, ...] = (1, 10),
        map_ks: tuple[int, ...] = (100,),
        batch_size: int = 32,
        eval_batch_size: int | None = 256,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
        predict_split: str = "test_database",
        local_descriptors: bool = True,
        train_locals: int | None = None,
        triplet_mining: TripletMining | None = TripletMining(neighbours=100, min_positives=1, min_negatives=5),
    ):
        paths = {split: str(Path(root) / f"{split}.h5") for split in SPLITS}
        super().__init__(
            **paths,
            name=self.name,
            recall_ks=recall_ks,
            map_ks=map_ks,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            shuffle_seed=shuffle_seed,
            predict_split=predict_split,
            local_descriptors=local_descriptors,
            train_locals=train_locals,
            triplet_mining=triplet_mining,
        )
        self.root = root
        self.spec = spec or EmbeddedLocalBenchmarkSpec()

    def prepare_data(self) -> None:
        generate_embedded_local_benchmark(self.root, self.spec)


if __name__ == "__main__":
    import sys
    import time

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "data/embedded_local")
    start = time.perf_counter()
    generate_embedded_local_benchmark(root)
    print(f"generated {root} in {time.perf_counter() - start:.1f} s")
    for stage in ("val", "test"):
        for method, metrics in baseline_metrics(root, stage).items():
            print(f"{stage:4s}", f"{method:17s}", " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
