"""The RRT re-ranker: shapes, padding that changes nothing, batches equal to single pairs, gradients."""

import pytest
import torch

from lightning_modules.nn.rrt import RerankingTransformer

LOCAL_DIM, GLOBAL_DIM = 24, 40


def _model(**kwargs) -> RerankingTransformer:
    torch.manual_seed(0)
    options = dict(model_dim=32, num_layers=2, num_heads=4, ffn_dim=64)
    return RerankingTransformer(LOCAL_DIM, GLOBAL_DIM, **{**options, **kwargs}).eval()


def _image(generator, batch, num_locals):
    return (
        torch.randn(batch, GLOBAL_DIM, generator=generator),
        torch.randn(batch, num_locals, LOCAL_DIM, generator=generator),
        torch.randint(0, 7, (batch, num_locals), generator=generator),
        torch.zeros(batch, num_locals, dtype=torch.bool),
    )


def test_output_is_one_logit_per_pair_with_different_set_sizes():
    generator = torch.Generator().manual_seed(1)
    logits = _model()(*_image(generator, 3, 9), *_image(generator, 3, 4))
    assert logits.shape == (3,) and logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_the_paper_configuration_has_about_the_published_size():
    # RRT with 2048-d globals has ~2.2M parameters; the local projection (128 -> 128) adds 16.5k.
    model = RerankingTransformer(local_dim=128, global_dim=2048)
    assert 2.2e6 < sum(p.numel() for p in model.parameters()) < 2.3e6


def test_padded_locals_have_no_influence():
    generator = torch.Generator().manual_seed(2)
    model = _model()
    query, database = _image(generator, 2, 6), _image(generator, 2, 5)
    query[3][:, 4:] = True
    database[3][0, 2:] = True
    logits = model(*query, *database)
    # Anything in padded positions (descriptors, scales) is ignored.
    changed_query = [t.clone() for t in query]
    changed_query[1][:, 4:] = 100 * torch.randn(2, 2, LOCAL_DIM, generator=generator)
    changed_query[2][:, 4:] = 6
    changed_database = [t.clone() for t in database]
    changed_database[1][0, 2:] = torch.randn(3, LOCAL_DIM, generator=generator)
    torch.testing.assert_close(model(*changed_query, *changed_database), logits)

    # And padding is the same as leaving the positions out.
    def first_pair_cut(image, length):
        global_, local, scale, pad = image
        return global_[:1], local[:1, :length], scale[:1, :length], pad[:1, :length]

    first_alone = model(*first_pair_cut(query, 4), *first_pair_cut(database, 2))
    torch.testing.assert_close(first_alone, logits[:1], atol=1e-5, rtol=1e-5)


def test_a_padded_batch_equals_its_pairs_scored_one_by_one():
    generator = torch.Generator().manual_seed(3)
    model = _model()
    query_sizes, database_sizes = [7, 3, 5], [2, 6, 0]
    pairs = [(_image(generator, 1, q), _image(generator, 1, x)) for q, x in zip(query_sizes, database_sizes)]
    single = torch.cat([model(*query, *database) for query, database in pairs])

    def padded(images, length):
        rows = []
        for global_, local, scale, _ in images:
            missing = length - local.shape[1]
            rows.append(
                (
                    global_,
                    torch.cat([local, torch.randn(1, missing, LOCAL_DIM, generator=generator)], 1),
                    torch.cat([scale, torch.zeros(1, missing, dtype=torch.long)], 1),
                    torch.cat(
                        [torch.zeros(1, local.shape[1], dtype=torch.bool), torch.ones(1, missing, dtype=torch.bool)], 1
                    ),
                )
            )
        return [torch.cat(parts) for parts in zip(*rows)]

    batched = model(*padded([q for q, _ in pairs], 9), *padded([x for _, x in pairs], 6))
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_scale_indices_are_clipped_and_matter():
    generator = torch.Generator().manual_seed(4)
    model = _model()
    query, database = _image(generator, 2, 5), _image(generator, 2, 5)
    logits = model(*query, *database)
    too_large = [t.clone() for t in query]
    too_large[2][:] = 6
    clipped = [t.clone() for t in query]
    clipped[2][:] = 50
    torch.testing.assert_close(model(*clipped, *database), model(*too_large, *database))
    as_float = [t.clone() for t in query]
    as_float[2] = as_float[2].float()  # the store's scale column is a float
    torch.testing.assert_close(model(*as_float, *database), logits)
    assert not torch.allclose(model(*too_large, *database), logits)


def test_scales_and_padding_may_be_omitted():
    generator = torch.Generator().manual_seed(5)
    model = _model()
    (qg, ql, _, _), (xg, xl, _, _) = _image(generator, 2, 3), _image(generator, 2, 4)
    zeros_q, zeros_x = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)
    no_pad_q, no_pad_x = torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)
    torch.testing.assert_close(
        model(qg, ql, None, None, xg, xl, None, None), model(qg, ql, zeros_q, no_pad_q, xg, xl, zeros_x, no_pad_x)
    )


def test_gradients_reach_every_parameter():
    generator = torch.Generator().manual_seed(6)
    model = _model().train()
    query, database = _image(generator, 4, 5), _image(generator, 4, 3)
    query[3][:, 3:] = True
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(*query, *database), labels)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_evaluation_is_deterministic(dropout):
    generator = torch.Generator().manual_seed(7)
    model = _model(dropout=dropout)
    query, database = _image(generator, 2, 4), _image(generator, 2, 4)
    torch.testing.assert_close(model(*query, *database), model(*query, *database))
