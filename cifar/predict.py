"""predict.py's work: a trained network on a person's own image files (the tutorial reader's next step: a photo of
their cat). Each file is read with Pillow, made RGB, brought to 32x32 as torchvision's Resize(32) + CenterCrop(32)
do (CIFAR-10 networks only ever saw 32-pixel images), normalised as the run was, and its top-k classes printed as a
table, or as JSON, or drawn in a grid. A file that is not an image is one `error:` line; the others are predicted."""
from __future__ import annotations

import json
import os
import re
import sys

import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps, UnidentifiedImageError
from rich.console import Console as RichConsole
from rich.table import Table

from . import evaluation
from .data import class_names, normalize
from .errors import UserError
from .files import refuse_non_file
from .evaluate_run import bare_state_dict_note, is_state_dict_file, load_run
from .plots import grid_png
from .runtime import make_accelerator

SIZE = 32                 # what a CIFAR-10 network takes
EXIT_SOME_FAILED = 1      # some inputs were not images (each named on an error line); the rest were predicted
BATCH = 256
GRID_MAX = 64             # images drawn by --grid: the first ones (a figure of thousands is unreadable)
NOTE = (f"note: CIFAR-10 networks see {SIZE}x{SIZE} images: each was resized to {SIZE} pixels on its shorter side and "
        f"center-cropped (torchvision's Resize({SIZE}) + CenterCrop({SIZE})); --grid PNG shows what the network saw")


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """(paths, config overrides) of predict.py's positional arguments: `section.key=value` is an override unless a
    file of that name exists (argparse cannot tell them apart)."""
    override = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=.*")
    paths = [a for a in args if not override.fullmatch(a) or os.path.exists(a)]
    return paths, [a for a in args if a not in paths]


def image_files(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(files to read, [(path, problem)]): files as given, and the files directly inside given folders, by name
    (hidden ones skipped); a missing path or an empty folder is a problem of its own."""
    files, problems = [], []
    for path in paths:
        if os.path.isdir(path):
            inside = sorted(os.path.join(path, n) for n in os.listdir(path) if not n.startswith("."))
            inside = [p for p in inside if os.path.isfile(p)]
            files += inside
            if not inside:
                problems.append((path, "the folder holds no files; pass image files or a folder of them"))
        elif os.path.exists(path):
            files.append(path)
        else:
            problems.append((path, "no such file or folder"))
    return files, problems


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB: grayscale and palette images expanded; transparency flattened onto white (the colour
    under fully transparent pixels is arbitrary, often black, and a cut-out on white is what a person sees)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def read_image(path: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """(uint8 (3, 32, 32) as the network sees it, original (width, height)), or a UserError naming the file."""
    try:
        with Image.open(path) as opened:
            opened.load()                                   # decode now: a truncated file fails here
            image = ImageOps.exif_transpose(opened)         # phone photos: upright as they are shown
            size = image.size
            rgb = to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} is not an image Pillow can read ({reason}); pass PNG, JPEG or another image "
                        f"file") from None
    small = TF.center_crop(TF.resize(rgb, SIZE, interpolation=TF.InterpolationMode.BILINEAR, antialias=True), SIZE)
    return TF.pil_to_tensor(small), size


@torch.no_grad()
def probabilities(model, images: torch.Tensor, stats: str, accelerator) -> torch.Tensor:
    """Class probabilities (N, classes) of uint8 images, on the accelerator's device, normalised with `stats`."""
    model = model.to(accelerator.device).eval()
    out = []
    for chunk in images.split(BATCH):
        with accelerator.autocast():
            logits = evaluation.predict(model, normalize(chunk.to(accelerator.device), stats))
        out.append(logits.float().softmax(1).cpu())
    return torch.cat(out)


def predict_images(checkpoint: str, paths: list[str], overrides: list[str], top_k: int = 3, as_json: bool = False,
                   grid: str | None = None, pick: str = "auto") -> int:
    """Print each image's top-k classes; the exit status: 0, or EXIT_SOME_FAILED when an input was not an image."""
    if top_k < 1:
        raise UserError(f"--top-k must be 1 or more; got {top_k}")
    if not paths:
        raise UserError("no image given; pass image files or folders of them after the options")
    if grid:
        grid = grid_path(grid)
        if not os.path.isdir(os.path.dirname(os.path.abspath(grid))):
            raise UserError(f"--grid {grid}: its folder does not exist; create it or pass another path")
        refuse_non_file(grid)   # before the work, not after it
    cfg, model, weights = load_run(checkpoint, overrides, pick)
    classes = class_names(cfg.data)
    if top_k > len(classes):
        raise UserError(f"--top-k must be between 1 and {len(classes)} (the run's classes); got {top_k}")
    files, problems = image_files(paths)
    errors = [f"{path}: {problem}" for path, problem in problems]
    read = []
    for path in files:
        try:
            read.append((path, *read_image(path)))
        except UserError as e:
            errors.append(str(e))
    for line in errors:
        print(f"error: {line}", file=sys.stderr, flush=True)
    rows = []
    if read:
        accelerator = make_accelerator(cfg)
        probs = probabilities(model, torch.stack([r[1] for r in read]), cfg.data.normalize, accelerator)
        top = probs.topk(top_k, dim=1)
        for (path, _, size), p, k in zip(read, top.values.tolist(), top.indices.tolist()):
            rows.append({"image": path, "size": list(size),
                         "top": [{"class": classes[c], "probability": q} for c, q in zip(k, p)]})
    if as_json:
        print(json.dumps({"checkpoint": weights, "model": cfg.model.name, "normalize": cfg.data.normalize,
                          "dataset": cfg.data.dataset, "predictions": rows, "errors": errors}, indent=2))
    elif rows:
        if is_state_dict_file(weights):
            print(bare_state_dict_note(cfg, weights))
        print_table(rows, top_k)
    if grid and rows:
        shown = rows[:GRID_MAX]
        images = torch.stack([r[1] for r in read[:GRID_MAX]]).float().div(255).numpy()
        titles = [f"{os.path.basename(r['image'])[:18]}\n{r['top'][0]['class']} {r['top'][0]['probability']:.0%}"
                  for r in shown]
        grid_png(images, titles, ["black"] * len(shown), "what the network saw (32x32): top class", grid)
        if not as_json:
            print(f"wrote {grid}")
    return EXIT_SOME_FAILED if errors else 0


def grid_path(grid: str) -> str:
    """The file --grid writes, which is the name printed: FOLDER/predictions.png for a folder, and a name without
    .png gets it."""
    if os.path.isdir(grid):
        return os.path.join(grid, "predictions.png")
    return grid if grid.lower().endswith(".png") else grid + ".png"


def print_table(rows: list[dict], top_k: int) -> None:
    console = RichConsole()
    if not console.is_terminal:          # a pipe or a log: wide enough that paths are not folded
        console = RichConsole(width=200)
    table = Table("image", *(f"top-{i + 1}" for i in range(top_k)))
    for row in rows:
        table.add_row(row["image"], *(f"{t['class']} {100 * t['probability']:.1f}%" for t in row["top"]))
    console.print(table)
    console.print(NOTE, soft_wrap=True, highlight=False)
