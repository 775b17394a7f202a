"""torchvision's box head (``TwoMLPHead``) and box predictor (``FastRCNNPredictor``) as a small
OpenVINO fp32 graph built from their weights.

They are four fully connected layers over the 1000 proposals' 256x7x7 RoIAlign features (about
28 GFLOP at 1000 proposals, most in ``fc6``). OpenVINO's fully connected kernels run them about
twice as fast as torch's on these CPUs; the kernels are chosen by the plugin for the CPU it runs on
(AVX2, AVX-512, AMX). fp32, so the same answers to float rounding. The graph is built in memory
from the weights (no conversion, no cache): it takes milliseconds.
"""

from __future__ import annotations

import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from common.model.accel.backend import openvino_module


def supported(head, predictor) -> bool:
    """torchvision's own layout of the two modules (anything else stays in torch)."""
    return (
        type(head) is TwoMLPHead
        and type(predictor) is FastRCNNPredictor
        and all(
            isinstance(m, torch.nn.Linear)
            for m in (head.fc6, head.fc7, predictor.cls_score, predictor.bbox_pred)
        )
    )


class BoxHeadGraph:
    """``(box_features N x C x 7 x 7) -> (class_logits, box_regression)``, as
    ``box_predictor(box_head(box_features))`` computes them. Not thread-safe (one request)."""

    def __init__(self, head, predictor, core, config: dict):
        ov = openvino_module()
        ops = ov.opset13
        fc6, fc7 = head.fc6, head.fc7

        # The constants use the weights' own memory (memory-mapped from the weights file, see
        # common.model.weights) instead of copies: the tensors are kept alive with the graph.
        self._weights: list[torch.Tensor] = []

        def constant(tensor: torch.Tensor):
            tensor = tensor.detach().float().contiguous()
            self._weights.append(tensor)
            return ops.constant(tensor.numpy(), shared_memory=True)

        def linear(x, layer: torch.nn.Linear):
            product = ops.matmul(x, constant(layer.weight), transpose_a=False, transpose_b=True)
            return ops.add(product, constant(layer.bias))

        features = ops.parameter([-1, fc6.in_features], ov.Type.f32, name="box_features")
        hidden = ops.relu(linear(ops.relu(linear(features, fc6)), fc7))
        outputs = [linear(hidden, predictor.cls_score), linear(hidden, predictor.bbox_pred)]
        model = ov.Model([output.output(0) for output in outputs], [features], "box_head")
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, box_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = box_features.flatten(start_dim=1).contiguous()
        self.request.infer({0: flat.numpy()}, share_inputs=True)
        # copies: the request's buffers are reused by the next pass
        logits, deltas = (torch.from_numpy(self.request.get_output_tensor(i).data).clone() for i in range(2))
        return logits, deltas
