"""AMES and RRT as methods: training objectives (universal, specific, distilled), the re-ranking stage through the
command line on a tiny embedded local-descriptor benchmark, 1 vs 2 processes, and bytes per image."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_cli

from lightning_modules.ames import AMES, _pairs_of_triplets
from lightning_modules.reranking import pair_labels, sampled_size, split_locals
from reporting.run_results import read_run
from retrieval.compression import bytes_per_image

CONFIGS = REPO / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
# 40 training objects (280 images), 12 per evaluation split; a one-layer network; the binary student's ITQ
# initialisation on a sample of 2,000 of the training locals: seconds per run.
TINY = [
    "--data.init_args.spec.train_objects=40",
    "--data.init_args.spec.eval_objects=12",
    "--data.init_args.batch_size=16",
    "--model.init_args.num_layers=1",
    "--model.init_args.ffn_dim=64",
    "--model.init_args.shortlist=20",
    "--model.init_args.pair_batch_size=64",
    "--model.init_args.itq_samples=2000",
    "--trainer.max_epochs=1",
]


ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def triplet_batch(num_triplets=4, stored=12, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    local = torch.zeros(num_triplets, 3, stored, 5 + dim)
    local[..., 5:] = torch.randn(num_triplets, 3, stored, dim, generator=generator)
    local[:, :, -2:, 3] = 1  # two padding rows per image
    return {
        "index": torch.arange(num_triplets * 3).reshape(-1, 3),
        "embedding": torch.randn(num_triplets, 3, 4),
        "local": local,
    }


def small_ames(**kwargs):
    return AMES(local_dim=8, num_layers=1, ffn_dim=32, **kwargs)


def test_universal_sizes_are_drawn_per_step_within_the_range_and_specific_sizes_are_fixed():
    generator = torch.Generator().manual_seed(0)
    drawn = {sampled_size([10, 400], generator) for _ in range(200)}
    assert min(drawn) >= 10 and max(drawn) < 400 and len(drawn) > 100
    assert sampled_size(32, generator) == 32
    with pytest.raises(ValueError, match=r"\[low, high\)"):
        sampled_size([5, 5], generator)


def test_training_pairs_are_anchor_positive_then_anchor_negative_with_balanced_labels():
    batch = triplet_batch()
    query, database = _pairs_of_triplets(batch["local"])
    assert torch.equal(query[:4], batch["local"][:, 0]) and torch.equal(query[4:], batch["local"][:, 0])
    assert torch.equal(database[:4], batch["local"][:, 1]) and torch.equal(database[4:], batch["local"][:, 2])
    assert pair_labels(4, "cpu").tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_training_loss_is_the_bce_of_the_network_on_the_mined_pairs_at_the_drawn_sizes():
    module = small_ames(query_train_locals=6, database_train_locals=[3, 9])
    batch = triplet_batch()
    loss = module.training_step(batch, 0)
    generator = torch.Generator().manual_seed(0)
    assert sampled_size(6, generator) == 6
    database_size = sampled_size([3, 9], generator)
    query, database = _pairs_of_triplets(batch["local"])
    logits = module.network(*split_locals(query, 6), *split_locals(database, database_size))
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, pair_labels(4, "cpu")))


def test_distillation_adds_beta_times_the_token_mse_and_beta_zero_is_plain_bce():
    torch.manual_seed(0)
    teacher = small_ames(teacher_locals=12).eval()
    batch = triplet_batch()
    losses = {}
    for beta in (0.0, 10.0):
        torch.manual_seed(1)
        student = small_ames(binary=True, query_train_locals=5, database_train_locals=7, distill_weight=beta)
        student._teacher.append(teacher)
        losses[beta] = student.training_step(batch, 0)
        plain = F.binary_cross_entropy_with_logits(
            student.network(
                *split_locals(_pairs_of_triplets(batch["local"])[0], 5),
                *split_locals(_pairs_of_triplets(batch["local"])[1], 7),
            ),
            pair_labels(4, "cpu"),
        )
    # the student of beta=10 was built with the same seed: its BCE is the beta=0 loss
    assert torch.allclose(losses[0.0], plain, atol=1e-6)
    query, database = _pairs_of_triplets(batch["local"])
    _, teacher_tokens = teacher.network(*split_locals(query, 12), *split_locals(database, 12), return_tokens=True)
    _, student_tokens = student.network(*split_locals(query, 5), *split_locals(database, 7), return_tokens=True)
    # the teacher's tokens at the student's positions: the token, its first 5 query and first 7 database rows
    kept = torch.cat([teacher_tokens[:, :6], teacher_tokens[:, 13:20]], dim=1)
    mse = F.mse_loss(student_tokens, kept)
    assert mse > 0 and torch.allclose(losses[10.0], plain + 10 * mse, atol=1e-5)


def test_bytes_per_image_counts_the_global_as_stored_and_locals_in_the_reranker_storage_form():
    assert small_ames(binary=True).database_bytes_per_image(48, global_bytes=256) == 256 + 48 * 16 == 1024
    assert small_ames().database_bytes_per_image(50, global_bytes=8192) == 8192 + 50 * 256
    assert bytes_per_image(2048, "pq8", 48, "binary") == 1024  # the paper's 1 KB setting


def metrics(run, stage="val", checkpoint="best"):
    return read_run(run, stage, checkpoint).metrics


@pytest.mark.slow
def test_ames_variants_train_and_rerank_through_the_cli_identically_on_one_and_two_processes(tmp_path):
    fp = ["--config", str(CONFIGS / "ames/embedded_local.yaml"), *TINY, *QUIET]
    run_cli("fit", *fp, cwd=tmp_path)
    teacher_run = tmp_path / "runs/ames/embedded_local/version_0"
    val = metrics(teacher_run)
    # the global ranking and the re-ranked one side by side, with the fusion tuned on val and the memory
    assert {"val/embedded_local/global/mAP@100", "val/embedded_local/mAP@100"} <= val.keys()
    assert val["val/embedded_local/bytes_per_image"] == 64 * 4 + 64 * 256
    tuned = json.loads((teacher_run / "fusion.json").read_text())[-1]
    assert tuned["tuned_on"] == "val/embedded_local" and val["val/embedded_local/fusion_lambda"] == tuned["lambda"]

    # the pairs split over two processes give the same numbers as one (both validations land in the teacher's run)
    checkpoint = ["--ckpt_path", str(teacher_run / "checkpoints/last.ckpt"), "--trainer.accelerator=cpu"]

    def validate_on_one_then_two_processes():
        validated = []
        for processes in (["--trainer.devices=1"], ["--trainer.devices=2", "--trainer.strategy=ddp"]):
            run_cli("validate", *fp, *checkpoint, *processes, cwd=tmp_path)
            validated.append(read_run(teacher_run, "val", "checkpoints/last.ckpt").metrics)
        return validated

    # the distilled binary student of that teacher, then test: the curve over (L_q, L_x), fusion from its checkpoint.
    # Its runs (their own run directory; they only read the teacher's) go on while the teacher is validated: the runs
    # are mostly start-up. On one thread, so that the two cores are not oversubscribed (nothing compares its numbers
    # with another run's).
    distilled = ["--config", str(CONFIGS / "ames/embedded_local_distilled.yaml"), *TINY, *QUIET]
    with ThreadPoolExecutor(1) as pool:
        validations = pool.submit(validate_on_one_then_two_processes)
        run_cli("fit", *distilled, cwd=tmp_path, env=ONE_THREAD)
        run_cli("test", *distilled, cwd=tmp_path, env=ONE_THREAD)
        validated = validations.result()
    student_run = tmp_path / "runs/ames_distilled/embedded_local/version_0"
    tested = metrics(student_run, "test")
    assert tested["test/embedded_local/bytes_per_image@q64x8"] == 64 * 4 + 8 * 16
    assert tested["test/embedded_local/fusion_lambda"] == metrics(student_run)["val/embedded_local/fusion_lambda"]
    assert {"test/embedded_local/mAP@100@q64x16", "test/embedded_local/global/mAP@100"} <= tested.keys()

    one, two = json.loads((teacher_run / "fusion.json").read_text())[-2:]
    assert one == two
    assert validated[0] == validated[1] and "val/embedded_local/mAP@100@q64x8" in validated[0]


def test_a_published_model_file_is_evaluated_as_this_framework_s_ames(tmp_path):
    from test_ames_nn import SMALL, ames_reference

    reference = ames_reference.AMESReference(8, **SMALL).eval()
    torch.save({"state": reference.state_dict(), "epoch": 15}, tmp_path / "dinov2_ames.pt")
    module = AMES(published_checkpoint=str(tmp_path / "dinov2_ames.pt"), num_layers=SMALL["num_layers"]).eval()
    batch = triplet_batch(dim=8)
    query, database = batch["local"][:, 0], batch["local"][:, 1]
    with torch.no_grad():
        expected = reference(*split_locals(query), *split_locals(database))
        assert torch.allclose(module.score_pairs(None, query, None, database), expected, atol=1e-5)
    with pytest.raises(ValueError, match="holds a full-precision AMES but binary=True"):
        AMES(published_checkpoint=str(tmp_path / "dinov2_ames.pt"), binary=True)


class OneProcessTest:
    world_size, is_global_zero, global_rank, default_root_dir = 1, True, 0, "."

    class state:  # noqa: N801
        fn = "test"

    class strategy:  # noqa: N801
        broadcast = staticmethod(lambda value, src=0: value)


def test_a_database_stored_as_packed_bits_of_the_binary_model_reranks_exactly_as_its_descriptors(tmp_path):
    """The compressed store (16 B per database descriptor, PQ-coded globals) read back as the binary model's codes
    gives the re-ranking of the float store, at the memory it really takes."""
    import numpy as np

    from callbacks.reranking_stage import rerank_eval_sets
    from datamodules.feature_store import LabelledFeatureStores
    from retrieval.feature_store import FeatureStore, compress_feature_store, write_feature_store

    rng = np.random.default_rng(0)
    for name, n in (("query", 6), ("database", 300)):
        local = np.zeros((n, 10, 5 + 8), dtype=np.float32)
        local[..., 5:] = rng.standard_normal((n, 10, 8))
        local[:, 8:, 3] = 1
        global_ = rng.standard_normal((n, 16)).astype(np.float32)
        write_feature_store(
            tmp_path / f"{name}.h5", [str(i) for i in range(n)], global_, local, labels=np.arange(n) % 3
        )
    torch.manual_seed(0)
    module = small_ames(binary=True, shortlist=20, query_locals=10, database_locals=10, tune_fusion=False).eval()
    compress_feature_store(
        tmp_path / "database.h5",
        tmp_path / "database_1kb.h5",
        global_pq_sub_dim=4,
        keep_float_global=True,
        local_projection=module.binary_projection(),
    )
    compressed = FeatureStore(tmp_path / "database_1kb.h5")
    assert compressed.local_encoding == "binary" and compressed.stored_bytes_per_image(num_locals=10) == 4 + 10 * 16
    results = {}
    for database in ("database.h5", "database_1kb.h5"):
        data = LabelledFeatureStores(
            test_query=str(tmp_path / "query.h5"), test_database=str(tmp_path / database), local_descriptors=True
        )
        gathered = {
            name: F.normalize(
                torch.from_numpy(np.asarray(FeatureStore(tmp_path / file).global_descriptors(quantized=False))), dim=-1
            ).numpy()
            for name, file in (("features/query", "query.h5"), ("features/database", "database.h5"))
        }
        results[database] = rerank_eval_sets(OneProcessTest(), module, data.eval_sets("test"), "test", gathered)
    float_store, bits_store = results["database.h5"], results["database_1kb.h5"]
    assert float_store.pop("test/features/bytes_per_image") == 16 * 4 + 10 * 16
    assert bits_store.pop("test/features/bytes_per_image") == 4 + 10 * 16  # PQ4 global: 4 codes of 1 byte
    assert float_store == bits_store
    assert float_store["test/features/mAP@100"] != float_store["test/features/global/mAP@100"]


def test_rrt_trains_on_the_same_triplets_and_scores_pairs_from_globals_locals_and_scales():
    from lightning_modules.rrt import RRT

    torch.manual_seed(0)
    module = RRT(local_dim=8, global_dim=4, num_layers=1, ffn_dim=32, train_locals=6)
    batch = triplet_batch()
    batch["local"][..., 2] = torch.randint(0, 7, batch["local"].shape[:-1]).float()  # scale indices
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and module.network is not None
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    module.eval()
    global_, local = batch["embedding"], batch["local"]
    logits = module.score_pairs(global_[:, 0], local[:, 0], global_[:, 1], local[:, 1])
    # padding rows carry no information: changing them leaves the logits as they are
    changed = local.clone()
    changed[:, :, -2:, 5:] = 100.0
    again = module.score_pairs(global_[:, 0], changed[:, 0], global_[:, 1], changed[:, 1])
    assert logits.shape == (4,) and torch.allclose(logits, again, atol=1e-5)
    with pytest.raises(ValueError, match="RRT reads local descriptors, not binary codes"):
        module.score_pairs(global_[:, 0], local[:, 0], global_[:, 1], local[:, 1], "binary")
