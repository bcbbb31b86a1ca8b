"""Spatial-context blocks (learnable smoothing, GCN refinement, GeM head, their composition): the slides' formulas
on hand-made maps, the vectorised smoothing against a plain loop, the graph's structure, gradients. Tiny sizes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.nn.backbones import gem
from lightning_modules.nn.spatial_context import (
    AverageSmoothing,
    GeM,
    GlobalHead,
    LearnableSmoothing,
    SpatialContextPooling,
    SpatialContextRefinement,
    grid_coordinates,
    knn_adjacency,
    smoothing_reference,
)

# -- learnable smoothing --------------------------------------------------------------------------------------------

# A 2-channel 3x3 map; channel-major [C, H, W].
HAND_MAP = np.array(
    [
        [[0.0, 1.0, 2.0], [0.5, 1.5, 0.2], [1.0, 0.3, 0.7]],
        [[1.0, 0.0, 0.5], [0.2, 0.8, 1.2], [0.4, 0.9, 0.1]],
    ]
)


def _softplus(value):
    return np.log1p(np.exp(value))


def _hand_smoothing() -> LearnableSmoothing:
    """Generator set so that f = x (identity), a = softplus(0.3 x0 + 0.1), c = softplus(0.5 x1 + 0.2)."""
    module = LearnableSmoothing(2, kernel_size=3, kernel_dim=2, normalize_kernel_features=False).double()
    with torch.no_grad():
        module.kernel_generator.weight.copy_(
            torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.0], [0.0, 0.5]]).view(4, 2, 1, 1)
        )
        module.kernel_generator.bias.copy_(torch.tensor([0.0, 0.0, 0.1, 0.2]))
    return module


def _expected_by_hand(y, x):
    """The slide's formula at (y, x): c at the centre, exp(-a ||f - f_uv||^2) at neighbours inside the map."""
    a = _softplus(0.3 * HAND_MAP[0, y, x] + 0.1)
    c = _softplus(0.5 * HAND_MAP[1, y, x] + 0.2)
    weights, numerator = {}, np.zeros(2)
    for v in range(y - 1, y + 2):
        for u in range(x - 1, x + 2):
            if not (0 <= v < 3 and 0 <= u < 3):
                weights[(v, u)] = 0.0  # padding
                continue
            if (v, u) == (y, x):
                weights[(v, u)] = c
            else:
                weights[(v, u)] = np.exp(-a * np.sum((HAND_MAP[:, y, x] - HAND_MAP[:, v, u]) ** 2))
            numerator += weights[(v, u)] * HAND_MAP[:, v, u]
    return np.array(list(weights.values())), numerator / sum(weights.values())


@pytest.mark.parametrize("position", [(0, 0), (1, 1), (2, 1)], ids=["corner", "centre", "border"])
def test_smoothing_weights_and_output_follow_the_formula_by_hand(position):
    module = _hand_smoothing()
    features = torch.from_numpy(HAND_MAP)[None]
    expected_weights, expected_output = _expected_by_hand(*position)
    with torch.no_grad():
        weights, output = module.weights(features)[0, :, position[0], position[1]], module(features)[0]
    np.testing.assert_allclose(weights.numpy(), expected_weights)
    np.testing.assert_allclose(output[:, position[0], position[1]].numpy(), expected_output)
    if position == (0, 0):  # 5 of the 9 neighbours are padding and weigh nothing
        assert (weights == 0).sum() == 5


def test_residual_smoothing_adds_the_input():
    module = _hand_smoothing()
    features = torch.from_numpy(HAND_MAP)[None]
    smoothed = module(features)
    module.residual = True
    torch.testing.assert_close(module(features), features + smoothed)


@pytest.mark.parametrize(
    "kernel_size, residual, confidence_activation, normalize",
    [
        (1, False, "softplus", True),
        (3, False, "softplus", False),
        (3, True, "sigmoid", True),
        (5, True, "softplus", False),
        (5, False, "sigmoid", False),
        (7, False, "softplus", True),  # kernel larger than the 5x6 map
    ],
)
def test_vectorised_smoothing_equals_the_loop_reference(kernel_size, residual, confidence_activation, normalize):
    torch.manual_seed(kernel_size)
    module = LearnableSmoothing(3, kernel_size, 4, residual, confidence_activation, normalize).double()
    features = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    expected = smoothing_reference(features, *module.kernel_parameters(features), kernel_size, residual)
    torch.testing.assert_close(module(features), expected)


def test_kernel_parameters_are_positive_and_normalised():
    torch.manual_seed(0)
    module = LearnableSmoothing(4, kernel_dim=5)
    kernel_features, bandwidth, confidence = module.kernel_parameters(torch.randn(2, 4, 3, 4) * 10)
    assert kernel_features.shape == (2, 5, 3, 4) and bandwidth.shape == confidence.shape == (2, 1, 3, 4)
    assert (bandwidth > 0).all() and (confidence > 0).all()
    torch.testing.assert_close(kernel_features.norm(dim=1), torch.ones(2, 3, 4))
    module.confidence_activation = "sigmoid"
    assert (module.kernel_parameters(torch.randn(2, 4, 3, 4))[2] < 1).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_gradients_reach_kernel_feature_bandwidth_and_confidence(normalize):
    torch.manual_seed(0)
    module = LearnableSmoothing(4, kernel_size=3, kernel_dim=3, normalize_kernel_features=normalize)
    features = torch.rand(2, 4, 5, 5)
    (module(features) * torch.randn(2, 4, 5, 5)).sum().backward()
    weight_grad = module.kernel_generator.weight.grad.flatten(1)
    bias_grad = module.kernel_generator.bias.grad
    for name, rows in {"kernel feature": slice(0, 3), "bandwidth": slice(3, 4), "confidence": slice(4, 5)}.items():
        assert weight_grad[rows].abs().sum() > 1e-6, name
    assert bias_grad[3].abs() > 1e-8 and bias_grad[4].abs() > 1e-8


def test_invalid_kernel_size_is_refused():
    with pytest.raises(ValueError, match="odd"):
        LearnableSmoothing(4, kernel_size=4)
    with pytest.raises(ValueError, match="odd"):
        AverageSmoothing(kernel_size=2)


def test_average_smoothing_excludes_padding_by_hand():
    features = torch.arange(12, dtype=torch.float64).view(1, 1, 3, 4) ** 1.5
    x = features[0, 0]
    smoothed = AverageSmoothing(3)(features)[0, 0]
    torch.testing.assert_close(smoothed[0, 0], x[0:2, 0:2].mean())  # corner: 4 cells, not 9
    torch.testing.assert_close(smoothed[0, 2], x[0:2, 1:4].mean())  # border: 6 cells
    torch.testing.assert_close(smoothed[1, 1], x[0:3, 0:3].mean())  # interior: 9 cells
    torch.testing.assert_close(AverageSmoothing(3, residual=True)(features)[0, 0], x + smoothed)


# -- graph refinement -----------------------------------------------------------------------------------------------


def _refinement(channels=6, seed=0, **kwargs) -> SpatialContextRefinement:
    torch.manual_seed(seed)
    options = dict(num_nodes=7, num_neighbors=3)
    return SpatialContextRefinement(channels, **{**options, **kwargs})


def _binary_symmetric_graph(neighbor_indices, nodes):
    """Union of the directed kNN graph with its transpose, with self-loops, built with loops."""
    batch = neighbor_indices.shape[0]
    graph = torch.zeros(batch, nodes, nodes)
    for b in range(batch):
        for i in range(nodes):
            graph[b, i, i] = 1
            for j in neighbor_indices[b, i].tolist():
                graph[b, i, j] = graph[b, j, i] = 1
    return graph


@pytest.mark.parametrize("edge_mode", ["spatial", "feature", "both"])
def test_graph_has_top_k_nodes_k_neighbours_and_the_normalised_adjacency(edge_mode):
    module = _refinement(edge_mode=edge_mode)
    features = torch.rand(2, 6, 4, 5)
    out = module(features)
    scores = module.score(features).flatten(1)
    expected_scores, expected_indices = scores.topk(7, dim=1)
    assert out.node_indices.shape == (2, 7)
    torch.testing.assert_close(out.node_indices, expected_indices)
    torch.testing.assert_close(out.node_scores, expected_scores)

    # Each node: exactly 3 distinct neighbours, itself excluded, and none farther than a node left out.
    neighbours = out.neighbor_indices
    assert neighbours.shape == (2, 7, 3)
    node_features = features.flatten(2).transpose(1, 2).gather(1, out.node_indices[..., None].expand(-1, -1, 6))
    distances = module.edge_distances(node_features, out.node_indices, 4, 5)
    for b in range(2):
        for i in range(7):
            chosen = set(neighbours[b, i].tolist())
            assert len(chosen) == 3 and i not in chosen
            others = [j for j in range(7) if j != i and j not in chosen]
            assert max(distances[b, i, j] for j in chosen) <= min(distances[b, i, j] for j in others)

    # Symmetric D^-1/2 A D^-1/2 of the binary union graph with self-loops.
    binary = _binary_symmetric_graph(neighbours, 7)
    degree = binary.sum(-1)
    torch.testing.assert_close(out.adjacency, binary / torch.sqrt(degree[:, :, None] * degree[:, None, :]))
    torch.testing.assert_close(out.adjacency, out.adjacency.transpose(1, 2))
    assert (degree >= 4).all()  # k neighbours + self before symmetrisation; union only adds


def test_knn_adjacency_on_a_line():
    positions = torch.tensor([0.0, 1.0, 3.0, 7.0])[None, :, None]
    adjacency, neighbours = knn_adjacency(torch.cdist(positions, positions), 1)
    assert neighbours[0, :, 0].tolist() == [1, 0, 1, 2]
    # Union graph: 0-1, 1-2, 2-3, self-loops; degrees 2, 3, 3, 2.
    degree = torch.tensor([2.0, 3.0, 3.0, 2.0])
    binary = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    torch.testing.assert_close(adjacency[0], binary / torch.sqrt(degree[:, None] * degree[None, :]))


def test_spatial_edges_join_grid_neighbours_on_a_non_square_map():
    # All 28 positions are nodes; with 4 neighbours, an interior cell's are its 4 grid neighbours only if a step
    # is as long along rows as along columns (per-axis [-1, 1] coordinates would not give that on 4x7).
    module = _refinement(channels=3, num_nodes=100, num_neighbors=4, edge_mode="spatial")
    out = module(torch.rand(1, 3, 4, 7))
    position = out.node_indices[0]
    for i in range(28):
        row, column = divmod(position[i].item(), 7)
        if 0 < row < 3 and 0 < column < 6:
            found = {divmod(position[j].item(), 7) for j in out.neighbor_indices[0, i].tolist()}
            assert found == {(row - 1, column), (row + 1, column), (row, column - 1), (row, column + 1)}


def test_feature_edges_join_similar_features():
    # A checkerboard of two feature clusters: spatial neighbours differ, feature neighbours agree.
    generator = torch.Generator().manual_seed(0)
    rows, columns = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    cluster = ((rows + columns) % 2).flatten()
    prototypes = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    nodes = prototypes[cluster] + 0.05 * torch.rand(16, 3, generator=generator)
    features = nodes.T.reshape(1, 3, 4, 4)
    out = _refinement(channels=3, num_nodes=16, num_neighbors=4, edge_mode="feature")(features)
    node_cluster = cluster[out.node_indices[0]]
    assert (node_cluster[out.neighbor_indices[0]] == node_cluster[:, None]).all()


def test_write_back_changes_only_node_positions_and_pool_returns_the_same_nodes():
    module = _refinement(output="write_back")
    features = torch.rand(2, 6, 4, 5)
    out = module(features)
    assert out.features.shape == features.shape
    is_node = torch.zeros(2, 20, dtype=torch.bool).scatter(1, out.node_indices, True).view(2, 1, 4, 5)
    changed = (out.features != features).any(dim=1, keepdim=True)
    assert torch.equal(changed, is_node)

    module.output = "pool"
    pooled = module(features)
    assert pooled.features.shape == (2, 7, 6)
    written = out.features.flatten(2).transpose(1, 2).gather(1, out.node_indices[..., None].expand(-1, -1, 6))
    torch.testing.assert_close(pooled.features, written)


def test_a_closed_gate_on_the_update_leaves_the_map_and_on_the_input_empties_the_nodes():
    features = torch.rand(2, 6, 4, 5)
    for target in ("update", "input"):
        module = _refinement(output="write_back", gate_target=target)
        with torch.no_grad():
            module.score.bias.fill_(-100.0)  # sigmoid gate 0 on every node
        out = module(features)
        nodes = out.node_indices[..., None].expand(-1, -1, 6)
        written = out.features.flatten(2).transpose(1, 2).gather(1, nodes)
        original = features.flatten(2).transpose(1, 2).gather(1, nodes)
        if target == "update":
            torch.testing.assert_close(out.features, features)
        else:  # the GCN runs on zeros: every node gets the same ReLU(LayerNorm(0)) = ReLU(bias), zero at init
            assert torch.equal(written, torch.zeros_like(written)) and not torch.equal(written, original)
    with pytest.raises(ValueError, match="gate_target"):
        _refinement(gate_target="output")


def test_write_back_of_float32_nodes_into_a_bfloat16_map(monkeypatch):
    # Under CUDA autocast the backbone's map is bfloat16 and LayerNorm returns float32 nodes.
    module = _refinement(output="write_back")
    forward = type(module.blocks[0]).forward
    for block in module.blocks:
        monkeypatch.setattr(block, "forward", lambda nodes, adjacency, b=block: forward(b, nodes.float(), adjacency))
    features = torch.rand(2, 6, 4, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(features)
    assert out.features.dtype == torch.float32 and out.features.shape == features.shape
    is_node = torch.zeros(2, 20, dtype=torch.bool).scatter(1, out.node_indices, True).view(2, 1, 4, 5)
    assert torch.equal(out.features.masked_select(~is_node), features.float().masked_select(~is_node))


@pytest.mark.parametrize("score_gate", ["sigmoid", "softmax"])
def test_gradients_reach_the_score_conv_and_the_coordinate_embedding(score_gate):
    module = _refinement(score_gate=score_gate)
    out = module(torch.rand(2, 6, 4, 5))
    (out.features * torch.randn_like(out.features)).sum().backward()
    assert module.score.weight.grad.abs().sum() > 0
    assert module.coordinate_embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.blocks.parameters())


def test_maps_smaller_than_the_node_count_use_every_position():
    module = _refinement(num_nodes=10, num_neighbors=8)
    out = module(torch.rand(1, 6, 2, 3))
    assert sorted(out.node_indices[0].tolist()) == list(range(6))
    assert out.neighbor_indices.shape == (1, 6, 5)  # k clipped to N - 1: a complete graph
    torch.testing.assert_close(out.adjacency, torch.full((1, 6, 6), 1 / 6))
    single = module(torch.rand(1, 6, 1, 1))
    assert single.node_indices.tolist() == [[0]] and single.adjacency.tolist() == [[[1.0]]]


def test_grid_coordinates_span_minus_one_to_one():
    coordinates = grid_coordinates(3, 5)
    assert coordinates.shape == (15, 2)
    torch.testing.assert_close(coordinates[0], torch.tensor([-1.0, -1.0]))
    torch.testing.assert_close(coordinates[7], torch.tensor([0.0, 0.0]))  # centre (row 1, column 2)
    torch.testing.assert_close(coordinates[-1], torch.tensor([1.0, 1.0]))
    assert grid_coordinates(1, 1).tolist() == [[0.0, 0.0]]


# -- pooling head ---------------------------------------------------------------------------------------------------


def test_gem_is_the_mean_at_p_one_and_near_the_max_at_p_fifty():
    features = 0.5 + torch.rand(3, 4, 4, 4, dtype=torch.float64)
    flat = features.flatten(2)
    torch.testing.assert_close(GeM(p=1.0, learn_p=False).double()(features), flat.mean(-1))
    maximum = flat.amax(-1)
    near_max = GeM(p=50.0, learn_p=False).double()(features)
    # mean(x^p)^(1/p) >= max * (1/16)^(1/50) ~ 0.946 max for 16 positions.
    assert ((near_max <= maximum) & (near_max >= 0.94 * maximum)).all()
    cubic = GeM(p=3.0, learn_p=False).double()(features)
    assert ((maximum - near_max) < (maximum - cubic)).all()
    torch.testing.assert_close(cubic, gem(flat, 3.0, dim=-1))


def test_gem_p_is_learnable_and_clamped_at_one():
    module = GeM()
    assert isinstance(module.p, torch.nn.Parameter) and module.p.item() == 3.0
    module(torch.rand(2, 5, 3, 3)).sum().backward()
    assert module.p.grad is not None and module.p.grad.abs().item() > 0
    with torch.no_grad():
        module.p.fill_(0.2)
    features = torch.rand(2, 5, 3, 3)
    torch.testing.assert_close(module(features), features.flatten(2).mean(-1))
    assert "p" not in dict(GeM(learn_p=False).named_parameters())


def test_gem_over_nodes_with_padding_and_per_channel_p():
    features = torch.rand(2, 6, 4) + 0.1
    padding = torch.tensor([[False] * 6, [False, False, True, False, True, True]])
    pooled = GeM(p=3.0)(features, padding)
    torch.testing.assert_close(pooled[0], gem(features[0], 3.0, dim=0))
    torch.testing.assert_close(pooled[1], gem(features[1, [0, 1, 3]], 3.0, dim=0))
    per_channel = GeM(channels=4)
    with torch.no_grad():
        per_channel.p.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    expected = torch.stack([gem(features[..., c], p, dim=1) for c, p in enumerate([1.0, 2.0, 3.0, 4.0])], dim=-1)
    torch.testing.assert_close(per_channel(features), expected)
    with pytest.raises(ValueError, match="padding_mask"):
        GeM()(torch.rand(1, 4, 2, 2), torch.zeros(1, 4, dtype=torch.bool))


def test_global_head_is_gem_whitening_l2():
    torch.manual_seed(0)
    head = GlobalHead(6, 4, gem_p=3.0)
    features = torch.rand(2, 6, 3, 5)
    expected = F.normalize(head.whitening(gem(features.flatten(2), 3.0, dim=-1)), dim=-1)
    torch.testing.assert_close(head(features), expected)
    nodes = head(features.flatten(2).transpose(1, 2))
    torch.testing.assert_close(nodes, expected)
    head.normalize_before_whitening = True
    expected = F.normalize(head.whitening(F.normalize(gem(features.flatten(2), 3.0, dim=-1), dim=-1)), dim=-1)
    torch.testing.assert_close(head(features), expected)


# -- composition ----------------------------------------------------------------------------------------------------

CONFIGS = [
    dict(smoothing="none", refinement="none"),
    dict(smoothing="average", refinement="none"),
    dict(smoothing="learnable", refinement="none"),
    dict(smoothing="none", refinement="gcn"),
    dict(smoothing="learnable", refinement="gcn"),
    dict(smoothing="average", refinement="gcn", graph_output="pool", edge_mode="spatial"),
    dict(smoothing="learnable", refinement="gcn", graph_output="pool", smoothing_residual=True, kernel_size=5),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 6, 4), (1, 2, 3), (2, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_every_ablation_gives_unit_descriptors_of_the_configured_dim(config, shape):
    batch, height, width = shape
    torch.manual_seed(0)
    model = SpatialContextPooling(8, 5, num_nodes=12, num_neighbors=4, kernel_dim=4, **config)
    descriptors = model(torch.rand(batch, 8, height, width))
    assert descriptors.shape == (batch, 5) and torch.isfinite(descriptors).all()
    torch.testing.assert_close(descriptors.norm(dim=-1), torch.ones(batch))


def test_plain_and_average_configurations_are_the_head_on_the_map():
    torch.manual_seed(0)
    features = torch.rand(2, 8, 4, 6)
    plain = SpatialContextPooling(8, 5, smoothing="none", refinement="none")
    torch.testing.assert_close(plain(features), plain.head(features))
    average = SpatialContextPooling(8, 5, smoothing="average", refinement="none", kernel_size=3)
    pooled = F.avg_pool2d(features, 3, stride=1, padding=1, count_include_pad=False)
    torch.testing.assert_close(average(features), average.head(pooled))
    details = average.forward_details(features)
    assert details.graph is None and details.smoothed.shape == features.shape


def test_full_model_trains_every_parameter():
    torch.manual_seed(0)
    model = SpatialContextPooling(8, 5, num_nodes=10, num_neighbors=3, kernel_dim=4)
    details = model.forward_details(torch.rand(2, 8, 5, 6))
    assert details.graph.node_indices.shape == (2, 10) and details.graph.adjacency.shape == (2, 10, 10)
    (details.descriptor * torch.randn(2, 5)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="smoothing"):
        SpatialContextPooling(8, 5, smoothing="gaussian")
    with pytest.raises(ValueError, match="refinement"):
        SpatialContextPooling(8, 5, refinement="gat")
    with pytest.raises(ValueError, match="edge_mode"):
        SpatialContextRefinement(8, edge_mode="random")
    with pytest.raises(ValueError, match="confidence_activation"):
        LearnableSmoothing(8, confidence_activation="relu")
    assert math.isclose(GeM(p=2.5).p.item(), 2.5)
