"""Margin-softmax classification heads for training embeddings (ArcFace, CosFace), and the map from dataset
labels to class indices.

Both heads hold one L2-normalised weight vector per class and score an L2-normalised embedding by cosine
similarity; during training the target class's cosine is penalised by a margin before scaling, so the
cross-entropy of the returned logits pushes embeddings of a class together and classes apart by that margin::

    head = ArcFace(embedding_dim, num_classes)
    loss = F.cross_entropy(head(embeddings, classes), classes)

Usual values on Google Landmarks v2 (clean): scale 30 to 64, margin 0.1 to 0.5. DOLG's published GLDv2
configuration (ResNet, 81,313 classes) uses ArcFace with scale 30 and margin 0.15, DELG an ArcFace margin of 0.1
with a learned scale; the face-recognition values (scale 64, margin 0.5) are hard to fit on GLDv2's many classes
of few, noisy images early in training. Defaults here: scale 30, margin 0.15 for both heads (the same gap at
90 degrees, where training from random class weights starts: cos(90 + m) ~ -m).

:class:`ContiguousLabels` turns dataset labels (any integers, e.g. GLDv2 landmark ids) into the classes
``0..n-1`` the heads index, and back; it is a module with a buffer, so the map is saved in checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# sin(theta) = sqrt(1 - cos^2) is clamped away from 0: its derivative is infinite at theta = 0 and pi, and
# torch.where back-propagates through both branches (0 x inf = NaN).
_MIN_SINE_SQUARED = 1e-6


class _CosineHead(nn.Module):
    """Scaled cosine logits with a margin applied to the target class (subclasses define the margin)."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float, margin: float):
        super().__init__()
        if embedding_dim < 1 or num_classes < 1:
            raise ValueError(f"embedding_dim and num_classes must be >= 1, got {embedding_dim}, {num_classes}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.scale, self.margin = float(scale), float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, num_classes]`` cosines between the embeddings and the class weights, in float32 (under autocast
        too: the margin arithmetic near cos = +-1 needs the precision)."""
        embeddings = F.normalize(embeddings.float(), dim=-1)
        weight = F.normalize(self.weight.float(), dim=-1)
        return F.linear(embeddings, weight).clamp(-1.0, 1.0)

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for ``F.cross_entropy``; ``classes`` ``[B]`` (0..num_classes-1) are the
        targets whose cosine gets the margin. Without ``classes``: the scaled cosines, no margin (inference)."""
        cosine = self.cosine(embeddings)
        if classes is None:
            return self.scale * cosine
        target = F.one_hot(classes.long(), self.num_classes).bool()
        return self.scale * torch.where(target, self.target_logit(cosine), cosine)

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, scale={self.scale}, margin={self.margin}"


class ArcFace(_CosineHead):
    """Additive angular margin (Deng et al., CVPR 2019): the target logit is ``s cos(theta + m)``.

    ``cos(theta + m)`` is not monotonic beyond ``theta + m > pi`` (it would reward moving away from the class);
    there the standard implementation (insightface) uses ``cos(theta) - m sin(m)`` instead, the CosFace-like
    continuation: ``cos(theta) > th = cos(pi - m)`` selects ``cos(theta + m)``, else ``cos(theta) - mm`` with
    ``mm = sin(pi - m) m``. ``easy_margin=True`` applies the margin only where ``cos(theta) > 0``.

    Args:
        embedding_dim, num_classes: sizes of the embeddings and of the classifier.
        scale: ``s``, the logits' scale (GLDv2: 30 to 64).
        margin: ``m`` in radians (GLDv2: 0.15 to 0.5; see the module docstring for the default).
        easy_margin: no margin for embeddings more than 90 degrees from their class.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        scale: float = 30.0,
        margin: float = 0.15,
        easy_margin: bool = False,
    ):
        if not 0 <= margin < math.pi / 2:
            raise ValueError(f"ArcFace margin must be in [0, pi/2) radians, got {margin}")
        super().__init__(embedding_dim, num_classes, scale, margin)
        self.easy_margin = easy_margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th = math.cos(math.pi - margin)
        self.mm = math.sin(math.pi - margin) * margin

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        sine = (1.0 - cosine * cosine).clamp(min=_MIN_SINE_SQUARED).sqrt()
        with_margin = cosine * self.cos_m - sine * self.sin_m  # cos(theta + m)
        if self.easy_margin:
            return torch.where(cosine > 0, with_margin, cosine)
        return torch.where(cosine > self.th, with_margin, cosine - self.mm)


class CosFace(_CosineHead):
    """Additive cosine margin (Wang et al., CVPR 2018): the target logit is ``s (cos(theta) - m)``.

    Args:
        embedding_dim, num_classes: sizes of the embeddings and of the classifier.
        scale: ``s``, the logits' scale.
        margin: ``m`` subtracted from the target cosine (the paper: 0.35 for faces; 0.15 here, see the module
            docstring).
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.15):
        if not 0 <= margin < 2:
            raise ValueError(f"CosFace margin must be in [0, 2), got {margin}")
        super().__init__(embedding_dim, num_classes, scale, margin)

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine - self.margin


class ContiguousLabels(nn.Module):
    """Dataset labels (any integers) <-> classes ``0..n-1``, class ``i`` being the ``i``-th smallest label.

    Built from the training labels (repeats allowed); the sorted distinct labels are the buffer
    ``dataset_labels``, saved in the state dict. Loading a state dict built from another label set fails with
    an error that says so (a classifier trained for other classes would otherwise load silently);
    :meth:`from_state_dict` rebuilds the map from a checkpoint alone.
    """

    def __init__(self, labels):
        super().__init__()
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"ContiguousLabels needs integer labels, got {labels.dtype}")
        if not len(labels):
            raise ValueError("ContiguousLabels needs at least one training label")
        self.register_buffer("dataset_labels", torch.unique(labels.long(), sorted=True))

    @classmethod
    def from_state_dict(cls, state_dict: dict, prefix: str = "") -> ContiguousLabels:
        """The map saved under ``prefix`` (e.g. ``"model.label_map."``) in a (checkpoint's) state dict."""
        key = f"{prefix}dataset_labels"
        if key not in state_dict:
            raise KeyError(f"no {key!r} in the state dict: not a ContiguousLabels saved under prefix {prefix!r}")
        return cls(state_dict[key])

    @property
    def num_classes(self) -> int:
        return len(self.dataset_labels)

    def encode(self, labels: torch.Tensor) -> torch.Tensor:
        """Classes ``0..n-1`` of dataset ``labels``; a label absent from the training labels is an error."""
        labels = torch.as_tensor(labels, device=self.dataset_labels.device).long()
        classes = torch.searchsorted(self.dataset_labels, labels).clamp(max=self.num_classes - 1)
        unknown = self.dataset_labels[classes] != labels
        if unknown.any():
            examples = labels[unknown].unique()[:5].tolist()
            raise ValueError(
                f"labels {examples} (of {int(unknown.sum())} examples) are not among the {self.num_classes} "
                "training labels this map was built from"
            )
        return classes

    def decode(self, classes: torch.Tensor) -> torch.Tensor:
        """Dataset labels of classes ``0..n-1``."""
        return self.dataset_labels[torch.as_tensor(classes, device=self.dataset_labels.device).long()]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = f"{prefix}dataset_labels"
        if key in state_dict:
            saved = state_dict[key]
            if saved.shape != self.dataset_labels.shape or not torch.equal(saved.cpu(), self.dataset_labels.cpu()):
                differ = (
                    f"{len(saved)} classes instead of {self.num_classes}"
                    if saved.shape != self.dataset_labels.shape
                    else f"{int((saved.cpu() != self.dataset_labels.cpu()).sum())} of {self.num_classes} labels differ"
                )
                error_msgs.append(
                    f"{key}: the saved label map was built from other training labels than this module's ({differ}); "
                    "build the module from the same training labels, or with ContiguousLabels.from_state_dict"
                )
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"
