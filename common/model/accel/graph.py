"""backbone + FPN + RPN head as one traceable module, and its conversion to an OpenVINO graph.

That part is most of ``maskrcnn_resnet50_fpn``'s arithmetic. It is converted once per
weights (``common.model.accel.cache`` keeps the result) into one OpenVINO graph with a dynamic
input height and width. Where it pays, 3x3 convolutions are computed with Winograd's F(4x4, 3x3)
(``common.model.accel.winograd``): 4x fewer multiplications, the same answers to float rounding.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from common.model.accel.backend import AccelUnavailable, openvino_module
from common.model.accel.winograd import WinogradConv3x3, is_winograd_compatible

log = logging.getLogger(__name__)

FEATURE_NAMES = ("0", "1", "2", "3", "pool")
# Conversion example: a typical resized 640x480 photo (800x1067 padded to 32); the graph keeps
# height and width dynamic.
EXAMPLE_SHAPE = (1, 3, 800, 1088)
# Where the exact path computes 3x3 convolutions with Winograd F(4x4, 3x3): the FPN's output
# convolution and the RPN head's on levels P2 and P3, and the bottlenecks of ResNet stage layer3
# (batch norm folded in). Elsewhere the saved multiplications do not outweigh the transforms.
# P2 and P3 hold whole 4x4 tiles because torchvision pads images to a multiple of 32.
WINOGRAD = ("P2", "P3", "layer3")
FPN_LEVELS = ("P2", "P3", "P4", "P5")  # the FPN's layer_blocks, in order (P6 is a max-pool)
# Row strips per FPN level, each transformed and multiplied on its own: with a dynamic input shape
# OpenVINO keeps each large intermediate tensor allocated between passes, and two strips on P2
# halve the largest ones at the same speed.
WINOGRAD_STRIPS = {"P2": 2}
# In bf16 the transforms' large coefficients cost accuracy for no speed: the fast path keeps
# direct convolutions.
FAST_WINOGRAD: tuple[str, ...] = ()
SIZE_DIVISIBLE = 32


def single_conv(block: torch.nn.Module) -> torch.nn.Conv2d:
    """The one convolution of a torchvision conv block (a Conv2d, or Conv2dNormActivation without
    a norm, possibly inside a Sequential, possibly followed by a ReLU)."""
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
    others = [
        m for m in block.modules() if not isinstance(m, (torch.nn.Conv2d, torch.nn.Sequential, torch.nn.ReLU))
    ]
    if len(convs) != 1 or others:
        raise AccelUnavailable(f"unexpected block layout in torchvision's model: {block}")
    return convs[0]


class RPNHeadPerLevel(torch.nn.Module):
    """torchvision's ``RPNHead`` with its 3x3 convolution run by Winograd on some levels."""

    def __init__(self, head, winograd_levels, strips):
        super().__init__()
        self.head = head
        conv = single_conv(head.conv)
        self.has_relu = any(isinstance(m, torch.nn.ReLU) for m in head.conv.modules())
        self.winograd_levels = frozenset(winograd_levels)
        self.winograd = torch.nn.ModuleList(
            WinogradConv3x3.from_conv(conv, whole_tiles=True, strips=strips[level])
            if level in self.winograd_levels
            else torch.nn.Identity()
            for level in range(len(strips))
        )

    def forward(self, features):
        logits, deltas = [], []
        for level, feature in enumerate(features):
            if level in self.winograd_levels:
                hidden = self.winograd[level](feature)
                hidden = torch.relu(hidden) if self.has_relu else hidden
            else:
                hidden = self.head.conv(feature)
            logits.append(self.head.cls_logits(hidden))
            deltas.append(self.head.bbox_pred(hidden))
        return logits, deltas


class BackboneRPNHead(torch.nn.Module):
    """backbone + FPN + RPN head as one traceable module: image batch -> 5 features, 5 + 5 maps.

    ``winograd``: where 3x3 convolutions are computed by Winograd F(4x4, 3x3) instead of directly:
    FPN levels (``"P2"``: the FPN's output convolution and the RPN head's on that level) and ResNet
    stages (``"layer3"``: each bottleneck's stride-1 3x3 convolution with its batch norm). Works on
    copies: the model given is not changed."""

    def __init__(self, model, winograd=()):
        super().__init__()
        unknown = set(winograd) - set(FPN_LEVELS) - {f"layer{i}" for i in range(1, 5)}
        if unknown:
            raise ValueError(f"unknown Winograd places: {sorted(unknown)}")
        self.backbone = copy.deepcopy(model.backbone) if winograd else model.backbone
        self.head = model.rpn.head
        levels = [FPN_LEVELS.index(place) for place in winograd if place in FPN_LEVELS]
        strips = [WINOGRAD_STRIPS.get(FPN_LEVELS[level], 1) for level in range(len(FPN_LEVELS))]
        for level in levels:
            conv = single_conv(self.backbone.fpn.layer_blocks[level])
            self.backbone.fpn.layer_blocks[level] = WinogradConv3x3.from_conv(
                conv, whole_tiles=True, strips=strips[level]
            )
        if levels:
            self.head = RPNHeadPerLevel(copy.deepcopy(model.rpn.head), levels, strips)
        for stage in (place for place in winograd if place.startswith("layer")):
            for block in getattr(self.backbone.body, stage):
                if is_winograd_compatible(block.conv2):
                    block.conv2 = WinogradConv3x3.from_conv(block.conv2, block.bn2)
                    block.bn2 = torch.nn.Identity()

    def forward(self, images):
        features = list(self.backbone(images).values())
        objectness, deltas = self.head(features)
        return (*features, *objectness, *deltas)


def convert(model, xml: Path, winograd=()) -> None:
    ov = openvino_module()
    directory = xml.parent
    log.info("converting backbone+FPN+RPN head to OpenVINO (once per weights; cached in %s)", directory)
    wrapper = BackboneRPNHead(model, winograd).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation notice
        converted = ov.convert_model(
            wrapper, example_input=torch.zeros(EXAMPLE_SHAPE), input=[ov.PartialShape([1, 3, -1, -1])]
        )
    # Written under a temporary name and renamed, so that processes converting at the same time
    # never read a half-written file; weights stay fp32 (no compression to fp16).
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        tmp_xml = Path(tmp) / xml.name
        ov.save_model(converted, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp_xml, xml)
