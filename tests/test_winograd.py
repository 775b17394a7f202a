"""Winograd F(4x4, 3x3) convolutions (common/winograd.py) and where the exact path uses them.

References are torch's own direct convolution in float64, so that the comparison measures the
Winograd module's rounding, not the reference's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

from common import accel
from common.winograd import WinogradConv3x3, fold_batch_norm, is_winograd_compatible


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


def test_exact_graph_uses_winograd_where_planned_and_leaves_the_model_alone(small_model):
    assert accel.WINOGRAD == ("P2", "P3", "layer3")
    fpn_before = [type(block).__name__ for block in small_model.backbone.fpn.layer_blocks]
    wrapper = accel._BackboneRPNHead(small_model, accel.WINOGRAD).eval()
    kinds = [isinstance(block, WinogradConv3x3) for block in wrapper.backbone.fpn.layer_blocks]
    assert kinds == [True, True, False, False]
    assert isinstance(wrapper.head, accel._RPNHeadPerLevel)
    assert wrapper.head.winograd_levels == {0, 1}
    assert accel.WINOGRAD_STRIPS == {"P2": 2}
    assert wrapper.backbone.fpn.layer_blocks[0].strips == wrapper.head.winograd[0].strips == 2
    assert wrapper.backbone.fpn.layer_blocks[1].strips == wrapper.head.winograd[1].strips == 1
    body = wrapper.backbone.body
    # layer3's first block has the stride-2 convolution: it stays direct
    assert [isinstance(block.conv2, WinogradConv3x3) for block in body.layer3] == [False] + [True] * 5
    assert not any(isinstance(m, WinogradConv3x3) for m in body.layer2.modules())
    # the model itself keeps its direct convolutions (copies were changed)
    assert [type(block).__name__ for block in small_model.backbone.fpn.layer_blocks] == fpn_before
    assert not any(isinstance(m, WinogradConv3x3) for m in small_model.modules())

    direct = accel._BackboneRPNHead(small_model).eval()
    torch.manual_seed(2)
    images = torch.rand(1, 3, 160, 224)  # a multiple of 32, as torchvision's transform pads
    with torch.no_grad():
        want, got = direct(images), wrapper(images)
    assert len(got) == len(want) == 15
    for got_map, want_map in zip(got, want):
        assert got_map.shape == want_map.shape
        assert relative_error(got_map, want_map.double()) < 1e-4


def test_unknown_winograd_place_is_refused(small_model):
    with pytest.raises(ValueError, match="P7"):
        accel._BackboneRPNHead(small_model, ("P2", "P7"))


def test_graph_cache_key_names_what_the_graph_computes():
    pytest.importorskip("openvino")
    direct = accel.graph_cache_key("abc")
    assert accel.graph_cache_key("abc", accel.WINOGRAD) != direct
    assert accel.graph_cache_key("abc", ("P2",)) != accel.graph_cache_key("abc", ("P2", "P3"))
    assert accel.graph_cache_key("abd") != direct
    assert accel.graph_cache_key("abc", ()) == direct
