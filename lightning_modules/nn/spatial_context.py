"""Spatial context for global descriptors (Seo and Han, KAIST 2024, "Improving Spatial Context of Global
Descriptors for Image Retrieval"; slides only, no public code) as plain torch blocks.

A feature map ``[B, C, H, W]`` becomes an L2-normalised global descriptor through

    map -> smoothing (local context) -> GCN refinement (global context) -> GeM -> whitening (FC) -> L2

* :class:`LearnableSmoothing` (slides "Method 1. Learnable Smoothing" / "Learnable Smoothing Kernel"): a 1x1 conv,
  the *kernel feature generator* g, predicts per position a kernel feature ``f_xy``, a bandwidth ``a_xy`` and a
  self-confidence ``c_xy``; over the K x K neighbourhood the weight is ``c_xy`` at the centre and
  ``exp(-a_xy ||f_xy - f_uv||^2)`` elsewhere, and the output is the normalised weighted average.
  :class:`AverageSmoothing` is the slides' "Smoothing (i.e., AvgPool)" ablation.
* :class:`SpatialContextRefinement` (slides "Method 2. Spatial Context-aware Refinement" / "GNN for Image
  Retrieval"): the top-K positions by a learned score become graph nodes, edges join spatially and/or
  semantically close nodes, and residual GCN blocks propagate messages between them.
* :class:`GeM` and :class:`GlobalHead`: GeM pooling (slides "Related Works - GeM"), a whitening FC layer and L2
  normalisation (the head named in the method notes: "GeM, FC whitening").
* :class:`SpatialContextPooling` composes them per configuration; the ablations (plain GeM, average smoothing,
  learnable smoothing only, GCN only, both) are configurations of it.

Where the slides are silent, the choice made is said at the class that makes it, and is an option there.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nn.backbones import gem

ConfidenceActivation = Literal["softplus", "sigmoid"]
EdgeMode = Literal["spatial", "feature", "both"]
ScoreGate = Literal["sigmoid", "softmax"]
GraphOutput = Literal["write_back", "pool"]
GateTarget = Literal["input", "update"]
Smoothing = Literal["none", "average", "learnable"]
Refinement = Literal["none", "gcn"]


def _check_kernel_size(kernel_size: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")


# -- smoothing --------------------------------------------------------------------------------------------------------


def smoothing_weights(kernel_features: Tensor, bandwidth: Tensor, confidence: Tensor, kernel_size: int) -> Tensor:
    """Unnormalised kernel weights ``[B, K*K, H, W]`` (slide "Learnable Smoothing Kernel")::

        w_xyuv = c_xy                             if (u, v) = (x, y)
                 exp(-a_xy ||f_xy - f_uv||^2)     otherwise

    ``kernel_features`` ``[B, d, H, W]``, ``bandwidth`` and ``confidence`` ``[B, 1, H, W]``. Neighbour ``k``
    is offset ``(k // K - K // 2, k % K - K // 2)`` (row, column), the order of :func:`torch.nn.functional.unfold`.
    Neighbours outside the map (padding) get weight 0, so they count in neither numerator nor denominator.
    """
    _check_kernel_size(kernel_size)
    batch, dim, height, width = kernel_features.shape
    radius, area = kernel_size // 2, kernel_size * kernel_size
    neighbours = F.unfold(kernel_features, kernel_size, padding=radius).view(batch, dim, area, height, width)
    squared_distance = (kernel_features.unsqueeze(2) - neighbours).pow(2).sum(1)  # [B, K*K, H, W]
    weights = torch.exp(-bandwidth * squared_distance)
    is_centre = torch.arange(area, device=weights.device).view(1, area, 1, 1) == area // 2
    weights = torch.where(is_centre, confidence, weights)
    inside = F.unfold(kernel_features.new_ones(1, 1, height, width), kernel_size, padding=radius)
    return weights * inside.view(1, area, height, width)


def weighted_neighbourhood_average(features: Tensor, weights: Tensor, kernel_size: int) -> Tensor:
    """``sum_uv w_xyuv x_uv / sum_uv w_xyuv`` for ``features`` ``[B, C, H, W]`` and ``weights`` ``[B, K*K, H, W]``.

    The sum runs over the K*K shifted views of the zero-padded map instead of ``unfold(features)``: the same
    result without a K*K-fold copy of the C-channel map (e.g. 9 x 2048 values per position for a ResNet).
    """
    _, _, height, width = features.shape
    radius = kernel_size // 2
    padded = F.pad(features, (radius, radius, radius, radius))
    total = torch.zeros_like(features)
    for k in range(kernel_size * kernel_size):
        row, column = divmod(k, kernel_size)
        total = total + weights[:, k : k + 1] * padded[:, :, row : row + height, column : column + width]
    return total / weights.sum(1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)


def smoothing_reference(
    features: Tensor,
    kernel_features: Tensor,
    bandwidth: Tensor,
    confidence: Tensor,
    kernel_size: int,
    residual: bool = False,
) -> Tensor:
    """Plain-loop reference of the learnable smoothing (for tests): one position and one neighbour at a time."""
    batch, channels, height, width = features.shape
    radius = kernel_size // 2
    output = torch.zeros_like(features)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                numerator, denominator = features.new_zeros(channels), features.new_zeros(())
                for v in range(y - radius, y + radius + 1):
                    for u in range(x - radius, x + radius + 1):
                        if not (0 <= v < height and 0 <= u < width):
                            continue  # padding: excluded from numerator and denominator
                        if (v, u) == (y, x):
                            weight = confidence[b, 0, y, x]
                        else:
                            distance = (kernel_features[b, :, y, x] - kernel_features[b, :, v, u]).pow(2).sum()
                            weight = torch.exp(-bandwidth[b, 0, y, x] * distance)
                        numerator = numerator + weight * features[b, :, v, u]
                        denominator = denominator + weight
                output[b, :, y, x] = numerator / denominator
    return features + output if residual else output


class LearnableSmoothing(nn.Module):
    """Learnable smoothing kernel (slides "Method 1": learned neighbour weights, learnable bandwidth, self-confidence).

    The kernel feature generator g is one 1x1 conv ``C -> d + 2``: channels ``[0, d)`` are ``f_xy``, channel ``d``
    is the bandwidth before its activation and ``d + 1`` the self-confidence before its. Weights follow
    :func:`smoothing_weights`; the output is their normalised average over the K x K neighbourhood, padding
    excluded (:func:`weighted_neighbourhood_average`).

    Choices where the slides are silent (each an option):

    * ``a_xy = softplus(.)`` (the method notes say softplus): the Gaussian needs ``a > 0``.
    * ``confidence_activation="softplus"``: the slides write ``c_xy in R`` but a weight must be positive.
      Softplus is unbounded, so the centre can both reject itself (``c -> 0``, "reject when the centre pixel is
      an outlier" / burstiness) and dominate its neighbours (``c >> 1``, close to no smoothing). A sigmoid caps
      ``c`` below 1, i.e. below the weight of an identical neighbour, so the centre can never outweigh one.
    * ``normalize_kernel_features=True``: ``f_xy`` is L2-normalised before the distance, so
      ``||f_xy - f_uv||^2`` lies in ``[0, 4]`` and the bandwidth alone sets the kernel width. On raw ``f`` from
      a randomly initialised 1x1 conv over a 2048-channel map the squared distances are tens, the weights
      ``~0`` and their gradients vanish at the start. ``False`` applies the formula to raw ``f``.
    * ``residual=False``: the output is the smoothed map (the slides' "w/ smoothing" replaces the map). The
      self-confidence already lets a position keep its own feature; a residual would add back the centre the
      confidence is meant to be able to reject. ``True`` returns ``input + smoothed``.

    Args:
        channels: C of the input map.
        kernel_size: K (odd).
        kernel_dim: d, the kernel feature dimension.
        residual: return ``input + smoothed`` instead of ``smoothed``.
        confidence_activation: ``softplus`` or ``sigmoid``.
        normalize_kernel_features: L2-normalise ``f`` before the distance.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        kernel_dim: int = 32,
        residual: bool = False,
        confidence_activation: ConfidenceActivation = "softplus",
        normalize_kernel_features: bool = True,
    ):
        super().__init__()
        _check_kernel_size(kernel_size)
        if kernel_dim < 1:
            raise ValueError(f"kernel_dim must be positive, got {kernel_dim}")
        if confidence_activation not in ("softplus", "sigmoid"):
            raise ValueError(f"confidence_activation must be 'softplus' or 'sigmoid', got {confidence_activation!r}")
        self.kernel_size, self.kernel_dim, self.residual = kernel_size, kernel_dim, residual
        self.confidence_activation = confidence_activation
        self.normalize_kernel_features = normalize_kernel_features
        self.kernel_generator = nn.Conv2d(channels, kernel_dim + 2, kernel_size=1)

    def kernel_parameters(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(f [B, d, H, W], a [B, 1, H, W] > 0, c [B, 1, H, W] > 0)`` predicted from ``features``."""
        generated = self.kernel_generator(features)
        kernel_features, bandwidth, confidence = generated.split([self.kernel_dim, 1, 1], dim=1)
        if self.normalize_kernel_features:
            kernel_features = F.normalize(kernel_features, dim=1)
        activation = F.softplus if self.confidence_activation == "softplus" else torch.sigmoid
        return kernel_features, F.softplus(bandwidth), activation(confidence)

    def weights(self, features: Tensor) -> Tensor:
        """Unnormalised kernel weights ``[B, K*K, H, W]`` (padding = 0), e.g. to inspect the receptive field."""
        return smoothing_weights(*self.kernel_parameters(features), self.kernel_size)

    def forward(self, features: Tensor) -> Tensor:
        smoothed = weighted_neighbourhood_average(features, self.weights(features), self.kernel_size)
        return features + smoothed if self.residual else smoothed


class AverageSmoothing(nn.Module):
    """The slides' "Smoothing (i.e., AvgPool)" ablation: a fixed uniform K x K mean, padding excluded (a border
    position averages only the neighbours inside the map). ``residual`` as in :class:`LearnableSmoothing`."""

    def __init__(self, kernel_size: int = 3, residual: bool = False):
        super().__init__()
        _check_kernel_size(kernel_size)
        self.kernel_size, self.residual = kernel_size, residual

    def forward(self, features: Tensor) -> Tensor:
        smoothed = F.avg_pool2d(
            features, self.kernel_size, stride=1, padding=self.kernel_size // 2, count_include_pad=False
        )
        return features + smoothed if self.residual else smoothed


# -- graph refinement -------------------------------------------------------------------------------------------------


def grid_coordinates(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """``[H * W, 2]`` (x, y) of each position, row-major, each axis mapped to ``[-1, 1]`` (0 on a 1-long axis)."""

    def axis(length: int) -> Tensor:
        return torch.linspace(-1 if length > 1 else 0, 1 if length > 1 else 0, length, device=device, dtype=dtype)

    yy, xx = torch.meshgrid(axis(height), axis(width), indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


def knn_adjacency(distances: Tensor, num_neighbors: int) -> tuple[Tensor, Tensor]:
    """Graph of the ``num_neighbors`` nearest other nodes per node, from ``distances`` ``[B, N, N]``.

    Returns ``(adjacency [B, N, N], neighbor_indices [B, N, k])`` with ``k = min(num_neighbors, N - 1)``:
    each row of the directed graph has its k neighbours plus a self-loop; it is symmetrised by union
    (``max(A, A^T)``) and normalised as ``D^-1/2 A D^-1/2`` (Kipf and Welling), ``D`` the degrees of the
    symmetric binary ``A``.
    """
    batch, nodes, _ = distances.shape
    k = max(0, min(num_neighbors, nodes - 1))
    eye = torch.eye(nodes, dtype=torch.bool, device=distances.device)
    neighbor_indices = distances.masked_fill(eye, math.inf).topk(k, dim=-1, largest=False).indices
    directed = torch.zeros(batch, nodes, nodes, dtype=distances.dtype, device=distances.device)
    directed = directed.scatter(-1, neighbor_indices, 1.0) + eye.to(distances.dtype)
    symmetric = torch.maximum(directed, directed.transpose(1, 2))
    inverse_sqrt_degree = symmetric.sum(-1).rsqrt()
    adjacency = inverse_sqrt_degree.unsqueeze(-1) * symmetric * inverse_sqrt_degree.unsqueeze(-2)
    return adjacency, neighbor_indices


class GCNBlock(nn.Module):
    """Residual graph convolution ``X + ReLU(LayerNorm(A X W))`` (slides "Each GCN propagates messages to next
    block"; residual and LayerNorm are the method notes' "residual GCN layers", ReLU as in Kipf and Welling)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)  # a bias before LayerNorm would be removed by it
        self.norm = nn.LayerNorm(dim)

    def forward(self, nodes: Tensor, adjacency: Tensor) -> Tensor:
        return nodes + F.relu(self.norm(adjacency @ self.linear(nodes)))


class GraphRefinementOutput(NamedTuple):
    """What :class:`SpatialContextRefinement` returns.

    ``features``: the map ``[B, C, H, W]`` with refined nodes written back (``write_back``) or the refined node
    features ``[B, N, C]`` (``pool``); ``node_indices`` ``[B, N]``: row-major positions of the nodes, highest
    score first; ``node_scores`` ``[B, N]``: their raw scores; ``adjacency`` ``[B, N, N]``: the normalised
    symmetric adjacency; ``neighbor_indices`` ``[B, N, k]``: each node's k nearest nodes (before symmetrisation).
    """

    features: Tensor
    node_indices: Tensor
    node_scores: Tensor
    adjacency: Tensor
    neighbor_indices: Tensor


class SpatialContextRefinement(nn.Module):
    """Spatial context-aware refinement (slides "Method 2" and "GNN for Image Retrieval": nodes are the top-K
    local features, edges come from spatial coordinates and similarity, GCN blocks propagate messages).

    1. A 1x1 conv scores every position; the ``num_nodes`` highest become nodes. A map with fewer positions uses
       all of them (N = min(num_nodes, H * W)).
    2. Node features: the map's feature plus a linear embedding ``Linear(2, C)`` of its (x, y) coordinates in
       ``[-1, 1]``. *Added* rather than concatenated (the slides say neither) so the nodes keep C channels and
       can be written back into the map and pooled with the same head.
    3. Gate: the node features are multiplied by ``sigmoid(score)`` (or, ``score_gate="softmax"``, by
       ``N * softmax(scores)`` over the nodes, mean 1). The top-K selection itself has no gradient; the gate
       is how gradients reach the score conv, and it lets the model down-weight a selected node (like the
       attention re-weighting of DELF/SOLAR before pooling). ``gate_target="update"`` gates the GCN's change
       instead: a node becomes ``x + gate * (GCN(x) - x)``, so a closed gate leaves the map as it was, which
       gating the input cannot (a closed input gate empties the node, see the README's ablation).
    4. Edges (:func:`knn_adjacency`): each node joins its ``num_neighbors`` nearest nodes by a distance chosen
       with ``edge_mode``: ``spatial``, the Euclidean distance of the positions with both axes scaled by the
       longer side (so a step is as long along rows as along columns, on non-square maps too); ``feature``,
       the cosine distance ``1 - cos`` of the map's features; ``both``, ``spatial + feature_weight * feature``
       (both lie in ``[0, 2 sqrt 2]`` / ``[0, 2]``). The graph is binary and built without gradient.
    5. ``num_blocks`` :class:`GCNBlock` (default 2, the method notes' "2 residual GCN layers").
    6. ``output="write_back"``: the refined nodes replace the map at their positions, other positions are
       unchanged; ``output="pool"``: the node features ``[B, N, C]`` are returned for pooling.

    Args:
        channels: C of the input map.
        num_nodes: top-K positions kept as nodes.
        num_neighbors: k nearest nodes per node (clipped to N - 1).
        edge_mode: ``spatial``, ``feature`` or ``both``.
        feature_weight: weight of the feature distance in ``both``.
        num_blocks: GCN blocks.
        output: ``write_back`` or ``pool``.
        score_gate: ``sigmoid`` or ``softmax``.
        gate_target: ``input`` (the gate scales the node features entering the GCN) or ``update``.
    """

    def __init__(
        self,
        channels: int,
        num_nodes: int = 100,
        num_neighbors: int = 8,
        edge_mode: EdgeMode = "both",
        feature_weight: float = 1.0,
        num_blocks: int = 2,
        output: GraphOutput = "write_back",
        score_gate: ScoreGate = "sigmoid",
        gate_target: GateTarget = "input",
    ):
        super().__init__()
        if num_nodes < 1 or num_neighbors < 0 or num_blocks < 0:
            raise ValueError("num_nodes must be positive, num_neighbors and num_blocks non-negative")
        if edge_mode not in ("spatial", "feature", "both"):
            raise ValueError(f"edge_mode must be 'spatial', 'feature' or 'both', got {edge_mode!r}")
        if output not in ("write_back", "pool"):
            raise ValueError(f"output must be 'write_back' or 'pool', got {output!r}")
        if score_gate not in ("sigmoid", "softmax"):
            raise ValueError(f"score_gate must be 'sigmoid' or 'softmax', got {score_gate!r}")
        if gate_target not in ("input", "update"):
            raise ValueError(f"gate_target must be 'input' or 'update', got {gate_target!r}")
        self.gate_target = gate_target
        self.num_nodes, self.num_neighbors, self.edge_mode = num_nodes, num_neighbors, edge_mode
        self.feature_weight, self.output, self.score_gate = feature_weight, output, score_gate
        self.score = nn.Conv2d(channels, 1, kernel_size=1)
        self.coordinate_embedding = nn.Linear(2, channels)
        self.blocks = nn.ModuleList(GCNBlock(channels) for _ in range(num_blocks))

    @torch.no_grad()
    def edge_distances(self, node_features: Tensor, node_indices: Tensor, height: int, width: int) -> Tensor:
        """``[B, N, N]`` distances between nodes by ``edge_mode`` (see the class docstring)."""
        node_features = node_features.float()  # ranks in float32 also under half precision
        distance = node_features.new_zeros(node_indices.shape + node_indices.shape[-1:])
        if self.edge_mode in ("spatial", "both"):
            rows = torch.div(node_indices, width, rounding_mode="floor")
            positions = torch.stack([node_indices - rows * width, rows], dim=-1).float()
            positions = positions * (2.0 / max(height - 1, width - 1, 1))
            distance = distance + torch.cdist(positions, positions)
        if self.edge_mode in ("feature", "both"):
            unit = F.normalize(node_features, dim=-1)
            weight = 1.0 if self.edge_mode == "feature" else self.feature_weight
            distance = distance + weight * (1.0 - unit @ unit.transpose(1, 2))
        return distance

    def forward(self, features: Tensor) -> GraphRefinementOutput:
        batch, channels, height, width = features.shape
        flat = features.flatten(2).transpose(1, 2)  # [B, H*W, C]
        scores = self.score(features).flatten(1)  # [B, H*W]
        node_scores, node_indices = scores.topk(min(self.num_nodes, height * width), dim=1)
        map_features = flat.gather(1, node_indices.unsqueeze(-1).expand(-1, -1, channels))
        coordinates = grid_coordinates(height, width, features.device, features.dtype)[node_indices]
        if self.score_gate == "sigmoid":
            gate = torch.sigmoid(node_scores)
        else:
            gate = node_scores.softmax(dim=1) * node_scores.shape[1]
        nodes = map_features + self.coordinate_embedding(coordinates)
        if self.gate_target == "input":
            nodes = gate.unsqueeze(-1) * nodes
        adjacency, neighbor_indices = knn_adjacency(
            self.edge_distances(map_features, node_indices, height, width), self.num_neighbors
        )
        adjacency = adjacency.to(nodes.dtype)
        for block in self.blocks:
            nodes = block(nodes, adjacency)
        if self.gate_target == "update":
            nodes = map_features + gate.unsqueeze(-1) * (nodes - map_features)
        if self.output == "write_back":
            # Under CUDA autocast the map is bfloat16 and LayerNorm returns float32 nodes: write back in the wider.
            dtype = torch.promote_types(flat.dtype, nodes.dtype)
            flat = flat.to(dtype).scatter(1, node_indices.unsqueeze(-1).expand(-1, -1, channels), nodes.to(dtype))
            out = flat.transpose(1, 2).reshape(batch, channels, height, width)
        else:
            out = nodes
        return GraphRefinementOutput(out, node_indices, node_scores, adjacency, neighbor_indices)


# -- pooling head -----------------------------------------------------------------------------------------------------


class GeM(nn.Module):
    """Generalised mean pooling (slides "Related Works - GeM"; Radenovic et al.) with a learnable exponent.

    Pools a map ``[B, C, H, W]`` over positions or node features ``[B, N, C]`` over nodes (``padding_mask``
    ``[B, N]``, True = padding, leaves nodes out) -> ``[B, C]``. Values are clamped to ``eps`` (GeM assumes
    non-negative features), ``p`` to ``min_p`` (p < 1 is no longer a mean between average and max).

    ``channels=None`` (default): one shared p, as GeM is usually trained; ``channels=C``: one p per channel, as
    the slide's formula writes ``p_k`` ("channel-wise learnable p").
    """

    def __init__(
        self, p: float = 3.0, learn_p: bool = True, channels: int | None = None, eps: float = 1e-6, min_p: float = 1.0
    ):
        super().__init__()
        initial = torch.full((channels or 1,), float(p))
        if learn_p:
            self.p = nn.Parameter(initial)
        else:
            self.register_buffer("p", initial)
        self.eps, self.min_p = eps, min_p

    def forward(self, features: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if features.dim() == 4:
            if padding_mask is not None:
                raise ValueError("padding_mask applies to node features [B, N, C], not to a map")
            features = features.flatten(2).transpose(1, 2)
        p = self.p.clamp(min=self.min_p)
        if padding_mask is None:
            return gem(features, p, dim=1, eps=self.eps)
        keep = (~padding_mask).unsqueeze(-1).to(features.dtype)
        mean = (features.clamp(min=self.eps).pow(p) * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        # An example with every node padded pools to ~0 instead of NaN gradients of 0^(1/p).
        return mean.clamp(min=torch.finfo(mean.dtype).tiny).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.detach().flatten()[:4].tolist()}, channels={self.p.numel()}, eps={self.eps}"


class GlobalHead(nn.Module):
    """GeM -> whitening ``Linear(in_dim, out_dim)`` with bias -> L2 normalisation.

    The slides show GeM only; the method notes add "FC whitening". Whitening is applied to the raw GeM vector
    as in DELG (GeM, FC, L2; the closest published recipe for ArcFace training on GLDv2-clean);
    ``normalize_before_whitening=True`` L2-normalises first, as cirtorch does.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        gem_p: float = 3.0,
        learn_p: bool = True,
        per_channel_p: bool = False,
        normalize_before_whitening: bool = False,
    ):
        super().__init__()
        self.gem = GeM(gem_p, learn_p, channels=in_dim if per_channel_p else None)
        self.whitening = nn.Linear(in_dim, out_dim, bias=True)
        self.normalize_before_whitening = normalize_before_whitening

    def forward(self, features: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """``[B, out_dim]`` unit vectors from a map ``[B, C, H, W]`` or nodes ``[B, N, C]``."""
        pooled = self.gem(features, padding_mask)
        if self.normalize_before_whitening:
            pooled = F.normalize(pooled, dim=-1)
        return F.normalize(self.whitening(pooled), dim=-1)


# -- composition ------------------------------------------------------------------------------------------------------


class SpatialContextOutput(NamedTuple):
    """:meth:`SpatialContextPooling.forward_details`: the descriptor, the map after smoothing, the graph (or None)."""

    descriptor: Tensor
    smoothed: Tensor
    graph: GraphRefinementOutput | None


class PoolingSettings(TypedDict, total=False):
    """The keyword arguments of :class:`SpatialContextPooling` after its dimensions, typed, so that a command line
    (or a sweep) setting one of them, e.g. ``--model.init_args.pooling.kernel_size=5``, gets an ``int``, not a
    string."""

    smoothing: Smoothing
    refinement: Refinement
    kernel_size: int
    kernel_dim: int
    smoothing_residual: bool
    confidence_activation: ConfidenceActivation
    normalize_kernel_features: bool
    num_nodes: int
    num_neighbors: int
    edge_mode: EdgeMode
    feature_weight: float
    num_gcn_blocks: int
    graph_output: GraphOutput
    score_gate: ScoreGate
    gate_target: GateTarget
    gem_p: float
    learn_p: bool
    per_channel_p: bool
    normalize_before_whitening: bool


class SpatialContextPooling(nn.Module):
    """map -> (smoothing) -> (GCN refinement) -> GeM -> whitening -> L2 (slides "Overall Method").

    The ablations are configurations: plain GeM (``smoothing="none", refinement="none"``), average smoothing
    (``"average", "none"``), learnable smoothing only (``"learnable", "none"``), GCN only (``"none", "gcn"``),
    both (``"learnable", "gcn"``). With ``graph_output="pool"`` only the refined nodes are pooled.

    Args:
        in_dim: C of the feature map.
        out_dim: descriptor dimension.
        smoothing: ``none``, ``average`` or ``learnable``.
        refinement: ``none`` or ``gcn``.
        kernel_size, kernel_dim, smoothing_residual, confidence_activation, normalize_kernel_features:
            :class:`LearnableSmoothing` (``kernel_size`` and ``smoothing_residual`` also :class:`AverageSmoothing`).
        num_nodes, num_neighbors, edge_mode, feature_weight, num_gcn_blocks, graph_output, score_gate, gate_target:
            :class:`SpatialContextRefinement`.
        gem_p, learn_p, per_channel_p, normalize_before_whitening: :class:`GlobalHead`.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        smoothing: Smoothing = "learnable",
        refinement: Refinement = "gcn",
        kernel_size: int = 3,
        kernel_dim: int = 32,
        smoothing_residual: bool = False,
        confidence_activation: ConfidenceActivation = "softplus",
        normalize_kernel_features: bool = True,
        num_nodes: int = 100,
        num_neighbors: int = 8,
        edge_mode: EdgeMode = "both",
        feature_weight: float = 1.0,
        num_gcn_blocks: int = 2,
        graph_output: GraphOutput = "write_back",
        score_gate: ScoreGate = "sigmoid",
        gate_target: GateTarget = "input",
        gem_p: float = 3.0,
        learn_p: bool = True,
        per_channel_p: bool = False,
        normalize_before_whitening: bool = False,
    ):
        super().__init__()
        if smoothing == "learnable":
            self.smoothing = LearnableSmoothing(
                in_dim, kernel_size, kernel_dim, smoothing_residual, confidence_activation, normalize_kernel_features
            )
        elif smoothing == "average":
            self.smoothing = AverageSmoothing(kernel_size, smoothing_residual)
        elif smoothing == "none":
            self.smoothing = nn.Identity()
        else:
            raise ValueError(f"smoothing must be 'none', 'average' or 'learnable', got {smoothing!r}")
        if refinement == "gcn":
            self.refinement = SpatialContextRefinement(
                in_dim,
                num_nodes,
                num_neighbors,
                edge_mode,
                feature_weight,
                num_gcn_blocks,
                graph_output,
                score_gate,
                gate_target,
            )
        elif refinement == "none":
            self.refinement = None
        else:
            raise ValueError(f"refinement must be 'none' or 'gcn', got {refinement!r}")
        self.head = GlobalHead(in_dim, out_dim, gem_p, learn_p, per_channel_p, normalize_before_whitening)

    def forward_details(self, feature_map: Tensor) -> SpatialContextOutput:
        smoothed = self.smoothing(feature_map)
        if self.refinement is None:
            return SpatialContextOutput(self.head(smoothed), smoothed, None)
        graph = self.refinement(smoothed)
        return SpatialContextOutput(self.head(graph.features), smoothed, graph)

    def forward(self, feature_map: Tensor) -> Tensor:
        """``[B, out_dim]`` L2-normalised descriptors of ``feature_map`` ``[B, in_dim, H, W]``."""
        return self.forward_details(feature_map).descriptor
