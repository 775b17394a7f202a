"""The exact and fast detect paths at run time: the converted graph plus torchvision's own code.

``AcceleratedMaskRCNN`` is called like torchvision's model in eval mode and gives the same answers:
- backbone + FPN + RPN head run as the OpenVINO graph (``common.model.accel.graph``), fp32 for
  ``exact`` (set explicitly: OpenVINO's CPU default is bf16 where the CPU has it), bf16 for ``fast``;
- the box head and box predictor (four fully connected layers) run as a second, small OpenVINO
  graph, fp32 on both paths (``common.model.accel.boxhead``);
- everything else is torchvision's own code, called piece by piece exactly as
  ``GeneralizedRCNN.forward`` calls it (transform, anchors, proposal decoding and NMS,
  post-processing), except that the box RoIAlign over the 1000 proposals, which torchvision runs
  single-threaded over all channels at once, runs in blocks of ``ROI_ALIGN_CHANNEL_BLOCK`` channels
  spread over ``ROI_ALIGN_THREADS`` threads (each value is one box's one channel, computed by
  torchvision's kernel: the result is bit-identical);
- the mask branch runs only when a request asks for masks (``masks_for``), and then only for the
  instances that request keeps: masks never change labels, scores or boxes. Its 28x28 mask
  probabilities are returned as they are (``mask_probs``), to be pasted into the image one
  instance at a time (``common.model.masks``).
It is not thread-safe (it reuses the graph's buffers): ``Detector`` runs one pass at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops.poolers import _multiscale_roi_align, _setup_scales

from common.model.accel import boxhead
from common.model.accel.backend import AccelUnavailable, openvino_module
from common.model.accel.cache import converted_graph_path, default_cache_dir
from common.model.accel.graph import FEATURE_NAMES, FPN_LEVELS, SIZE_DIVISIBLE

ROI_ALIGN_CHANNEL_BLOCK = 32  # channels per RoIAlign call (see AcceleratedMaskRCNN._box_roi_align)


class AcceleratedMaskRCNN:
    """Callable like the torchvision model in eval mode (``model([tensor]) -> [dict]``); masks only
    with ``masks_for``."""

    def __init__(
        self,
        model,
        weights_sha256: str,
        *,
        precision: str = "f32",
        cache_dir: str = "",
        threads: int = 0,
        roi_align_threads: int = 2,
        winograd=(),
    ):
        ov = openvino_module()
        self.model = model
        self.precision = precision
        self.winograd = tuple(winograd)
        if set(winograd) & set(FPN_LEVELS) and model.transform.size_divisible % SIZE_DIVISIBLE:
            raise AccelUnavailable(
                f"Winograd on FPN levels needs images padded to a multiple of "
                f"{SIZE_DIVISIBLE}, the model pads to {model.transform.size_divisible}"
            )
        core = ov.Core()
        threads = threads or torch.get_num_threads()
        xml = converted_graph_path(model, weights_sha256, cache_dir or default_cache_dir(), winograd)
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
        }
        self.compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        # The box head and predictor as a second graph, fp32 on both paths (``boxhead``).
        heads = model.roi_heads
        self.box_head = (
            boxhead.BoxHeadGraph(
                heads.box_head, heads.box_predictor, core, {**config, "INFERENCE_PRECISION_HINT": "f32"}
            )
            if boxhead.supported(heads.box_head, heads.box_predictor)
            else None
        )
        # The torch copies of what the graphs now do are no longer needed.
        model.backbone = None
        model.rpn.head = None
        if self.box_head is not None:
            heads.box_head = heads.box_predictor = None
        self.roi_align_threads = max(1, roi_align_threads)
        self._pool = (
            ThreadPoolExecutor(self.roi_align_threads - 1, thread_name_prefix="roi-align")
            if self.roi_align_threads > 1
            else None
        )

    # -- pieces ------------------------------------------------------------------------

    def _graph(self, batch: torch.Tensor):
        self.request.infer({0: batch.numpy()}, share_inputs=True)
        # views of the request's buffers: valid until the next infer (callers run one at a time)
        outputs = [torch.from_numpy(self.request.get_output_tensor(i).data) for i in range(15)]
        features = OrderedDict(zip(FEATURE_NAMES, outputs[:5], strict=True))
        return features, outputs[5:10], outputs[10:15]

    def _box_roi_align(self, features, proposals, image_shapes):
        """torchvision's ``MultiScaleRoIAlign`` for the box head, in channel blocks spread over
        threads. Every output value is computed exactly as torchvision does (each is one channel of
        one box): only the order of the work changes. Blocks of ``ROI_ALIGN_CHANNEL_BLOCK``
        channels keep the feature planes the 1000 boxes read from in cache, which all channels at
        once do not; torchvision's CPU kernel is single-threaded and releases the
        GIL, so blocks pooled on two threads use both cores."""
        pool = self.model.roi_heads.box_roi_pool
        x = [features[name] for name in pool.featmap_names]
        if pool.scales is None or pool.map_levels is None:
            pool.scales, pool.map_levels = _setup_scales(
                x, image_shapes, pool.canonical_scale, pool.canonical_level
            )

        def run(blocks):
            with torch.inference_mode():
                return [
                    _multiscale_roi_align(
                        [level[:, start:stop] for level in x],
                        proposals,
                        pool.output_size,
                        pool.sampling_ratio,
                        pool.scales,
                        pool.map_levels,
                    )
                    for start, stop in blocks
                ]

        channels = x[0].shape[1]
        blocks = [
            (start, min(start + ROI_ALIGN_CHANNEL_BLOCK, channels))
            for start in range(0, channels, ROI_ALIGN_CHANNEL_BLOCK)
        ]
        executor = self._pool
        count = min(self.roi_align_threads, len(blocks)) if executor else 1
        groups = [blocks[i * len(blocks) // count : (i + 1) * len(blocks) // count] for i in range(count)]
        futures = [executor.submit(run, group) for group in groups[1:]] if executor else []
        outputs = run(groups[0])
        for future in futures:
            outputs += future.result()
        return torch.cat(outputs, dim=1)

    # -- forward -----------------------------------------------------------------------

    def __call__(self, images: list[torch.Tensor], masks_for=None) -> list[dict]:
        """``masks_for(scores, labels)``, if given, chooses the instances to keep and compute masks
        for (as ``mask_probs``, N x 1 x 28 x 28); without it, every instance, no masks."""
        if len(images) != 1:
            raise ValueError("one image at a time")
        model = self.model
        with torch.inference_mode():
            original_sizes = [tuple(image.shape[-2:]) for image in images]
            image_list, _ = model.transform(images)
            features, objectness, deltas = self._graph(image_list.tensors)

            # RegionProposalNetwork.forward, from its head's outputs on
            rpn = model.rpn
            anchors = rpn.anchor_generator(image_list, list(features.values()))
            num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
            objectness, deltas = concat_box_prediction_layers(objectness, deltas)
            proposals = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
            proposals, _ = rpn.filter_proposals(
                proposals, objectness, image_list.image_sizes, num_anchors_per_level
            )

            # RoIHeads.forward (inference, boxes only)
            heads = model.roi_heads
            box_features = self._box_roi_align(features, proposals, image_list.image_sizes)
            if self.box_head is not None:
                class_logits, box_regression = self.box_head(box_features)
            else:
                class_logits, box_regression = heads.box_predictor(heads.box_head(box_features))
            boxes, scores, labels = heads.postprocess_detections(
                class_logits, box_regression, proposals, image_list.image_sizes
            )
            detections = [
                {"boxes": box, "labels": label, "scores": score}
                for box, score, label in zip(boxes, scores, labels, strict=True)
            ]
            if masks_for is not None:
                detections = [self._with_masks(features, d, masks_for, image_list) for d in detections]
            return model.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    def _with_masks(self, features, detection: dict, masks_for, image_list) -> dict:
        """The kept instances of ``detection`` with their mask probabilities: ``RoIHeads.forward``'s
        mask branch (inference), on those instances only."""
        keep = masks_for(detection["scores"], detection["labels"])
        kept = {name: value[keep] for name, value in detection.items()}
        heads = self.model.roi_heads
        mask_features = heads.mask_roi_pool(features, [kept["boxes"]], image_list.image_sizes)
        mask_logits = heads.mask_predictor(heads.mask_head(mask_features))
        # named so that transform.postprocess leaves them be (it would paste "masks" all at once)
        kept["mask_probs"] = maskrcnn_inference(mask_logits, [kept["labels"]])[0]
        return kept
