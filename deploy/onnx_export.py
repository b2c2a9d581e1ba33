"""ONNX export of InferenceGraph with the TorchScript-based exporter, and an ONNX Runtime
runner.

    export_onnx(model, "model.onnx")                  # or: maskrcnn export --format onnx
    predictor = OnnxPredictor("model.onnx")           # needs onnxruntime
    detections = predictor(image)                     # as model([image])[0]

Why the TorchScript exporter (torch.onnx.export(..., dynamo=False)): InferenceGraph keeps
every size computation in tensor ops under its tracer, so one trace is valid for every
image size, and our two custom ops map one-to-one onto standard ONNX ops through
torch.onnx.register_custom_op_symbolic:

    maskrcnn::roi_align  -> RoiAlign (opset 16; coordinate_transformation_mode half_pixel
                            when aligned, output_half_pixel when not; sampling_ratio 0 =
                            adaptive, as ours); the multi-level pooling is one RoiAlign per
                            level and a ScatterND back into box order (InferenceGraph with
                            per_level_pooling)
    maskrcnn::nms        -> NonMaxSuppression (one class; per-class and per-level NMS by
                            coordinate offsets, as torchvision's batched_nms)

The dynamo exporter would need the same two translations written in onnxscript and
re-traces the data-dependent shapes (NMS, nonzero) as unbacked symbols; it buys nothing
here and adds a dependency.

Inputs / outputs of the ONNX model: "image" float32 [3, H, W] (RGB in [0, 1], H and W
dynamic) -> "boxes" [D, 4], "labels" [D] int64, "scores" [D], "masks" [D, 1, H, W]
(mask models only).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.onnx import register_custom_op_symbolic, symbolic_helper

from .graph import OUTPUT_NAMES, InferenceGraph, example_image

__all__ = ["export_onnx", "OnnxPredictor", "register_symbolics", "OPSET"]

# RoiAlign's coordinate_transformation_mode needs opset 16; GridSample-free pasting and
# every other op exist in 16 too. 17 is the highest the TorchScript exporter knows well.
OPSET = 17
_MAX_OUTPUT = 2 ** 62


def _const(g, value, dtype=torch.int64):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


@symbolic_helper.parse_args("v", "v", "f", "i", "i", "i", "b")
def _roi_align(g, input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    """maskrcnn::roi_align(input [N, C, H, W], rois [K, 5]) -> RoiAlign."""
    axis = _const(g, [1])
    batch = g.op("Slice", rois, _const(g, [0]), _const(g, [1]), axis)
    batch = g.op("Cast", g.op("Squeeze", batch, axis), to_i=7)    # INT64
    boxes = g.op("Slice", rois, _const(g, [1]), _const(g, [5]), axis)
    mode = "half_pixel" if aligned else "output_half_pixel"
    return g.op("RoiAlign", input, boxes, batch, spatial_scale_f=spatial_scale,
                output_height_i=pooled_h, output_width_i=pooled_w,
                sampling_ratio_i=max(sampling_ratio, 0),
                coordinate_transformation_mode_s=mode, mode_s="avg")


@symbolic_helper.parse_args("v", "v", "f")
def _nms(g, boxes, scores, iou_threshold):
    """maskrcnn::nms(boxes [n, 4], scores [n]) -> NonMaxSuppression, kept indices [k]."""
    boxes = g.op("Unsqueeze", boxes, _const(g, [0]))
    scores = g.op("Unsqueeze", scores, _const(g, [0, 1]))
    selected = g.op("NonMaxSuppression", boxes, scores, _const(g, [_MAX_OUTPUT]),
                    _const(g, [iou_threshold], torch.float32))
    index = g.op("Gather", selected, _const(g, [2]), axis_i=1)
    return g.op("Squeeze", index, _const(g, [1]))


def register_symbolics(opset: int = OPSET) -> None:
    """Teach the TorchScript ONNX exporter our custom ops (idempotent)."""
    register_custom_op_symbolic("maskrcnn::roi_align", _roi_align, opset)
    register_custom_op_symbolic("maskrcnn::nms", _nms, opset)


def export_onnx(model: nn.Module, path: Union[str, os.PathLike],
                example_size: tuple[int, int] = (480, 640), opset: int = OPSET) -> Path:
    """Write `model` (a MaskRCNN) as an ONNX file for inference on one image of any size.

    Args:
        model: a MaskRCNN (any of the zoo's presets or our checkpoints); not modified.
        path: the .onnx file to write (its folder is created).
        example_size: (H, W) of the image traced with; the graph holds for every size.
        opset: ONNX opset, >= 16 (RoiAlign's coordinate_transformation_mode).
    Returns:
        the path written.
    """
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes the file with it)
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install "
                          "'mask-rcnn-pytorch[export]' (or onnx onnxruntime)") from None
    if opset < 16:
        raise ValueError(f"opset {opset}: RoiAlign with half_pixel (aligned) coordinates "
                         f"needs opset 16 or later")
    register_symbolics(opset)
    graph = InferenceGraph(model)
    outputs = list(OUTPUT_NAMES if graph.mask_on else OUTPUT_NAMES[:3])
    axes = {"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
            "labels": {0: "detections"}, "scores": {0: "detections"}}
    if graph.mask_on:
        axes["masks"] = {0: "detections", 2: "height", 3: "width"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every size it sees as a tensor: that is the point here.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example_image(example_size),), str(path), dynamo=False,
                          opset_version=opset, input_names=["image"], output_names=outputs,
                          dynamic_axes=axes, do_constant_folding=True)
    return path


class OnnxPredictor:
    """An exported model in ONNX Runtime (CPU): predictor(image) -> dict(boxes, labels,
    scores[, masks]) of torch Tensors, like MaskRCNN's eval output for one image.

    Args:
        path: the .onnx file.
        threads: intra-op threads (None: ONNX Runtime's default, all cores).
        layout_optimizations: ONNX Runtime's layout pass (its NCHWc transformer: blocked
            convolutions, ~1.5x faster on the CPU). ONNX Runtime 1.32's pass was seen to
            change one detection's mask of 600 in tests/deploy/test_sizes.py (the same
            graph without the pass, and the graph run by PyTorch, give eager's); False
            runs every other optimization.
    """

    def __init__(self, path: Union[str, os.PathLike], threads: Optional[int] = None,
                 layout_optimizations: bool = True):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("onnxruntime is not installed: pip install "
                              "'mask-rcnn-pytorch[export]' (or onnxruntime)") from None
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        disabled = [] if layout_optimizations else ["NchwcTransformer"]
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"],
                                            disabled_optimizers=disabled)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, image: Tensor) -> dict:
        """image: Tensor[3, H, W] float RGB in [0, 1]."""
        feed = {"image": image.detach().to(torch.float32).cpu().contiguous().numpy()}
        values = self.session.run(self.outputs, feed)
        return {name: torch.from_numpy(v) for name, v in zip(self.outputs, values)}


def _onnx_output_name(output, index: int) -> str:
    """The ONNX name of a compiled OpenVINO output. Its tensor may carry more names than
    the ONNX output's (with the detectron2 rules, "boxes" and the Concat producing it),
    and get_any_name() returns either: take the one among OUTPUT_NAMES, else the name
    export_onnx gives that position."""
    names = output.get_names()
    return next((name for name in OUTPUT_NAMES if name in names), OUTPUT_NAMES[index])


class OpenVinoPredictor:
    """An exported ONNX model in OpenVINO (CPU), called like OnnxPredictor: predictor(image)
    -> dict(boxes, labels, scores[, masks]) of torch Tensors.

    Args:
        path: the .onnx file (OpenVINO reads it directly; no conversion step).
        threads: inference threads (None: OpenVINO's default, all cores).
        precision: the CPU plugin's inference precision. "f32" by default: on CPUs with
            bfloat16 units OpenVINO would otherwise run in bf16 and move scores by ~1e-2.
    """

    def __init__(self, path: Union[str, os.PathLike], threads: Optional[int] = None,
                 precision: str = "f32"):
        try:
            import openvino as ov
        except ImportError:
            raise ImportError("openvino is not installed: pip install openvino") from None
        config = {"INFERENCE_PRECISION_HINT": precision}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.outputs = [_onnx_output_name(o, i) for i, o in enumerate(self.compiled.outputs)]

    def __call__(self, image: Tensor) -> dict:
        """image: Tensor[3, H, W] float RGB in [0, 1]."""
        feed = image.detach().to(torch.float32).cpu().contiguous().numpy()
        self.request.infer({0: feed})
        return {name: torch.from_numpy(self.request.get_output_tensor(i).data.copy())
                for i, name in enumerate(self.outputs)}
