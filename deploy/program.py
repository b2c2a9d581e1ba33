"""torch.export of InferenceGraph: an ExportedProgram (.pt2) with our custom ops, and the
AOTInductor attempt.

    export_program(model, "model.pt2")       # or: maskrcnn export --format pt2
    program = load_program("model.pt2")      # in any process: imports libs (the ops) first
    boxes, labels, scores, masks = program.module()(image)

The program keeps `maskrcnn::roi_align_multilevel` (one fused multi-level RoIAlign) and
`maskrcnn::nms` as calls to our custom ops, so loading it needs their registration:
`import libs` (done by load_program; `import deploy` does it too), i.e. this package's
libs/ and its compiled kernels (or their pure-PyTorch fallback). Everything else is ATen.
Image height and width are dynamic (2..8192); detections (NMS, thresholds) are
data-dependent sizes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
from torch import nn

from .graph import OUTPUT_NAMES, InferenceGraph, example_image

__all__ = ["export_program", "load_program", "aoti_package", "MAX_SIDE"]

# Largest image side the program accepts (torch.export needs a range for each dynamic dim).
MAX_SIDE = 8192


def _dynamic_shapes():
    from torch.export import Dim
    return ({1: Dim("height", min=2, max=MAX_SIDE), 2: Dim("width", min=2, max=MAX_SIDE)},)


def exported_program(model: nn.Module, example_size: tuple[int, int] = (480, 640)):
    """torch.export.export of InferenceGraph(model) with dynamic height and width.

    Returns:
        torch.export.ExportedProgram: image Tensor[3, H, W] -> (boxes, labels, scores[,
        masks]) as InferenceGraph.
    """
    graph = InferenceGraph(model)
    with torch.no_grad():
        return torch.export.export(graph, (example_image(example_size),),
                                   dynamic_shapes=_dynamic_shapes(), strict=False)


def export_program(model: nn.Module, path: Union[str, os.PathLike],
                   example_size: tuple[int, int] = (480, 640)) -> Path:
    """Write `model` (a MaskRCNN) as a torch.export .pt2 file (torch.export.save).

    Args:
        model: a MaskRCNN; not modified.
        path: the .pt2 file to write (its folder is created).
        example_size: (H, W) of the example image; the program holds for every size.
    Returns:
        the path written.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"{path}: torch.export programs are .pt2 files; name it "
                         f"{path.with_suffix('.pt2').name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(exported_program(model, example_size), str(path))
    return path


def load_program(path: Union[str, os.PathLike]):
    """torch.export.load of a .pt2 written by export_program, after registering the
    `maskrcnn::` ops it calls (import libs). Returns the ExportedProgram; run it as
    program.module()(image)."""
    import libs  # noqa: F401  (registers maskrcnn::roi_align_multilevel, maskrcnn::nms)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .pt2 file (write one with "
                                f"`maskrcnn export --format pt2 --out {path}`)")
    return torch.export.load(str(path))


def aoti_package(model_or_program, path: Union[str, os.PathLike],
                 example_size: tuple[int, int] = (480, 640)) -> Path:
    """Compile with AOTInductor into a .pt2 package (torch._inductor.aoti_compile_and_package).

    Args:
        model_or_program: a MaskRCNN or an ExportedProgram from exported_program.
        path: the package to write.
    Returns:
        the path written. Load it with torch._inductor.aoti_load_package(path) (after
        `import libs`: the compiled code calls our custom ops through the dispatcher).
    Raises:
        RuntimeError from Inductor when it cannot compile the program (see README: Export).
    """
    from torch._inductor import aoti_compile_and_package
    program = model_or_program
    if isinstance(model_or_program, nn.Module):
        program = exported_program(model_or_program, example_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(aoti_compile_and_package(program, package_path=str(path)))


def outputs_as_dict(outputs) -> dict:
    """The program's output tuple as MaskRCNN's detection dict."""
    return dict(zip(OUTPUT_NAMES, outputs))
