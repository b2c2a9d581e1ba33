"""Deploy a MaskRCNN without this library's Python code: ONNX and torch.export.

    from maskrcnn import MaskRCNN
    import deploy

    model = MaskRCNN(pretrained="coco")
    deploy.export_onnx(model, "model.onnx")       # ONNX Runtime, OpenVINO, ...
    deploy.export_program(model, "model.pt2")     # torch.export (needs `import libs`)

    detections = deploy.OnnxPredictor("model.onnx")(image)   # as model([image])[0]
    detections = deploy.OpenVinoPredictor("model.onnx")(image)   # the same in OpenVINO
    deploy.quantize_onnx("model.onnx", "model.int8.onnx", images)   # INT8 for the CPU

Both take the model's own input, one RGB image Tensor[3, H, W] in [0, 1] of any size
(the resize, normalisation and padding are inside the graph), and return boxes Tensor[D, 4]
(x1, y1, x2, y2) in image pixels, labels Tensor[D] int64, scores Tensor[D] and masks
Tensor[D, 1, H, W] probabilities. `maskrcnn export` is the command line. See README.md,
section Export, for what runs where.
"""
from .graph import OUTPUT_NAMES, InferenceGraph
from .onnx_export import OPSET, OnnxPredictor, OpenVinoPredictor, export_onnx, register_symbolics
from .quantize import KEEP_FLOAT, QUANTIZED_OP_TYPES, quantize_onnx
from .program import aoti_package, export_program, exported_program, load_program

__all__ = ["InferenceGraph", "OUTPUT_NAMES", "export_onnx", "OnnxPredictor",
           "OpenVinoPredictor", "OPSET",
           "register_symbolics", "export_program", "exported_program", "load_program",
           "aoti_package", "quantize_onnx", "QUANTIZED_OP_TYPES", "KEEP_FLOAT"]
