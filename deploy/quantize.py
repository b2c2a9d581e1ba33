"""INT8 for the CPU: ONNX Runtime static quantization of an export_onnx file.

    quantize_onnx("model.onnx", "model.int8.onnx", images)    # or: maskrcnn export --int8
    detections = OnnxPredictor("model.int8.onnx", threads=2)(image)

`images` are a few of the user's own images (RGB [0, 1] Tensor[3, H, W], any size, as the
graph's input "image" takes them): ONNX Runtime runs the float graph on each and records
the range of every tensor that gets quantized (MinMax). The file written is QDQ
(QuantizeLinear / DequantizeLinear pairs around the quantized nodes; ONNX Runtime fuses
them into QLinearConv and friends), weights int8 per output channel, activations uint8.

What is quantized, and why (measured with bench/predict.py int8-ap on the demo model,
docs/benchmarks.md, INT8):
- the convolutions and fully connected layers of the backbone, FPN, RPN head, box head
  and mask head (Conv, ConvTranspose, Gemm): most of the float time at 800x1066 (Conv
  alone: 56% in the demo model, 74% in R50-FPN; ONNX Runtime's profiler);
- everything else stays float: the input transform (resize gathers, normalisation), the
  anchor / box decoding, TopK, NonMaxSuppression, RoiAlign and the mask-pasting MatMuls.
  Letting ONNX Runtime quantize every op type it can (MatMul, Resize, Add, ...) cost 0.21
  box AP (0.82 -> 0.61);
- KEEP_FLOAT: the last layer of each head (RPN objectness and deltas, box classifier and
  box regressor, mask logits) stays float too: they are cheap, their outputs are scores
  and coordinates, and keeping them float shrank the AP loss (box AP -0.0039 -> -0.0023,
  mask AP -0.0028 -> -0.0017).

Equal constants that the exporter shares through Identity nodes are copied first
(inline_shared_initializers): ONNX Runtime fuses a QDQ Conv into QLinearConv only when its
bias is an initializer.

Shapes: H/W image size.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["quantize_onnx", "QUANTIZED_OP_TYPES", "KEEP_FLOAT", "float_nodes",
           "inline_shared_initializers"]

# Op types that get QDQ pairs: the weight-carrying compute of the network.
QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm")
# Node-name prefixes (export_onnx names nodes by module path) kept in float among those op
# types: each head's output layer.
KEEP_FLOAT = ("/model/rpn/head/cls_logits", "/model/rpn/head/bbox_pred",
              "/model/roi_heads/box_predictor/", "/model/roi_heads/mask_predictor/Conv")

PathLike = Union[str, os.PathLike]


def float_nodes(model, op_types: Sequence[str] = QUANTIZED_OP_TYPES,
                keep_float: Sequence[str] = KEEP_FLOAT) -> list[str]:
    """Names of the nodes of `model` (an onnx.ModelProto) of `op_types` whose name starts
    with one of the `keep_float` prefixes: the nodes quantize_onnx leaves in float."""
    return [n.name for n in model.graph.node
            if n.op_type in op_types and n.name.startswith(tuple(keep_float))]


def inline_shared_initializers(model) -> int:
    """Replace each Identity of an initializer in `model` (onnx.ModelProto, changed in
    place) by a copy of the initializer under the Identity's output name; returns how many.

    The exporter stores equal constants once and reaches the repeats through Identity
    nodes (all-zero conv biases of a converted or freshly initialised model, for one). A
    Conv whose bias comes out of an Identity does not match ONNX Runtime's QDQ Conv
    pattern: it stays a float Conv between DequantizeLinear nodes, slower than the float
    model (measured: R50-FPN, bench/predict.py latency)."""
    from onnx import numpy_helper
    initializers = {t.name: t for t in model.graph.initializer}
    inlined = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers:
            array = numpy_helper.to_array(initializers[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
            inlined.append(node)
    for node in inlined:
        model.graph.node.remove(node)
    return len(inlined)


class _ImageReader:
    """onnxruntime.quantization's CalibrationDataReader over images Tensor[3, H, W]: one
    feed {"image": float32[3, H, W]} per get_next(), None at the end; a progress bar."""

    def __init__(self, images: Sequence[Tensor], progress: bool):
        self.images = images
        self.index = 0
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=len(images), desc="calibrate", unit="img",
                            dynamic_ncols=True)

    def get_next(self) -> Optional[dict]:
        if self.index == len(self.images):
            if self.bar is not None:
                self.bar.close()
            return None
        image = self.images[self.index]
        self.index += 1
        if self.bar is not None:
            self.bar.update(1)
        return {"image": np.ascontiguousarray(image.detach().cpu().to(torch.float32).numpy())}

    def rewind(self) -> None:
        self.index = 0


def _check_images(images: Iterable[Tensor]) -> list[Tensor]:
    images = list(images)
    if not images:
        raise ValueError("quantize_onnx: no calibration images (give a few of your own "
                         "images, RGB [0, 1] Tensor[3, H, W])")
    for i, image in enumerate(images):
        if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3 \
                or not image.is_floating_point():
            shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
            raise ValueError(f"quantize_onnx: calibration image {i} is {shape}; expected a "
                             f"float RGB Tensor[3, H, W] in [0, 1]")
    return images


def quantize_onnx(float_path: PathLike, out_path: PathLike, calibration_images:
                  Iterable[Tensor], op_types: Sequence[str] = QUANTIZED_OP_TYPES,
                  keep_float: Sequence[str] = KEEP_FLOAT, per_channel: bool = True,
                  progress: bool = True) -> Path:
    """Write the INT8 (QDQ) version of an export_onnx file, calibrated on images.

    Args:
        float_path: the float .onnx file (deploy.export_onnx).
        out_path: the .onnx file to write (its folder is created).
        calibration_images: RGB [0, 1] Tensor[3, H, W] images like those the model will
            see (a few dozen are plenty; each runs once through the float graph).
        op_types: ONNX op types to quantize (QUANTIZED_OP_TYPES); None: every type
            ONNX Runtime can quantize.
        keep_float: node-name prefixes left in float among them (KEEP_FLOAT).
        per_channel: int8 weights per output channel (else per tensor).
        progress: a progress bar over the calibration images.
    Returns:
        out_path.
    Raises:
        FileNotFoundError naming float_path; ValueError when there are no images or one
        is not a Tensor[3, H, W]; ImportError when onnxruntime is missing.
    """
    try:
        import onnx
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    except ImportError:
        raise ImportError("INT8 quantization needs onnxruntime: pip install "
                          "'mask-rcnn-pytorch[export]' (or onnx onnxruntime)") from None
    float_path, out_path = Path(float_path), Path(out_path)
    if not float_path.is_file():
        raise FileNotFoundError(f"quantize_onnx: float model {float_path} not found "
                                f"(write it with deploy.export_onnx)")
    images = _check_images(calibration_images)
    model = onnx.load(str(float_path))
    inline_shared_initializers(model)
    excluded = float_nodes(model, op_types or (), keep_float)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger()
    level = quiet.level
    # quantize_static logs a hint at WARNING to run its pre-processing (symbolic shape
    # inference, graph optimisation) first; not used here: ONNX Runtime's own session
    # optimisations fuse the QDQ groups, and the measured speed-up is without it.
    quiet.setLevel(logging.ERROR)
    try:
        quantize_static(model, str(out_path), _ImageReader(images, progress),
                        quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        op_types_to_quantize=list(op_types) if op_types else None,
                        nodes_to_exclude=excluded, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    finally:
        quiet.setLevel(level)
    return out_path
