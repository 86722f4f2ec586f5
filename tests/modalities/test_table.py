"""TableEmbed: one token per feature, missing values, magnitudes, errors, gradients."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from generalist.modalities import TableConfig, TableEmbed, build_embedders

D = 8
NAN = float("nan")


def _embed(gen, **cfg):
    torch.manual_seed(gen.initial_seed())
    return TableEmbed(TableConfig(**cfg), D)


def _by_hand(embed, column, value):
    if math.isnan(value):
        return embed.column.weight[column] + embed.missing
    feats = torch.tensor([min(max(value, -5.0), 5.0), math.copysign(math.log1p(abs(value)), value)])  # clipped at 5
    hidden = F.gelu(embed.value_in.weight @ feats + embed.value_in.bias)
    return embed.column.weight[column] + embed.value_out.weight @ hidden + embed.value_out.bias


def test_tokens_and_positions_by_hand(gen):
    embed = _embed(gen, n_columns=10)
    columns, values = [7, 0, 3, 9], [1.5, NAN, -250.0, 0.0]
    tokens_LD, positions_L3 = embed((torch.tensor(columns), torch.tensor(values)))
    assert tokens_LD.shape == (4, D) and tokens_LD.dtype == torch.float32
    assert positions_L3.dtype == torch.int64
    assert positions_L3.tolist() == [[i, 0, 0] for i in range(4)]
    for i, (c, v) in enumerate(sorted(zip(columns, values))):  # taken in column-id order
        torch.testing.assert_close(tokens_LD[i], _by_hand(embed, c, v))
    for other in ((columns, values), (np.array(columns), np.array(values)),
                  (torch.tensor(columns, dtype=torch.int32), torch.tensor(values, dtype=torch.float64)),
                  (np.array(columns, dtype=np.uint32), np.array(values)), (torch.tensor(columns, dtype=torch.uint16), values)):
        torch.testing.assert_close(embed(other)[0], tokens_LD)


def test_order_and_magnitude(gen):
    embed = _embed(gen)
    tokens_LD, positions_L3 = embed(([1, 2, 3], [0.5, 3.0, NAN]))
    for order in ([2, 0, 1], [1, 2, 0], [2, 1, 0]):  # a row is a set: the order given changes nothing
        swapped_LD, swapped_L3 = embed((torch.tensor([1, 2, 3])[order], torch.tensor([0.5, 3.0, NAN])[order]))
        assert torch.equal(swapped_LD, tokens_LD) and torch.equal(swapped_L3, positions_L3)
    assert positions_L3[:, 0].tolist() == [0, 1, 2]
    (ids_L, values_L), _ = embed.prepare((np.array([9, 4, 6]), np.array([1.0, 2.0, NAN])))
    assert ids_L.tolist() == [4, 6, 9]
    torch.testing.assert_close(values_L, torch.tensor([2.0, NAN, 1.0]), equal_nan=True)
    scale_LD, _ = embed(([5] * 1, [1e6]))
    assert torch.isfinite(scale_LD).all()
    values = [-1e6, -3.0, -0.1, 0.0, 0.1, 3.0, 1e6]
    tokens = torch.stack([embed(([5], [v]))[0][0] for v in values])
    assert torch.cdist(tokens, tokens).add(torch.eye(len(values))).min() > 1e-4  # all distinct


def test_large_values_keep_their_column_and_their_size_apart(gen):
    """The blocks see tokens through RMSNorm, so tokens must differ in direction, not only in
    length: a large value must neither drown its column's embedding nor become the same token
    as every other large value (a raw v among the MLP's inputs did both: 1.5e-6 and 9e-5)."""
    embed = _embed(gen)
    direction = lambda column, v: torch.nn.functional.normalize(embed(([column], [v]))[0][0], dim=0)
    for v in (1.0, 100.0, 1e6, -1e6):
        assert (direction(5, v) - direction(7, v)).norm() > 5e-4, v
    for a, b in ((3.0, 30.0), (1e6, 1e9), (-1e6, -1e9)):
        assert (direction(5, a) - direction(5, b)).norm() > 3e-3, (a, b)


def test_values_given_as_a_list_are_read_as_an_array_of_them_is(gen):
    """A list of values is checked at full precision, as an ndarray of them is: 1e300 overflows
    the model's float32 (not "contains inf"), and a float64 model keeps 16777217."""
    embed = _embed(gen)
    for values in ([1e300, 1.0], np.array([1e300, 1.0])):
        with pytest.raises(ValueError, match="overflows the model's float32"):
            embed.prepare(([1, 2], values))
    wide = _embed(gen).double()
    assert wide.prepare(([1], [16777217.0]))[0][1].item() == wide.prepare(([1], np.array([16777217.0])))[0][1].item() \
        == 16777217.0


def test_gradients_are_finite_with_missing_values(gen):
    embed = _embed(gen)
    tokens_LD, _ = embed(([0, 1, 2], [NAN, 2.0, -1.0]))
    tokens_LD.square().sum().backward()
    for name, p in embed.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert embed.column.weight.grad[3:].abs().sum() == 0  # unused columns get nothing


@pytest.mark.parametrize("row,match", [
    (([0, 1, 2], [1.0, 2.0]), "column_ids has 3 entries but values has 2"),
    (([0, 64], [1.0, 2.0]), r"column ids must be in \[0, 64\); got min 0, max 64"),
    (([-1], [1.0]), r"got min -1, max -1"),
    (([0, 1], [1.0, float("inf")]), "values contain inf"),
    (([0], [float("-inf")]), "values contain inf"),
    # finite, but inf in the model's dtype: named as an overflow, not as an inf the caller never passed
    (([0], torch.tensor([1e300], dtype=torch.float64)), "value 1e[+]300 overflows the model's float32 .largest 3.40282e[+]38.; scale the column down"),
    (([], []), "table row is empty"),
    (([0.0, 1.0], [1.0, 2.0]), "column_ids must have an integer dtype; got torch.float32"),
    (([2, 5, 2], [1.0, 2.0, 3.0]), "column id 2 appears more than once"),
    (([[0, 1]], [[1.0, 2.0]]), r"column_ids must be 1-D \(F,\); got shape \(1, 2\)"),
    (([0, 1], [[1.0, 2.0]]), r"values must be 1-D"),
    (([0, 1], [True, False]), "values must be numbers, not bools"),
    (([0, 1], torch.tensor([True, False])), "values must be real numbers; got torch.bool"),
    (([0, 1], [1.5, True]), r"values must be numbers, not bools; got \[1.5, True\]"),
    (([True, 2], [1.0, 2.0]), "column_ids must be numbers, not bools"),
    (torch.tensor([0, 1]), r"table input must be a pair \(column_ids, values\)"),
    (({0: 1.0}, [1.0]), "column_ids must be a torch.Tensor or numpy array; got dict"),
])
def test_bad_inputs_raise(gen, row, match):
    with pytest.raises(ValueError, match=match):
        _embed(gen)(row)


@pytest.mark.parametrize("cfg,match", [
    (dict(n_columns=0), "n_columns must be >= 1"),
    (dict(value_hidden=0), "value_hidden must be >= 1"),
])
def test_bad_config_raises(cfg, match):
    with pytest.raises(ValueError, match=match):
        TableConfig(**cfg)


def test_max_positions_and_registry():
    embed = build_embedders(8, 300, {"table": TableConfig(n_columns=5)})["table"]
    assert isinstance(embed, TableEmbed) and embed.max_positions == (5, 1, 1)
    _, positions_L3 = embed((torch.arange(5).flip(0), torch.zeros(5)))
    assert tuple(int(m) + 1 for m in positions_L3.max(0).values) == embed.max_positions
