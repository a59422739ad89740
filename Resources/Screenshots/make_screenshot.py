"""Render the module's outputs (reference MRI | synthetic MRI | difference) to a PNG, from a real run on nodes.

No Slicer GUI exists on the build machines, so this does what the module does without one: it loads
the CT and MRI into volume nodes of a real MRML scene (``slicer-core``), runs
``mrml.run_on_nodes`` (the module's Logic path), and draws one axial slice of each output node with
VTK offscreen, using the nodes' own display settings (window/level, the difference colour table).
If VTK cannot open an offscreen window, the same colour-mapped slices are composed with NumPy/PIL.

Default input: the sample case shipped with the module (Visible Human Male, NLM; see
``CTtoMRISynthesis/Resources/SampleData/SOURCE.md``), the only paired CT/MRI whose terms let the picture
be committed. ``--ct/--mri`` render any other case, e.g. the Harvard AANLIB slices, which have no
open licence: write those to a path outside the repository (or do not commit them).

    VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow python Resources/Screenshots/make_screenshot.py [--weights W]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = Path(__file__).resolve().parent / "CTtoMRISynthesis_outputs.png"
SAMPLE = REPO / "CTtoMRISynthesis" / "Resources" / "SampleData"
PANEL = 384  # pixels per panel side
CAPTION_H = 84


def run_on_nodes(ct_path: Path, mri_path: Path, weights, device: str, registration: str):
    import slicer

    from CTtoMRISynthesisLib import mrml
    from CTtoMRISynthesisLib.volumes import read_volume

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    ct_node = mrml.add_volume_node(scene, read_volume(ct_path, "CT"), "CT")
    mri_node = mrml.add_volume_node(scene, read_volume(mri_path, "MRI"), "MRI")
    outputs = mrml.run_on_nodes(scene, ct_node, mri_node, weights=weights, device=device, registration=registration)
    return scene, ct_node, mri_node, outputs


def axial_slice(node, index: int | None = None) -> tuple[np.ndarray, float, int]:
    """One axial slice of a node in radiological display order (rows anterior→posterior, columns right→left)."""
    from CTtoMRISynthesisLib import mrml

    image = sitk.DICOMOrient(mrml.image_from_volume_node(node, node.GetName()), "LPS")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if index is None:
        index = array.shape[0] // 2
    sx, sy = image.GetSpacing()[:2]
    return array[index], sy / sx, index


def best_slice(mri_node) -> int:
    """The axial slice with the most head in it (reference MRI > 0)."""
    from CTtoMRISynthesisLib import mrml

    image = sitk.DICOMOrient(mrml.image_from_volume_node(mri_node, "MRI"), "LPS")
    array = sitk.GetArrayFromImage(image)
    return int(np.argmax((array > 0).reshape(array.shape[0], -1).sum(axis=1)))


def head_box(reference: np.ndarray, margin: float = 0.08) -> tuple[slice, slice]:
    """Rows/columns around the head (reference > 0) with a margin, as a square where the image allows."""
    rows, cols = np.nonzero(reference > 0)
    if rows.size == 0:
        return slice(None), slice(None)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = int(max(r1 - r0, c1 - c0) * (1 + 2 * margin))
    rc, cc = (r0 + r1) // 2, (c0 + c1) // 2
    h, w = reference.shape
    r0, c0 = max(0, rc - side // 2), max(0, cc - side // 2)
    return slice(r0, min(h, r0 + side)), slice(c0, min(w, c0 + side))


def colour_map(node, slice2d: np.ndarray) -> np.ndarray:
    """RGB uint8 of a slice through the node's display: window/level, then its colour table (grey if none)."""
    display = node.GetDisplayNode()
    window, level = display.GetWindow(), display.GetLevel()
    if display.GetAutoWindowLevel() or window <= 0:
        lo, hi = np.percentile(slice2d, [1, 99])
    else:
        lo, hi = level - window / 2.0, level + window / 2.0
    x = np.clip((slice2d - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    colours = display.GetColorNode()
    if colours is None or colours.GetNumberOfColors() < 2:
        grey = (x * 255.0 + 0.5).astype(np.uint8)
        return np.dstack([grey] * 3)
    lut = colours.GetLookupTable()
    n = lut.GetNumberOfTableValues()
    table = np.array([lut.GetTableValue(i)[:3] for i in range(n)])
    return (table[np.round(x * (n - 1)).astype(int)] * 255.0 + 0.5).astype(np.uint8)


def render_vtk(panels: list[np.ndarray], titles: list[str], caption: str, aspects: list[float], path: Path) -> None:
    """Draw the RGB panels side by side with VTK offscreen and write a PNG."""
    import vtk
    from vtk.util import numpy_support

    width, height = PANEL * len(panels), PANEL + CAPTION_H
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(width, height)
    keep = []
    for n, (rgb, title, aspect) in enumerate(zip(panels, titles, aspects)):
        flipped = np.ascontiguousarray(rgb[::-1])  # VTK's image origin is bottom-left
        data = vtk.vtkImageData()
        data.SetDimensions(rgb.shape[1], rgb.shape[0], 1)
        data.SetSpacing(1.0, aspect, 1.0)
        data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flipped.reshape(-1, 3), deep=True,
                                                                  array_type=vtk.VTK_UNSIGNED_CHAR))
        actor = vtk.vtkImageActor()
        actor.GetMapper().SetInputData(data)
        renderer = vtk.vtkRenderer()
        renderer.SetViewport(n / len(panels), CAPTION_H / height, (n + 1) / len(panels), 1.0)
        renderer.SetBackground(0, 0, 0)
        renderer.AddViewProp(actor)
        renderer.ResetCamera()
        camera = renderer.GetActiveCamera()
        camera.ParallelProjectionOn()
        camera.SetParallelScale(0.5 * max(rgb.shape[0] * aspect, rgb.shape[1]) * 1.02)
        window.AddRenderer(renderer)
        keep += [data, actor, renderer]
    footer = vtk.vtkRenderer()
    footer.SetViewport(0.0, 0.0, 1.0, CAPTION_H / height)
    footer.SetBackground(0.12, 0.12, 0.12)
    for n, title in enumerate(titles):  # panel titles on the first footer line, under each panel
        label = vtk.vtkTextActor()
        label.SetInput(title)
        label.GetTextProperty().SetFontSize(18)
        label.GetTextProperty().SetColor(1.0, 1.0, 0.6)
        label.SetDisplayPosition(n * PANEL + 10, CAPTION_H - 26)
        footer.AddViewProp(label)
        keep.append(label)
    text = vtk.vtkTextActor()
    text.SetInput(caption)
    text.GetTextProperty().SetFontSize(15)
    text.GetTextProperty().SetColor(0.9, 0.9, 0.9)
    text.SetDisplayPosition(10, 8)
    footer.AddViewProp(text)
    window.AddRenderer(footer)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    window.Finalize()


def render_pil(panels: list[np.ndarray], titles: list[str], caption: str, aspects: list[float], path: Path) -> None:
    """Fallback without OpenGL: the same panels composed with PIL."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (PANEL * len(panels), PANEL + CAPTION_H), (30, 30, 30))
    draw = ImageDraw.Draw(canvas)
    for n, (rgb, title, aspect) in enumerate(zip(panels, titles, aspects)):
        h, w = rgb.shape[0] * aspect, rgb.shape[1]
        scale = PANEL / max(h, w)
        tile = Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        box = Image.new("RGB", (PANEL, PANEL), (0, 0, 0))
        box.paste(tile, ((PANEL - tile.width) // 2, (PANEL - tile.height) // 2))
        canvas.paste(box, (n * PANEL, 0))
        draw.text((n * PANEL + 10, PANEL + 6), title, fill=(255, 255, 150))
    draw.text((10, PANEL + 30), caption, fill=(230, 230, 230))
    canvas.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, default=SAMPLE / "ct.nrrd")
    parser.add_argument("--mri", type=Path, default=SAMPLE / "mri.nrrd")
    parser.add_argument("--weights", help="model file (default: the shipped model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--registration", default="none",
                        help="none (default: the shipped sample's MR is already on the CT's grid), rigid or similarity")
    parser.add_argument("--slice", type=int, help="axial slice (canonical order); default: the one with the most head")
    parser.add_argument("--source", default="Visible Human Male, courtesy of the U.S. National Library of Medicine",
                        help="data attribution for the caption")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--backend", choices=["auto", "vtk", "pil"], default="auto")
    args = parser.parse_args(argv)
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

    from CTtoMRISynthesisLib import mrml

    _scene, _ct, mri_node, outputs = run_on_nodes(args.ct, args.mri, args.weights, args.device, args.registration)
    index = args.slice if args.slice is not None else best_slice(mri_node)
    nodes = [mri_node, outputs["synthetic_mri"], outputs["difference"]]
    slices = [axial_slice(node, index) for node in nodes]
    rows, cols = head_box(slices[0][0])  # zoom to the head in the reference MRI
    panels = [colour_map(node, s[0])[rows, cols] for node, s in zip(nodes, slices)]
    aspects = [s[1] for s in slices]
    half = outputs["difference"].GetDisplayNode().GetWindow() / 2.0
    titles = ["reference MRI", "synthetic MRI", f"difference (MRI - synthetic), ±{half:.0f}"]
    summary = mrml.summary_of(outputs)
    weights = summary.get("weights") or {}
    caption = (
        f"MAE {summary['mae']:.1f}  SSIM {summary['ssim']:.3f}  PSNR {summary['psnr']:.1f} dB (0..255, whole case)   "
        f"axial slice {index}   model: {weights.get('name') or weights.get('file')}   device {summary.get('device')}\n"
        f"data: {args.source}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    backend = args.backend
    if backend in ("auto", "vtk"):
        try:
            render_vtk(panels, titles, caption, aspects, args.out)
            backend = "vtk"
        except Exception as exc:  # no OpenGL here: fall back
            if args.backend == "vtk":
                raise
            print(f"VTK offscreen rendering failed ({exc}); using PIL", file=sys.stderr)
            backend = "pil"
    if backend == "pil":
        render_pil(panels, titles, caption, aspects, args.out)
    print(f"wrote {args.out} ({backend}); {caption.splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
