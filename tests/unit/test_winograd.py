"""Winograd F(4x4, 3x3) convolutions (common/model/accel/winograd.py) and where the exact path
uses them (common/model/accel/graph.py).

References are torch's own direct convolution in float64, so that the comparison measures the
Winograd module's rounding, not the reference's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

from common.model.accel import graph
from common.model.accel.cache import graph_cache_key
from common.model.accel.winograd import WinogradConv3x3, fold_batch_norm, is_winograd_compatible


def random_conv(in_channels, out_channels, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
    with torch.no_grad():
        conv.weight.normal_(0, (2 / (9 * in_channels)) ** 0.5)
        if bias:
            conv.bias.normal_(0, 0.5)
    return conv.eval()


def direct64(conv, x):
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), bias, padding=1)


def relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("height,width", [(8, 12), (13, 7), (1, 1), (4, 5), (50, 68), (3, 30)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_direct_convolution(height, width, bias):
    conv = random_conv(16, 24, bias=bias, seed=height * width)
    x = torch.randn(1, 16, height, width)
    with torch.no_grad():
        got = WinogradConv3x3.from_conv(conv)(x)
        fp32_direct = conv(x)
    want = direct64(conv, x)
    assert got.shape == (1, 24, height, width)
    # about ten times a direct fp32 convolution's own rounding (measured <= 1e-5), far from any
    # real difference: a wrong transform gives errors of order 1
    assert relative_error(got, want) < 2e-5
    assert relative_error(fp32_direct, want) < 2e-5


def test_large_channel_counts_as_in_the_fpn():
    conv = random_conv(256, 256, seed=7)
    x = torch.randn(1, 256, 48, 64)
    with torch.no_grad():
        got = WinogradConv3x3.from_conv(conv, whole_tiles=True)(x)
    assert relative_error(got, direct64(conv, x)) < 2e-5


def test_whole_tiles_needs_multiples_of_four():
    conv = random_conv(8, 8)
    module = WinogradConv3x3.from_conv(conv, whole_tiles=True)
    with torch.no_grad():
        x = torch.randn(1, 8, 12, 20)
        assert relative_error(module(x), direct64(conv, x)) < 2e-5
        with pytest.raises(ValueError, match="multiple of 4"):
            module(torch.randn(1, 8, 10, 20))
        with pytest.raises(ValueError, match="one image at a time"):
            module(torch.randn(2, 8, 12, 20))


@pytest.mark.parametrize("strips", [2, 3, 5])
def test_strips_give_the_same_result(strips):
    conv = random_conv(16, 12, seed=strips)
    x = torch.randn(1, 16, 4 * 7, 4 * 5)
    with torch.no_grad():
        whole = WinogradConv3x3.from_conv(conv, whole_tiles=True)(x)
        in_strips = WinogradConv3x3.from_conv(conv, whole_tiles=True, strips=strips)(x)
    assert in_strips.shape == whole.shape
    assert relative_error(in_strips, whole.double()) < 2e-5  # GEMM summation order differs
    assert relative_error(in_strips, direct64(conv, x)) < 2e-5


@pytest.mark.parametrize("norm_type", [torch.nn.BatchNorm2d, FrozenBatchNorm2d])
def test_batch_norm_folding(norm_type):
    conv = random_conv(8, 12, bias=False, seed=3)
    norm = norm_type(12)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(12) + 0.5)
        norm.bias.copy_(torch.randn(12))
        norm.running_mean.copy_(torch.randn(12))
        norm.running_var.copy_(torch.rand(12) + 0.1)
    norm.eval()
    x = torch.randn(1, 8, 9, 14)
    with torch.no_grad():
        want = norm(conv(x))
        got = WinogradConv3x3.from_conv(conv, norm)(x)
        weight, bias = fold_batch_norm(conv.weight, conv.bias, norm)
    assert relative_error(got, want.double()) < 1e-4
    assert weight.dtype == bias.dtype == torch.float64


@pytest.mark.parametrize("conv", [
    torch.nn.Conv2d(4, 4, 3, stride=2, padding=1),
    torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2),
    torch.nn.Conv2d(4, 4, 3, padding=1, groups=2),
    torch.nn.Conv2d(4, 4, 5, padding=2),
    torch.nn.Conv2d(4, 4, 3, padding=0),
    torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
])
def test_refuses_other_convolutions(conv):
    assert not is_winograd_compatible(conv)
    with pytest.raises(ValueError, match="not a plain 3x3"):
        WinogradConv3x3.from_conv(conv)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(5)
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).eval()


@pytest.mark.model
@pytest.mark.parametrize("places", [graph.WINOGRAD, ("P3",), ("layer2", "layer4")],
                         ids=["exact-path", "P3", "layer2+layer4"])
def test_graph_uses_winograd_where_asked_and_leaves_the_model_alone(small_model, places):
    """``graph.WINOGRAD`` (what the exact path uses) and other choices: Winograd exactly at the
    places named, with ``WINOGRAD_STRIPS``, and the same feature maps as direct convolutions."""
    fpn_before = [type(block).__name__ for block in small_model.backbone.fpn.layer_blocks]
    wrapper = graph.BackboneRPNHead(small_model, places).eval()
    blocks = wrapper.backbone.fpn.layer_blocks
    assert len(blocks) == len(graph.FPN_LEVELS)
    levels = {index for index, level in enumerate(graph.FPN_LEVELS) if level in places}
    assert [isinstance(block, WinogradConv3x3) for block in blocks] == \
        [index in levels for index in range(len(blocks))]
    if levels:
        assert isinstance(wrapper.head, graph.RPNHeadPerLevel)
        assert wrapper.head.winograd_levels == levels
    else:
        assert wrapper.head is small_model.rpn.head
    for index in levels:
        strips = graph.WINOGRAD_STRIPS.get(graph.FPN_LEVELS[index], 1)
        assert blocks[index].strips == wrapper.head.winograd[index].strips == strips
    body = wrapper.backbone.body
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        kinds = [isinstance(block.conv2, WinogradConv3x3) for block in getattr(body, stage)]
        # a stage's first block may hold the stride-2 convolution: that one stays direct
        strided = [block.conv2.stride != (1, 1) for block in getattr(small_model.backbone.body, stage)]
        assert kinds == [stage in places and not s for s in strided], stage
    # the model itself keeps its direct convolutions (copies were changed)
    assert [type(block).__name__ for block in small_model.backbone.fpn.layer_blocks] == fpn_before
    assert not any(isinstance(m, WinogradConv3x3) for m in small_model.modules())

    direct = graph.BackboneRPNHead(small_model).eval()
    torch.manual_seed(2)
    images = torch.rand(1, 3, 160, 224)  # a multiple of 32, as torchvision's transform pads
    with torch.no_grad():
        want, got = direct(images), wrapper(images)
    assert len(got) == len(want) == 15
    for got_map, want_map in zip(got, want, strict=True):
        assert got_map.shape == want_map.shape
        assert relative_error(got_map, want_map.double()) < 1e-4


def test_strips_are_given_for_fpn_levels_only():
    """Strips apply to FPN levels; one named otherwise would be silently ignored."""
    assert set(graph.WINOGRAD_STRIPS) <= set(graph.FPN_LEVELS)
    assert all(isinstance(n, int) and n >= 1 for n in graph.WINOGRAD_STRIPS.values())


@pytest.mark.model
def test_unknown_winograd_place_is_refused(small_model):
    with pytest.raises(ValueError, match="P7"):
        graph.BackboneRPNHead(small_model, ("P2", "P7"))


def test_graph_cache_key_names_what_the_graph_computes():
    pytest.importorskip("openvino")
    direct = graph_cache_key("abc")
    assert graph_cache_key("abc", graph.WINOGRAD) != direct
    assert graph_cache_key("abc", ("P2",)) != graph_cache_key("abc", ("P2", "P3"))
    assert graph_cache_key("abd") != direct
    assert graph_cache_key("abc", ()) == direct
