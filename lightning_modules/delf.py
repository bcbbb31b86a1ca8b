"""DELF local features (Noh et al., ICCV 2017), the local features of Detect-to-Retrieve, trained on images.

A timm CNN cut at a mid stage (``feature_layer``: ResNet-50's ``layer3`` = conv4_x, stride 16, 1024 channels),
an attention head on its map (:class:`~lightning_modules.nn.delf.DelfAttention`: 1x1 convolutions, softplus
scores), and two linear classifiers over the training landmarks, each trained with cross-entropy:

* the *descriptor* classifier on the average-pooled feature map (DELF's first stage, descriptor fine-tuning);
* the *attention* classifier on the attention-pooled, L2-normalised features
  (:func:`~lightning_modules.nn.delf.attention_pool`), which is what trains the attention.

``stage`` chooses what is trained, DELF's two stages or both at once:

* ``finetune``: the backbone (less ``freeze_blocks``) and the descriptor classifier; the attention is untouched.
* ``attention``: the attention head and its classifier, the backbone frozen (no gradients, BatchNorm statistics
  frozen), usually from a ``finetune`` run's weights (``init_checkpoint``).
* ``joint`` (default): both losses in one run, ``descriptor + attention_loss_weight x attention``; the attention
  sees the feature map detached, so its loss never moves the backbone (the TF2 DELF / DELG training code).

Local features (``predict``): :func:`~lightning_modules.nn.delf.multiscale_local_features` over the image pyramid
``scales`` (default DELF's seven, 0.25 to 2), candidates below ``attention_threshold`` dropped, the top
``num_local`` by attention score kept, then :class:`~lightning_modules.nn.delf.LocalPCA` to ``projection_dim``.
Rows ``x, y, scale, pad, weight, desc`` as :class:`~lightning_modules.extraction.FeatureExtractor` writes them
(``scale`` = index into ``scales``, ``weight`` = attention score, ``x, y`` = receptive-field centre in original
image pixels), so :class:`~callbacks.prediction_writer.PredictionWriter` writes feature stores.

**The PCA** is fitted during ``fit``, in the stages that train the attention (``attention``, ``joint``): before
each validation that follows training (and at the end of each training epoch that has no validation), one pass
over ``pca_images`` training images (seeded, without augmentation, each process a block of them) selects their
local features as ``predict`` would and fits the PCA on them (moments summed over processes). The projection is
in buffers, so every checkpoint - best or last - carries the PCA of its own weights; ``predict`` with an unfitted
projection (e.g. a ``finetune`` checkpoint) is refused. ``projection_dim: null`` writes the unprojected
L2-normalised descriptors.

The global descriptor (:meth:`embed`, for the shared validation/test evaluation and the stores' global rows) is
the attention-pooled feature, L2-normalised, at the input resolution (``finetune``: the plain mean of the
L2-normalised features, the attention being untrained). It monitors training; DELF itself is a local feature.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from datamodules.sampling import contiguous_block
from lightning_modules.base import ClassifiesTrainingLabels, LRSchedule, RetrievalModule, sum_over_processes
from lightning_modules.nn.backbones import FeatureMapBackbone
from lightning_modules.nn.delf import DELF_SCALES, DelfAttention, LocalPCA, attention_pool, multiscale_local_features
from lightning_modules.nn.margin_heads import ContiguousLabels
from lightning_modules.run_directory import RUN_FILE, best_checkpoint, record_input
from retrieval.diagnostics import RunningMoments

Stage = Literal["finetune", "attention", "joint"]
STAGES = ("finetune", "attention", "joint")
#: The entries an ``init_checkpoint`` provides.
INITIALISED = ("backbone.", "attention.")


class DelfLocalFeatures(ClassifiesTrainingLabels, RetrievalModule):
    """DELF: a mid-stage CNN feature map, attention scores, multi-scale top-N local features (module docstring).

    Args:
        backbone: a timm CNN name or short name (see :data:`lightning_modules.nn.backbones.BACKBONES`).
        feature_layer: the stage whose map gives the features (timm ``feature_info`` module name or index;
            ResNets: ``layer3`` = conv4_x, stride 16, as in DELF).
        pretrained, checkpoint_path, model_kwargs: where the backbone's weights come from, as for
            :class:`~lightning_modules.extraction.FeatureExtractor` (hub, local timm weights file, or random).
        init_checkpoint: a checkpoint of this module (a ``.ckpt`` file, or a finished run directory for its best
            checkpoint) whose backbone and attention weights start the ``fit`` (e.g. the ``finetune`` run for the
            ``attention`` stage); read at ``fit`` only, recorded with its SHA-256 in ``run.json``.
        stage: ``finetune``, ``attention`` or ``joint`` (module docstring).
        freeze_blocks, channels_last, grad_checkpointing: see :class:`~lightning_modules.nn.backbones.FeatureMapBackbone`
            (``attention`` freezes the whole backbone whatever ``freeze_blocks`` says).
        attention_hidden, attention_kernel_size, attention_batch_norm: the attention head (DELF: 512, 1, none).
        attention_loss_weight: weight of the attention loss in ``joint``.
        num_local: local features kept per image (DELF: 1000).
        scales: the image pyramid (DELF: 0.25, 0.3536, 0.5, 0.7071, 1, 1.4142, 2).
        attention_threshold: candidates with a lower attention score are dropped (``None``: none; DELF's released
            model: 100, a value of its own score range).
        projection_dim: dimension of the PCA projection of the local descriptors (DELF / D2R: 128); ``None``: no
            projection. whiten: PCA-whitening (D2R's released DELF config: no whitening).
        pca_images: training images whose local features fit the PCA; pca_seed: their draw.
        num_classes: set from the training labels at ``fit`` (and saved); needed only to rebuild a module without
            its checkpoint.
        lr, weight_decay, lr_schedule: AdamW and its schedule; ``head_lr_scale`` multiplies the learning rate of the
            attention head and the classifiers against the backbone's.
    """

    method_name = "DELF"

    def __init__(
        self,
        backbone: str = "resnet50",
        feature_layer: str | int = "layer3",
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        model_kwargs: dict | None = None,
        init_checkpoint: str | None = None,
        stage: Stage = "joint",
        freeze_blocks: int = 0,
        channels_last: bool = False,
        grad_checkpointing: bool = False,
        attention_hidden: int = 512,
        attention_kernel_size: int = 1,
        attention_batch_norm: bool = False,
        attention_loss_weight: float = 1.0,
        num_local: int = 1000,
        scales: Sequence[float] = DELF_SCALES,
        attention_threshold: float | None = None,
        projection_dim: int | None = 128,
        whiten: bool = False,
        pca_images: int = 1000,
        pca_seed: int = 0,
        num_classes: int | None = None,
        lr: float = 1e-4,
        head_lr_scale: float = 10.0,
        weight_decay: float = 1e-4,
        lr_schedule: LRSchedule = "cosine",
    ):
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if num_local < 1:
            raise ValueError(f"num_local must be at least 1, got {num_local}")
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive factors, got {list(scales)}")
        self.save_hyperparameters()
        self.backbone = FeatureMapBackbone(
            backbone,
            freeze_blocks=freeze_blocks,
            channels_last=channels_last,
            grad_checkpointing=grad_checkpointing,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            model_kwargs=model_kwargs,
            feature_layer=feature_layer,
        )
        if self.backbone.is_vit:
            raise ValueError("DELF needs a CNN backbone (a feature map with receptive fields), not a ViT")
        if stage == "attention":
            self.backbone.freeze(len(self.backbone.stage_names()))
        channels = self.backbone.out_channels
        self.attention = DelfAttention(channels, attention_hidden, attention_kernel_size, attention_batch_norm)
        if stage == "finetune":
            self.attention.requires_grad_(False)
        self.projection = LocalPCA(channels, projection_dim, whiten) if projection_dim else None
        # Built from the training labels at fit, or from a checkpoint's state dict when loading.
        self.label_map: ContiguousLabels | None = None
        self.descriptor_classifier: nn.Linear | None = None
        self.attention_classifier: nn.Linear | None = None
        if num_classes is not None:
            self._build_head(ContiguousLabels(torch.arange(num_classes)))
        self._projection_stale = False

    @property
    def retrieval_dim(self) -> int:
        return self.backbone.out_channels

    @property
    def local_dim(self) -> int:
        """Dimension of the local descriptors ``predict`` writes."""
        return self.hparams.projection_dim or self.backbone.out_channels

    def _build_head(self, label_map: ContiguousLabels) -> None:
        self.label_map = label_map
        channels, stage = self.backbone.out_channels, self.hparams.stage
        self.descriptor_classifier = nn.Linear(channels, label_map.num_classes)
        self.attention_classifier = nn.Linear(channels, label_map.num_classes)
        # Both always exist (every stage's checkpoint has the same entries); a stage trains the one it uses.
        self.descriptor_classifier.requires_grad_(stage != "attention")
        self.attention_classifier.requires_grad_(stage != "finetune")
        self.hparams.num_classes = label_map.num_classes

    # ---- the model ---------------------------------------------------------------------------------------
    def global_descriptor(self, features: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor:
        """L2-normalised attention pooling of a feature map (``scores=None``: uniform weights)."""
        if scores is None:
            scores = features.new_ones(len(features), *features.shape[2:])
        return F.normalize(attention_pool(features, scores).float(), dim=-1)

    def _scores(self, features: torch.Tensor) -> torch.Tensor | None:
        return None if self.hparams.stage == "finetune" else self.attention(features)

    def embed(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = self.backbone(batch["image"])
        return self.global_descriptor(features, self._scores(features))

    def extract(
        self, pixels: torch.Tensor, to_original: torch.Tensor | None = None, project: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global [B, C], local [B, num_local, 5 + D])`` of images ``[B, 3, H, W]`` in ``[0, 1]``; the local
        descriptors projected when ``project`` and a projection is configured (``D = projection_dim``), else
        L2-normalised features (``D = C``)."""
        hp = self.hparams
        at_input_resolution: list[torch.Tensor] = []

        def features_and_scores(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.backbone(images)
            scores = self.attention(features)
            if images is pixels:  # the pyramid's scale 1
                uniform = hp.stage == "finetune"
                at_input_resolution.append(self.global_descriptor(features, None if uniform else scores))
            return features, scores

        local = multiscale_local_features(
            pixels,
            features_and_scores,
            hp.scales,
            self.backbone.stride,
            hp.num_local,
            hp.attention_threshold,
            to_original,
        )
        global_descriptor = at_input_resolution[0] if at_input_resolution else self.embed({"image": pixels})
        if project and self.projection is not None:
            local = self.projection(local)
        return global_descriptor, local

    # ---- training ------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        stage = self.hparams.stage
        classes = self.label_map.encode(batch["label"])
        if stage == "attention":
            with torch.no_grad():
                features = self.backbone(batch["image"])
        else:
            features = self.backbone(batch["image"])
        terms, logits = {}, None
        if stage != "attention":
            logits = self.descriptor_classifier(features.mean(dim=(2, 3)))
            terms["descriptor_loss"] = F.cross_entropy(logits.float(), classes)
        if stage != "finetune":
            detached = features.detach()
            logits = self.attention_classifier(attention_pool(detached, self.attention(detached)))
            terms["attention_loss"] = F.cross_entropy(logits.float(), classes)
        loss = terms.get("descriptor_loss", 0.0) + self.hparams.attention_loss_weight * terms.get("attention_loss", 0.0)
        self.stop_if_not_finite(loss, terms)
        # Accuracy of the classifier the stage ends with (the attention's, unless only fine-tuning).
        accuracy = (logits.argmax(dim=1) == classes).float().mean()
        logged = {"train/loss": loss, "train/accuracy": accuracy, **{f"train/{k}": v for k, v in terms.items()}}
        self.log_dict(logged, prog_bar=True, batch_size=len(classes))
        self._projection_stale = True
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        heads = [self.attention, self.descriptor_classifier, self.attention_classifier]
        new_layers = [p for m in heads for p in m.parameters() if p.requires_grad]
        backbone = [p for p in self.backbone.parameters() if p.requires_grad] if hp.stage != "attention" else []
        groups = [{"params": backbone, "lr": hp.lr}, {"params": new_layers, "lr": hp.lr * hp.head_lr_scale}]
        return self.build_optimizer(hp.lr, hp.weight_decay, hp.lr_schedule, [g for g in groups if g["params"]])

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.hparams.init_checkpoint:
            self._load_initial_weights(self.hparams.init_checkpoint)

    def _load_initial_weights(self, path: str) -> None:
        candidate = Path(path)
        if candidate.is_dir() and (candidate / RUN_FILE).is_file():
            candidate = best_checkpoint(candidate) or candidate
        if not candidate.is_file():
            raise FileNotFoundError(
                f"init_checkpoint {path}: no such checkpoint (a .ckpt file, or a finished run directory)"
            )
        state = torch.load(candidate, map_location="cpu", weights_only=True).get("state_dict", {})
        own = {k: v for k, v in self.state_dict().items() if k.startswith(INITIALISED)}
        missing = [k for k in own if k not in state]
        mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or mismatched:
            raise ValueError(
                f"init_checkpoint {candidate} does not fit this model ({len(missing)} missing entries, e.g. "
                f"{(missing or [''])[0]!r}; {len(mismatched)} of another shape, e.g. {(mismatched or [''])[0]!r}): "
                "use a checkpoint of DelfLocalFeatures with the same backbone, feature_layer and attention"
            )
        self.load_state_dict({k: state[k] for k in own}, strict=False)
        digest = record_input("init_checkpoint", candidate)
        rank_zero_info(f"DELF: backbone and attention from {candidate.resolve()} (sha256 {digest})")

    # ---- the PCA of the local descriptors --------------------------------------------------------------------
    # Lightning validates at the end of an epoch *before* on_train_epoch_end (and saves the checkpoint after the
    # validation), so fit at whichever comes first; both run before the epoch's checkpoint is written.
    def on_validation_epoch_start(self) -> None:
        self._fit_stale_projection()

    def on_train_epoch_end(self) -> None:
        self._fit_stale_projection()

    def _fit_stale_projection(self) -> None:
        if self._projection_stale and self.projection is not None and self.hparams.stage != "finetune":
            if self.hparams.pca_images > 0:
                self.fit_projection()
        self._projection_stale = False

    def fit_projection(self) -> None:
        """Fit the local PCA on ``pca_images`` training images of the trainer's datamodule (module docstring);
        every process must call it."""
        trainer, hp = self.trainer, self.hparams
        datamodule = trainer.datamodule
        if hasattr(datamodule, "dataset") and hasattr(datamodule, "train_list"):
            dataset = datamodule.dataset(datamodule.train_list())  # evaluation resizing, no augmentation
        else:
            dataset = datamodule.train_dataset()
        count = min(hp.pca_images, len(dataset))
        chosen = np.sort(np.random.default_rng(hp.pca_seed).choice(len(dataset), count, replace=False))
        block = contiguous_block(count, trainer.global_rank, trainer.world_size)
        loader = datamodule.sharded_dataloader(dataset, chosen[block.start : block.stop].tolist())
        moments, start, was_training = RunningMoments(self.backbone.out_channels), time.perf_counter(), self.training
        self.eval()
        # Normal (not inference-mode) tensors even when called from a validation hook, so the buffers can be
        # loaded into in place later.
        with torch.inference_mode(False), torch.no_grad(), trainer.precision_plugin.forward_context():
            for batch in loader:
                pixels = batch["image"].to(self.device)
                to_original = batch.get("to_original")
                to_original = None if to_original is None else to_original.to(self.device)
                _, local = self.extract(pixels, to_original, project=False)
                moments.update(local[..., 5:][local[..., 3] == 0])
        self.train(was_training)
        moments.load_tensors(list(map(sum_over_processes(trainer.strategy), moments.tensors())))
        if moments.count < self.hparams.projection_dim:
            raise ValueError(
                f"DELF: {int(moments.count)} local descriptors from {count} training images cannot fit a "
                f"{self.hparams.projection_dim}-d PCA; raise pca_images or num_local, or lower attention_threshold"
            )
        self.projection.fit(moments)
        rank_zero_info(
            f"DELF: local PCA to {hp.projection_dim}-d fitted on {int(moments.count)} descriptors of {count} training "
            f"images ({time.perf_counter() - start:.1f} s)"
        )

    # ---- extraction ----------------------------------------------------------------------------------------
    def on_predict_start(self) -> None:
        if self.projection is not None and not bool(self.projection.fitted):
            raise RuntimeError(
                "DelfLocalFeatures: the local PCA is not fitted. It is fitted by `fit` in the attention and joint "
                "stages: predict with such a checkpoint (--ckpt_path), or set model.init_args.projection_dim=null "
                "for unprojected descriptors"
            )

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        global_descriptor, local = self.extract(batch["image"], batch.get("to_original"))
        return {"index": batch["index"], "embeddings": global_descriptor, "local": local}
