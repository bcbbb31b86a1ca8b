"""The spatial-context method as a module: its label map and classifier through a checkpoint, its training step,
and the ablation's variants through the command line on a tiny generated landmark benchmark: fit on the GLDv2
layout, test on it and on the Revisited-layout split. (Its evaluation on 1 and 2 processes alike:
tests/test_ddp_methods.py.)"""

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli_command

from lightning_modules.base import MODEL_CLASS_KEY, load_frozen_module
from lightning_modules.nn.margin_heads import ContiguousLabels
from lightning_modules.spatial_context import SpatialContextRetrieval

sys.path.insert(0, str(REPO / "benchmarks"))
import cli_runs  # noqa: E402
import spatial_context_ablation  # noqa: E402

CONFIGS = REPO / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
SMALL_POOLING = {"num_nodes": 3, "num_neighbors": 2, "kernel_dim": 8}


def small_module(**kwargs) -> SpatialContextRetrieval:
    return SpatialContextRetrieval("resnet18", pretrained=False, embedding_dim=16, pooling=SMALL_POOLING, **kwargs)


def test_the_label_map_and_classifier_survive_a_checkpoint(tmp_path):
    module = small_module()
    module._build_head(ContiguousLabels(torch.tensor([42, 5, 17, 5, 42])))
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "model.ckpt")

    loaded = load_frozen_module(tmp_path / "model.ckpt")
    assert isinstance(loaded, SpatialContextRetrieval) and loaded.hparams.num_classes == 3
    assert loaded.label_map.dataset_labels.tolist() == [5, 17, 42]
    assert loaded.label_map.encode(torch.tensor([17, 42, 5])).tolist() == [1, 2, 0]
    assert torch.equal(loaded.classifier.weight, module.classifier.weight)
    images = {"image": torch.rand(2, 3, 64, 64)}
    with torch.no_grad():
        assert torch.allclose(loaded.embed(images), module.eval().embed(images), atol=1e-6)


def test_a_training_step_is_arcface_cross_entropy_on_the_remapped_labels():
    module = small_module(head="arcface", margin=0.2, scale=10.0)
    module._build_head(ContiguousLabels(torch.tensor([7, 9])))
    batch = {"image": torch.rand(4, 3, 64, 64), "label": torch.tensor([9, 7, 9, 9])}
    module.log_dict = lambda *args, **kwargs: None  # no trainer attached
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        descriptors = module.embed(batch)
        cosine = descriptors @ torch.nn.functional.normalize(module.classifier.weight, dim=1).T
        classes = torch.tensor([1, 0, 1, 1])
        theta = torch.acos(cosine.clamp(-1, 1))
        target = torch.cos(theta + 0.2).gather(1, classes[:, None])
        logits = cosine.scatter(1, classes[:, None], target) * 10.0
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, classes), atol=1e-5)
    loss.backward()
    assert module.pooling.smoothing.kernel_generator.weight.grad.abs().sum() > 0
    assert next(module.backbone.parameters()).grad is not None


@pytest.mark.slow
def test_ablation_trains_variants_through_the_cli_and_tests_them_on_both_layouts(tmp_path, monkeypatch):
    tiny = [
        "--data.init_args.root=generated",
        "--data.init_args.spec.image_size=64",
        "--data.init_args.spec.train_landmarks=6",
        "--data.init_args.spec.train_images_per_landmark=4",
        "--data.init_args.spec.query_landmarks=3",
        "--data.init_args.spec.index_distractor_landmarks=2",
        "--data.init_args.spec.revisited_landmarks=2",
        "--data.init_args.spec.revisited_distractor_landmarks=2",
        "--trainer.max_epochs=1",
        "--data.init_args.batch_size=8",
    ]
    # Plain GeM and the full model side by side (the default pooling is the full model, so plain GeM's test
    # also checks that a variant's pooling comes back from its checkpoint); the benchmark is drawn once.
    monkeypatch.chdir(tmp_path)
    # The script's commands, each in a new process as the script starts them, forked from one that has imported
    # torch and Lightning instead of a new interpreter (test_the_scripts_command_runner_... runs the real one).
    monkeypatch.setattr(cli_runs, "run_command", run_cli_command)
    variants = ["plain_gem", "learnable_smoothing_gcn"]
    ablation = ["--variants", *variants, "--parallel", "2", "--objective-batches", "1", "--", *tiny, *QUIET]
    results = {r["variant"]: r for r in spatial_context_ablation.main(["--output", "ablation", *ablation])}
    assert list(results) == variants and (tmp_path / "ablation/ablation.md").is_file()
    for result in results.values():
        metrics = {**result["val"], **result["test"]}
        expected = ["val/generated_landmarks/public/mAP@100", "test/generated_landmarks/private/mAP@100"]
        expected += ["test/rlandmarks/medium/mAP", "test/rlandmarks/hard/mAP"]
        assert all(0 <= metrics[key] <= 1 for key in expected), metrics
        assert result["train_objective"]["images"] == 8 and result["train_objective"]["loss"] > 0
        # the localisation check of the Revisited-layout test, on every map the variant has
        maps = {k.split("/")[3] for k in metrics if k.startswith("test/rlandmarks/localisation/")}
        assert maps == ({"backbone"} if result["variant"] == "plain_gem" else {"backbone", "smoothed", "refined"})
        assert (Path(result["run"]) / "localisation/test/rlandmarks.json").is_file()
    assert results["plain_gem"]["val"] != results["learnable_smoothing_gcn"]["val"]
    pooling = {v: load_frozen_module(Path(r["run"]) / r["checkpoint"]).pooling for v, r in results.items()}
    assert isinstance(pooling["plain_gem"].smoothing, torch.nn.Identity) and pooling["plain_gem"].refinement is None
    assert pooling["learnable_smoothing_gcn"].refinement is not None

    run = Path(results["learnable_smoothing_gcn"]["run"])
    checkpoint = run / results["learnable_smoothing_gcn"]["checkpoint"]
    assert MODEL_CLASS_KEY in torch.load(checkpoint, map_location="cpu", weights_only=True)


def test_the_scripts_command_runner_returns_the_exit_code_and_appends_both_streams_to_the_log(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("earlier\n")
    script = "import sys; print('out', flush=True); sys.stderr.write('err'); sys.exit(3)"
    with open(log, "a") as output:
        assert cli_runs.run_command([sys.executable, "-c", script], dict(os.environ), output) == 3
    assert log.read_text() == "earlier\nout\nerr"
