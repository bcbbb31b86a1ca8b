"""The AMES transformer: attention structure, padding, the ``nn.MultiheadAttention`` reference, published
weights, binary codes through packed bits, symmetry and the binary relaxation. Tiny sizes throughout."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_modules.nn.ames import (
    AMESTransformer,
    ames_state_dict_to_published,
    attention_masks,
    load_published_ames,
    pack_codes,
    published_state_dict_to_ames,
    round_to_fp16,
    split_local_columns,
    trim_tokens,
    unpack_codes,
)

_spec = importlib.util.spec_from_file_location(
    "ames_reference", Path(__file__).resolve().parents[1] / "benchmarks" / "ames_reference.py"
)
ames_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ames_reference)

LOCAL_DIM = 24
SMALL = dict(model_dim=16, num_layers=2, num_heads=2, ffn_dim=32)


def make_model(seed: int = 0, **kwargs) -> AMESTransformer:
    torch.manual_seed(seed)
    model = AMESTransformer(LOCAL_DIM, **{**SMALL, **kwargs})
    # Away from the initial LayerNorm ones / zero biases, so every parameter's mapping matters.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def make_pair(batch: int = 3, query_len: int = 7, database_len: int = 5, seed: int = 1):
    """Descriptors and padding; every example keeps at least one descriptor per image."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, query_len, LOCAL_DIM, generator=generator)
    database = torch.randn(batch, database_len, LOCAL_DIM, generator=generator)
    query_valid = torch.randint(1, query_len + 1, (batch, 1), generator=generator)
    database_valid = torch.randint(1, database_len + 1, (batch, 1), generator=generator)
    query_valid[0], database_valid[0] = query_len - 2, database_len - 1  # the first example is surely padded
    return (
        query,
        torch.arange(query_len)[None] >= query_valid,
        database,
        torch.arange(database_len)[None] >= database_valid,
    )


def sequence_masks(query_pad, database_pad):
    return attention_masks(query_pad, database_pad, query_pad.shape[1], database_pad.shape[1])


# -- attention structure -------------------------------------------------------------------------------------------


def test_forward_passes_the_structure_masks_to_every_attention():
    model = make_model()
    query, query_pad, database, database_pad = make_pair()
    self_mask, cross_mask = sequence_masks(query_pad, database_pad)
    seen = []
    hooks = [
        attention.register_forward_pre_hook(lambda module, args, kind=kind: seen.append((kind, args[1])))
        for block in model.blocks
        for kind, attention in (("self", block.self_attention), ("cross", block.cross_attention))
    ]
    model(query, query_pad, database, database_pad)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 2 * len(model.blocks)
    for kind, mask in seen:
        assert torch.equal(mask, self_mask if kind == "self" else cross_mask)


def test_masks_open_the_token_and_close_padding():
    query_len = 4
    query_pad = torch.tensor([[False, False, True, True]])
    database_pad = torch.tensor([[False, True, True]])
    self_mask, cross_mask = (mask[0, 0] == 0 for mask in sequence_masks(query_pad, database_pad))
    token, query, database = 0, slice(1, 1 + query_len), slice(1 + query_len, None)
    for allowed in (self_mask, cross_mask):
        assert allowed[:, token].all()  # every position, padded ones too, attends the token: no empty row
        assert allowed[token, ~torch.cat([torch.tensor([False]), query_pad[0], database_pad[0]])].all()
        assert not allowed[:, 3:5].any() and not allowed[:, 6:].any()  # padded keys
    assert not self_mask[query, database].any() and not self_mask[database, query].any()
    assert not cross_mask[query, query].any() and not cross_mask[database, database].any()
    assert self_mask[1:3, 1:3].all() and cross_mask[1:3, 5].all()


def test_self_attention_stays_within_each_image():
    model = make_model()
    batch, query_len, database_len = 2, 6, 4
    self_mask, _ = sequence_masks(
        torch.zeros(batch, query_len, dtype=torch.bool), torch.zeros(batch, database_len, dtype=torch.bool)
    )
    attention = model.blocks[1].self_attention
    x = torch.randn(batch, 1 + query_len + database_len, SMALL["model_dim"])
    query_rows, database_rows = slice(1, 1 + query_len), slice(1 + query_len, None)
    changed_database, changed_query = x.clone(), x.clone()
    changed_database[:, database_rows] += torch.randn(batch, database_len, SMALL["model_dim"])
    changed_query[:, query_rows] += torch.randn(batch, query_len, SMALL["model_dim"])
    with torch.no_grad():
        out, out_database, out_query = (attention(inputs, self_mask) for inputs in (x, changed_database, changed_query))
    torch.testing.assert_close(out_database[:, query_rows], out[:, query_rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(out_query[:, database_rows], out[:, database_rows], rtol=0, atol=1e-6)
    assert not torch.allclose(out_database[:, 0], out[:, 0])  # the token sees both images


def test_cross_attention_goes_only_to_the_other_image():
    model = make_model()
    batch, query_len, database_len = 2, 6, 4
    _, cross_mask = sequence_masks(
        torch.zeros(batch, query_len, dtype=torch.bool), torch.zeros(batch, database_len, dtype=torch.bool)
    )
    attention = model.blocks[0].cross_attention
    x = torch.randn(batch, 1 + query_len + database_len, SMALL["model_dim"])
    other_queries = x.clone()
    other_queries[:, 2 : 1 + query_len] += torch.randn(batch, query_len - 1, SMALL["model_dim"])  # all but row 1
    other_databases = x.clone()
    other_databases[:, 2 + query_len :] += torch.randn(batch, database_len - 1, SMALL["model_dim"])
    with torch.no_grad():
        out, out_queries, out_databases = (
            attention(inputs, cross_mask) for inputs in (x, other_queries, other_databases)
        )
    torch.testing.assert_close(out_queries[:, 1], out[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out_databases[:, 1 + query_len], out[:, 1 + query_len], rtol=0, atol=1e-6)
    assert not torch.allclose(out_queries[:, 1 + query_len], out[:, 1 + query_len])  # the database sees the query


def test_query_self_attention_ignores_the_database_in_the_model():
    """Through the whole model: the first block's self-attention output at the query positions does not move
    when the database descriptors do."""
    model = make_model()
    query, query_pad, database, database_pad = make_pair()
    outputs = []
    hook = model.blocks[0].self_attention.register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        model(query, query_pad, database, database_pad)
        model(query, query_pad, database + torch.randn_like(database), database_pad)
    hook.remove()
    query_rows = slice(1, 1 + query.shape[1])
    torch.testing.assert_close(outputs[1][:, query_rows], outputs[0][:, query_rows], rtol=0, atol=1e-6)
    assert not torch.allclose(outputs[1][:, 0], outputs[0][:, 0])


@pytest.mark.parametrize("binary", [False, True])
def test_padding_has_no_influence(binary):
    model = make_model(binary=binary)
    query, query_pad, database, database_pad = make_pair()
    with torch.no_grad():
        logits = model(query, query_pad, database, database_pad)
        noisy_query = torch.where(query_pad[..., None], torch.randn_like(query), query)
        noisy_database = torch.where(database_pad[..., None], torch.randn_like(database), database)
        assert torch.equal(model(noisy_query, query_pad, noisy_database, database_pad), logits)
        for i in range(len(query)):
            single = model(query[i : i + 1, ~query_pad[i]], None, database[i : i + 1, ~database_pad[i]], None)
            torch.testing.assert_close(single, logits[i : i + 1], rtol=0, atol=1e-5)


# -- the nn.MultiheadAttention reference and the published layout ---------------------------------------------------


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_matches_the_multihead_attention_reference(binary, training):
    model = make_model(binary=binary).train(training)
    reference = ames_reference.ames_to_reference(model)
    assert reference.training == training
    query, query_pad, database, database_pad = make_pair()
    logits, tokens = model(query, query_pad, database, database_pad, return_tokens=True)
    reference_logits, reference_tokens = reference(query, query_pad, database, database_pad, return_tokens=True)
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens, reference_tokens, rtol=0, atol=1e-5)
    assert tokens.shape == (3, 1 + 7 + 5, SMALL["model_dim"])


@pytest.mark.parametrize("binary", [False, True])
def test_published_file_loads_with_the_same_logits(binary, tmp_path):
    torch.manual_seed(3)
    reference = ames_reference.AMESReference(LOCAL_DIM, **SMALL, binary=binary)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    reference.eval()
    path = tmp_path / "ames.pt"
    torch.save({"state": reference.state_dict(), "epoch": 15}, path)  # the authors' files wrap it in 'state'
    model = load_published_ames(path)
    assert not model.training and model.binary == binary and len(model.blocks) == SMALL["num_layers"]
    query, query_pad, database, database_pad = make_pair()
    with torch.no_grad():
        expected = reference(query, query_pad, database, database_pad)
        torch.testing.assert_close(model(query, query_pad, database, database_pad), expected, rtol=0, atol=1e-5)
        prefixed = {f"module.{key}": value for key, value in reference.state_dict().items()}
        from_prefixed = load_published_ames({"state_dict": prefixed})
        torch.testing.assert_close(from_prefixed(query, query_pad, database, database_pad), expected, rtol=0, atol=1e-5)
    published = reference.state_dict()
    round_trip = ames_state_dict_to_published(published_state_dict_to_ames(published))
    assert round_trip.keys() == published.keys()


def test_published_file_with_wrong_keys_is_refused(tmp_path):
    state = ames_reference.AMESReference(LOCAL_DIM, **SMALL).state_dict()
    del state["decoder.layers.1.norm2.bias"]
    path = tmp_path / "broken.pt"
    torch.save({"state": state}, path)
    with pytest.raises(ValueError, match=r"broken\.pt.*missing keys \['decoder\.layers\.1\.norm2\.bias'\]"):
        load_published_ames(path)
    state = ames_reference.AMESReference(LOCAL_DIM, **SMALL).state_dict()
    state["decoder.norm.weight"] = torch.ones(SMALL["model_dim"])
    with pytest.raises(ValueError, match=r"unexpected keys \['decoder\.norm\.weight'\]"):
        load_published_ames(state)
    with pytest.raises(ValueError, match="no AMES state dict found"):
        load_published_ames({"optimizer": {"lr": torch.tensor(1.0)}, "meta": {}})


# -- storage, symmetry, binary relaxation ---------------------------------------------------------------------------


def test_packed_bits_give_the_same_logits():
    torch.manual_seed(0)
    model = AMESTransformer(LOCAL_DIM, model_dim=128, num_layers=1, ffn_dim=64, binary=True).eval()
    query, query_pad, database, database_pad = make_pair()
    with torch.no_grad():
        codes = model.binarize(database)
        packed = np.packbits(codes.numpy() > 0, axis=-1)
        assert packed.shape == (*database.shape[:2], 16) and packed.dtype == np.uint8  # 16 bytes per descriptor
        assert torch.equal(pack_codes(codes), torch.from_numpy(packed))
        unpacked = torch.from_numpy(np.unpackbits(packed, axis=-1)).float() * 2 - 1
        assert torch.equal(unpacked, codes) and torch.equal(unpack_codes(torch.from_numpy(packed)), codes)
        from_bits = model.score_tokens(model.encode(query), query_pad, model.tokens_from_codes(unpacked), database_pad)
        assert torch.equal(from_bits, model(query, query_pad, database, database_pad))


def test_symmetric_in_query_and_database_without_fp16_rounding():
    model = make_model(round_database_fp16=False)
    query, query_pad, database, database_pad = make_pair()
    with torch.no_grad():
        forward, swapped = (
            model(query, query_pad, database, database_pad),
            model(database, database_pad, query, query_pad),
        )
    torch.testing.assert_close(swapped, forward, rtol=0, atol=1e-5)


def test_database_tokens_are_rounded_to_fp16_in_eval_only():
    model = make_model()
    query, query_pad, database, database_pad = make_pair()
    with torch.no_grad():
        rounded = model.score_tokens(
            model.encode(query), query_pad, round_to_fp16(model.encode(database)), database_pad
        )
        assert torch.equal(model(query, query_pad, database, database_pad), rounded)
        model.train()
        exact = model.score_tokens(model.encode(query), query_pad, model.encode(database), database_pad)
        assert torch.equal(model(query, query_pad, database, database_pad), exact)


def test_binary_remap_relaxes_in_training_and_gives_exact_signs_in_eval():
    model = make_model(binary=True).train()
    query, query_pad, database, database_pad = make_pair()
    model(query, query_pad, database, database_pad).sum().backward()
    gradient = model.remap.projection.grad
    assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    model.eval()
    codes = model.binarize(torch.cat([database, torch.zeros(3, 1, LOCAL_DIM)], 1))
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    assert (codes[:, -1] == 1).all()  # an exact zero projection is +1, so codes always pack to bits


def test_init_projection_sets_the_binary_projection():
    model = make_model(binary=True)
    projection = np.random.default_rng(0).standard_normal((LOCAL_DIM, SMALL["model_dim"])).astype(np.float32)
    model.init_projection(projection)
    assert torch.equal(model.remap.projection.detach(), torch.from_numpy(projection))
    with pytest.raises(ValueError, match="projection must be"):
        model.init_projection(projection[:, :8])
    with pytest.raises(ValueError, match="binary model"):
        make_model().init_projection(projection)


def test_initialisation_follows_the_authors():
    model = AMESTransformer(LOCAL_DIM, **SMALL)
    block = model.blocks[0]
    assert torch.equal(block.feedforward_in.bias, torch.zeros_like(block.feedforward_in.bias))
    assert torch.equal(block.self_attention_norm.weight, torch.ones_like(block.self_attention_norm.weight))
    # trunc_normal_(std=.02) with torch's default cut at +-2 (absolute, not in stds): a plain N(0, .02^2) here.
    assert 0.015 < block.feedforward_in.weight.std() < 0.025
    assert 0.01 < model.matching_token.std() < 0.03


# -- helpers for training code --------------------------------------------------------------------------------------


def test_trim_tokens_keeps_the_token_and_the_leading_descriptors():
    tokens = torch.arange(1 + 5 + 4)[None, :, None].float()
    trimmed = trim_tokens(tokens, query_len=5, database_len=4, new_query_len=2, new_database_len=3)
    assert trimmed[0, :, 0].tolist() == [0, 1, 2, 6, 7, 8]
    with pytest.raises(ValueError):
        trim_tokens(tokens, 5, 4, 6, 1)


def test_trimmed_teacher_tokens_align_with_a_student_on_the_subsets():
    """A model scoring the leading subsets produces tokens at the trimmed positions (same shape and order)."""
    model = make_model()
    query, _, database, _ = make_pair()
    with torch.no_grad():
        _, teacher = model(query, None, database, None, return_tokens=True)
        _, student = model(query[:, :3], None, database[:, :2], None, return_tokens=True)
    assert trim_tokens(teacher, 7, 5, 3, 2).shape == student.shape


def test_split_local_columns():
    local = torch.zeros(2, 3, 5 + 4, dtype=torch.float16)
    local[..., 5:] = torch.randn(2, 3, 4).half()
    local[1, 2, 3] = 1
    descriptors, pad = split_local_columns(local)
    assert descriptors.dtype == torch.float32 and torch.equal(descriptors, local[..., 5:].float())
    assert pad.tolist() == [[False, False, False], [False, False, True]]
