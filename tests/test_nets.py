"""The MLP: architecture follows the arguments, outputs raw logits, bad arguments fail clearly."""

import pytest
import torch
from torch import nn

from xentlit import MLP


def test_shapes_and_layer_order():
    net = MLP(64, 10, hidden_sizes=[32, 16], activation="gelu", dropout=0.1, norm="layer")
    kinds = [type(m) for m in net.body]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Dropout, nn.Linear, nn.LayerNorm, nn.GELU, nn.Dropout]
    assert [m.out_features for m in net.body if isinstance(m, nn.Linear)] == [32, 16]
    assert net.head.in_features == 16 and net.head.out_features == 10
    assert net(torch.randn(5, 64)).shape == (5, 10)


def test_no_hidden_layers_is_a_linear_model():
    net = MLP(4, 3, hidden_sizes=[])
    x = torch.randn(7, 4)
    torch.testing.assert_close(net(x), x @ net.head.weight.T + net.head.bias)


def test_outputs_are_logits_not_probabilities():
    torch.manual_seed(0)
    out = MLP(8, 5)(torch.randn(64, 8) * 10)
    assert not torch.allclose(out.sum(dim=1), torch.ones(64))
    assert (out < 0).any()


def test_batch_norm_option():
    net = MLP(4, 3, hidden_sizes=[8], norm="batch")
    assert any(isinstance(m, nn.BatchNorm1d) for m in net.body)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_features": 0}, "in_features.*0"),
        ({"num_classes": 1}, "num_classes.*1"),
        ({"hidden_sizes": [8, -1]}, r"hidden_sizes.*-1"),
        ({"activation": "swishy"}, "swishy"),
        ({"norm": "group"}, "group"),
        ({"dropout": 1.0}, "dropout.*1.0"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    args = {"in_features": 4, "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        MLP(**args)
