"""ASMK / ASMK* as a pair re-ranker: the batched torch kernel against the numpy reference of
:mod:`retrieval.asmk`, the re-ranker module, the codebook command, and validate + test through the command line
on a tiny embedded local-descriptor benchmark."""

import json

import numpy as np
import pytest
import torch
from conftest import REPO

from lightning_modules import run_directory
from lightning_modules.asmk_reranker import AsmkReranker
from lightning_modules.cli import main as cli_main
from lightning_modules.nn.asmk import AsmkKernel, assign_words, distinct_sets
from reporting.run_results import read_run
from retrieval.asmk import aggregate_asmk, kernel_similarities
from retrieval.codebook import Codebook, main, sample_store_descriptors
from retrieval.feature_store import write_feature_store

CONFIG = REPO / "configs/asmk/embedded_local.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
# The AMES tests' tiny benchmark: 40 training objects (160 images), 12 per evaluation split.
TINY_SPEC = {"train_objects": 40, "eval_objects": 12}


def random_sets(rng, count, length, dim, padding=0.3):
    """``count`` sets of ``length`` rows, a random share of them padding; set 0 is padding only."""
    descriptors = rng.standard_normal((count, length, dim)).astype(np.float32)
    pad = rng.random((count, length)) < padding
    pad[0] = True
    return descriptors, pad


def numpy_images(codebook, descriptors, pad, assignments, binary):
    return [
        aggregate_asmk(d[~p], codebook.assign(d[~p], assignments), codebook.centroids, binary)
        for d, p in zip(descriptors, pad)
    ]


@pytest.mark.parametrize("binary", [False, True], ids=["asmk", "asmk_star"])
@pytest.mark.parametrize("normalisation", ["word_counts", "none"])
@pytest.mark.parametrize("assignments", [1, 3])
def test_batched_kernel_equals_the_numpy_kernel_for_every_pair(binary, normalisation, assignments):
    rng = np.random.default_rng(0)
    codebook = Codebook(rng.standard_normal((24, 16)).astype(np.float32))
    queries, query_pad = random_sets(rng, 5, 10, 16)
    database, database_pad = random_sets(rng, 7, 12, 16)
    database[1:4, :5] = queries[1:4, :5] + 0.2 * rng.standard_normal((3, 5, 16))  # pairs that share words
    expected = kernel_similarities(
        numpy_images(codebook, queries, query_pad, assignments, binary),
        numpy_images(codebook, database, database_pad, 1, binary),
        normalisation=normalisation,
    )
    # every (query, database) pair in one batch: each query repeated over the database, as in a shortlist
    rows, columns = np.divmod(np.arange(5 * 7), 7)
    kernel = AsmkKernel(
        torch.from_numpy(codebook.centroids),
        binary=binary,
        query_assignments=assignments,
        normalisation=normalisation,
    )
    got = kernel(
        torch.from_numpy(queries[rows]),
        torch.from_numpy(query_pad[rows]),
        torch.from_numpy(database[columns]),
        torch.from_numpy(database_pad[columns]),
    )
    assert got.dtype == torch.float32 and expected[1:4, 1:4].diagonal().min() > 0
    np.testing.assert_allclose(got.numpy().reshape(5, 7), expected, rtol=1e-5, atol=1e-6)
    assert not got.reshape(5, 7)[0].any() and not got.reshape(5, 7)[:, 0].any()  # no descriptor: 0


def test_word_assignment_is_the_codebook_s_nearest_words_and_ignores_padding():
    rng = np.random.default_rng(1)
    codebook = Codebook(rng.standard_normal((50, 8)).astype(np.float32))
    descriptors, pad = random_sets(rng, 4, 30, 8)
    words = assign_words(torch.from_numpy(descriptors), torch.from_numpy(pad), torch.from_numpy(codebook.centroids), 5)
    valid = ~pad
    np.testing.assert_array_equal(words.numpy()[valid], codebook.assign(descriptors[valid], 5))
    assert not words.numpy()[pad].any()


def test_each_distinct_set_of_a_batch_is_aggregated_once():
    descriptors = torch.randn(6, 4, 3)
    padding = torch.zeros(6, 4, dtype=torch.bool)
    descriptors[[2, 4]] = descriptors[0].clone()
    descriptors[5], padding[5, 3] = descriptors[0].clone(), True  # the same values, one more padding row: another set
    (distinct, distinct_padding), rows = distinct_sets(descriptors, padding)
    assert len(distinct) == 4 and rows[0] == rows[2] == rows[4] and len(set(rows[[0, 1, 3, 5]].tolist())) == 4
    assert torch.equal(distinct[rows], descriptors) and torch.equal(distinct_padding[rows], padding)


def stored_layout(descriptors, pad):
    """Rows in the stores' ``[N, L, 5 + D]`` layout (x, y, scale, pad, weight, descriptor...)."""
    local = np.zeros((*descriptors.shape[:2], 5 + descriptors.shape[2]), dtype=np.float32)
    local[..., 3] = pad
    local[..., 5:] = descriptors
    return torch.from_numpy(local)


def test_the_reranker_scores_stored_rows_with_its_kernel_and_counts_its_memory(tmp_path):
    rng = np.random.default_rng(3)
    codebook = Codebook(rng.standard_normal((40, 16)).astype(np.float32))
    codebook.save(tmp_path / "codebook.npy")
    queries, query_pad = random_sets(rng, 6, 10, 16)
    database, database_pad = random_sets(rng, 6, 10, 16)
    module = AsmkReranker(codebook_path=str(tmp_path / "codebook.npy"), query_assignments=2)
    logits = module.score_pairs(None, stored_layout(queries, query_pad), None, stored_layout(database, database_pad))
    kernel = AsmkKernel(torch.from_numpy(codebook.centroids), binary=True, query_assignments=2)
    expected = kernel(*(torch.from_numpy(a) for a in (queries, query_pad, database, database_pad)))
    torch.testing.assert_close(logits, expected)
    assert module.method_name == "ASMK*"
    # per database descriptor at most one word: a 2-byte word id and d / 8 bytes of signs (ASMK*) or d float32
    assert module.database_bytes_per_image(64, global_bytes=256) == 256 + 64 * (2 + 2)
    module = AsmkReranker(codebook_path=str(tmp_path / "codebook.npy"), binary=False)
    assert module.database_bytes_per_image(64, global_bytes=256) == 256 + 64 * (2 + 64) and module.method_name == "ASMK"
    with pytest.raises(ValueError, match="nothing to train"):
        module.setup("fit")
    with pytest.raises(ValueError, match="cannot read binary database codes"):
        module.score_pairs(
            None, stored_layout(queries, query_pad), None, stored_layout(database, database_pad), "binary"
        )
    with pytest.raises(FileNotFoundError, match="python -m retrieval.codebook"):
        AsmkReranker(codebook_path=str(tmp_path / "missing.npy")).setup("validate")


def test_the_codebook_command_trains_on_sampled_non_padding_descriptors(tmp_path, capsys):
    rng = np.random.default_rng(4)
    stores = []
    for name, count in (("a", 30), ("b", 20)):
        descriptors, pad = random_sets(rng, count, 8, 6)
        descriptors[pad] = 1000.0  # padding rows hold values no word may come from
        write_feature_store(
            tmp_path / f"{name}.h5", [f"{name}{i}" for i in range(count)], None, stored_layout(descriptors, pad)
        )
        stores.append(str(tmp_path / f"{name}.h5"))
    valid = sample_store_descriptors(stores, 10_000)
    assert valid.shape[1] == 6 and np.abs(valid).max() < 100  # every non-padding row of both stores, none else
    sample = sample_store_descriptors(stores, 100, seed=7)
    assert len(sample) == 100 and len({row.tobytes() for row in sample} - {row.tobytes() for row in valid}) == 0
    np.testing.assert_array_equal(sample, sample_store_descriptors(stores, 100, seed=7))
    assert not np.array_equal(sample, sample_store_descriptors(stores, 100, seed=8))

    output = tmp_path / "words/codebook.npy"
    main(["--stores", *stores, "--size", "8", "--output", str(output), "--max-descriptors", "100", "--seed", "7"])
    assert "training 8 words on 100 local descriptors of 6 dimensions" in capsys.readouterr().out
    codebook = Codebook.load(output)
    assert codebook.centroids.shape == (8, 6) and np.abs(codebook.centroids).max() < 100
    np.testing.assert_array_equal(codebook.centroids, Codebook.train(sample, 8, seed=7).centroids)
    assert sorted(p.name for p in output.parent.iterdir()) == ["codebook.npy"]  # written atomically

    write_feature_store(tmp_path / "global.h5", ["x", "y"], rng.standard_normal((2, 4)))
    with pytest.raises(SystemExit):
        main(["--stores", str(tmp_path / "global.h5"), "--size", "2", "--output", str(tmp_path / "none.npy")])
    assert "holds no local descriptors" in capsys.readouterr().err and not (tmp_path / "none.npy").exists()


@pytest.mark.slow
def test_asmk_reranking_through_the_cli_beats_the_global_ranking(tmp_path, monkeypatch):
    """The codebook command on the training split, then validate (tunes the fusion) and test (applies it) in one
    pinned run directory."""
    from datamodules.embedded_local import EmbeddedLocalBenchmarkSpec, generate_embedded_local_benchmark

    root = generate_embedded_local_benchmark(tmp_path / "data/embedded_local", EmbeddedLocalBenchmarkSpec(**TINY_SPEC))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    main(["--stores", str(root / "train.h5"), "--size", "128", "--output", str(root / "codebook_128.npy")])
    arguments = [
        "--config",
        str(CONFIG),
        *[f"--data.init_args.spec.{key}={value}" for key, value in TINY_SPEC.items()],
        "--model.init_args.codebook_path=data/embedded_local/codebook_128.npy",
        "--model.init_args.shortlist=20",
        "--model.init_args.eval_local_sizes=[[64,16]]",
        *QUIET,
    ]
    run = tmp_path / "runs/asmk/embedded_local/version_0"
    monkeypatch.setenv("RETRIEVAL_RUN_DIR", str(run))
    monkeypatch.chdir(tmp_path)
    for subcommand in ("validate", "test"):
        # as two commands would: the pinned directory is the user's, not one this process exported
        monkeypatch.setattr(run_directory, "_exported", None)
        cli_main([subcommand, *arguments])

    val, test = read_run(run, "val", "best").metrics, read_run(run, "test", "best").metrics
    tuned = json.loads((run / "fusion.json").read_text())[-1]
    assert tuned["tuned_on"] == "val/embedded_local" and tuned["lambda"] < 1  # the kernel takes part
    for stage, metrics in (("val", val), ("test", test)):
        assert metrics[f"{stage}/embedded_local/fusion_lambda"] == tuned["lambda"]
        assert metrics[f"{stage}/embedded_local/fusion_gamma"] == tuned["gamma"]
        assert metrics[f"{stage}/embedded_local/bytes_per_image@q64x16"] == 64 * 4 + 16 * (2 + 8)
        assert f"{stage}/embedded_local/mAP@100@q64x16" in metrics
    # Tuned on val, so val can only gain; by a clear margin here (0.70 -> 0.83), and on test with val's fusion.
    assert val["val/embedded_local/mAP@100"] > val["val/embedded_local/global/mAP@100"] + 0.05
    assert test["test/embedded_local/mAP@100"] > test["test/embedded_local/global/mAP@100"]
    assert json.loads((run / "run.json").read_text())["inputs"]["codebook"]["sha256"]
