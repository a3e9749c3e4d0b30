"""predict.py's work (`cifar-predict`), the twin of cifar/evaluate_cli.py: a trained network on a person's own image
files (the tutorial reader's next step: a photo of their cat). Each file is read with Pillow, made RGB, brought to
32x32 as torchvision's Resize(32) + CenterCrop(32) do (CIFAR-10 networks only ever saw 32-pixel images), normalised
as the run was, and its top-k classes printed as a table, or as JSON, or drawn in a grid. A file that is not an
image is one `error:` line; the others are predicted."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from rich.console import Console as RichConsole
from rich.table import Table

from . import evaluation
from .data import class_names, normalize
from .errors import UserError, cli, exit_as_command
from .files import refuse_non_file
from .plots import grid_png
from .runtime import make_accelerator
from .run_folder import is_state_dict_file
from .trained import add_run_arguments, bare_state_dict_note, load_trained

SIZE = 32                 # what a CIFAR-10 network takes
EXIT_SOME_FAILED = 1      # some inputs were not images (each named on an error line); the rest were predicted
BATCH = 256
GRID_MAX = 64             # images drawn by --grid: the first ones (a figure of thousands is unreadable)
# The largest image decoded: a 64-megapixel RGBA image is 256 MB decoded, 1 GB at most on the way to 8-bit RGB
# (16-bit or float pixels); phones take 12 to 50 megapixels. Checked from the header, before decoding.
MAX_PIXELS = 64_000_000
BAND_PIXELS = 2**22       # converted to RGB this many pixels at a time
DRAFT_SIDE = 256          # a large JPEG is decoded at a reduced scale, at least this on its shorter side
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
    """Any mode Pillow opens to 8-bit RGB, each scaled to 0..255 by its own range:
    - 1, L, P, RGB, CMYK, YCbCr: Pillow's conversion (1 bit: 0 or 255; CMYK inverted by its ink);
    - LA, RGBA, PA, P or L with a transparent colour: composited onto white (the colour under fully transparent
      pixels is arbitrary, often black, and a cut-out on white is what a person sees), not the alpha dropped;
    - 16-bit (I;16, I;16B, ...) and 32-bit integers (I, which 16-bit files also decode to): 0..65535 to 0..255,
      rounded (Pillow's own conversion clips everything above 255 to white);
    - F (32-bit float): 0..1 to 0..255, as float images are conventionally scaled (ToTensor's range)."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    # A band of rows at a time (every conversion is per pixel): the whole image converted at once would add a
    # full-size copy or two (at 64 megapixels 256 MB each, 32-bit pixels or RGBA) to the decoded one.
    rgb, rows = Image.new("RGB", image.size), max(1, BAND_PIXELS // image.width)
    for top in range(0, image.height, rows):
        rgb.paste(_band_to_rgb(image.crop((0, top, image.width, min(image.height, top + rows)))), (0, top))
    return rgb


def _band_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_gray_to_uint8(image)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))     # rgb x alpha + white x (1 - alpha)
        return white
    return image.convert("RGB")


def _gray_to_uint8(image: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grayscale image's pixels as uint8, rounded to nearest: integers as
    0..65535 (outside: clipped), floats as 0..1 (NaN: black)."""
    values = np.array(image)                            # a writable copy
    if image.mode == "F":
        np.nan_to_num(values, copy=False, nan=0.0)
        np.clip(values, 0, 1, out=values)
        values *= 255
        return np.rint(values, out=values).astype(np.uint8)
    if values.dtype.kind == "i":                        # mode I: int32
        np.clip(values, 0, 65535, out=values)
        wide = values.view(np.uint32)                   # non-negative now: the same bits
    else:                                               # I;16 in either byte order
        wide = values.astype(np.uint32)
    wide *= 255                                         # at most 16.7 million: exact in 32 bits
    wide += 32767
    wide //= 65535
    return wide.astype(np.uint8)


def read_image(path: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """(uint8 (3, 32, 32) as the network sees it, original (width, height)), or a UserError naming the file.
    The size is checked from the header before anything is decoded: at most MAX_PIXELS."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above 89 megapixels and refuses above 179: the cap below both says it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:                # reads the header only
                _check_pixels(path, opened.size)
                size = _upright_size(opened)
                _draft(opened)
                opened.load()                               # decode now: a truncated file fails here
                ImageOps.exif_transpose(opened, in_place=True)   # phone photos: upright as they are shown
                rgb = to_rgb(opened)
                small = TF.center_crop(TF.resize(rgb, SIZE, interpolation=TF.InterpolationMode.BILINEAR,
                                                 antialias=True), SIZE)
    except Image.DecompressionBombError as e:
        raise UserError(f"{path} has more than {MAX_PIXELS // 10**6} megapixels, the most predict.py decodes "
                        f"({str(e).split(',')[0]}); shrink it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} is not an image Pillow can read ({reason}); pass PNG, JPEG or another image "
                        f"file") from None
    return TF.pil_to_tensor(small), size


def _draft(image: Image.Image) -> None:
    """A JPEG larger than DRAFT_SIDE on its shorter side is decoded at 1/2, 1/4 or 1/8 scale (its DCT allows it,
    as Pillow's thumbnail does), still at least DRAFT_SIDE: an eighth of the memory and time for a large photo,
    and the same 32 pixels but for the resampling's last bit. Other formats decode whole."""
    width, height = image.size
    scale = min(width, height) / DRAFT_SIDE
    if image.format == "JPEG" and scale >= 2:
        image.draft(image.mode, (math.ceil(width / scale), math.ceil(height / scale)))


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is shown: its header's, swapped when its EXIF orientation turns it a quarter."""
    width, height = image.size
    return (height, width) if image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8) else (width, height)


def _check_pixels(path: str, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise UserError(f"{path} is {width}x{height} pixels ({width * height / 10**6:.0f} megapixels), more than "
                        f"the {MAX_PIXELS // 10**6} megapixels predict.py decodes; shrink it first (the network "
                        f"sees {SIZE}x{SIZE})")


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
    cfg, model, weights = load_trained(checkpoint, overrides, pick)
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
        print_predictions(rows, top_k)
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


def print_predictions(rows: list[dict], top_k: int) -> None:
    console = RichConsole()
    if not console.is_terminal:          # a pipe or a log: wide enough that paths are not folded
        console = RichConsole(width=200)
    table = Table("image", *(f"top-{i + 1}" for i in range(top_k)))
    for row in rows:
        table.add_row(row["image"], *(f"{t['class']} {100 * t['probability']:.1f}%" for t in row["top"]))
    console.print(table)
    console.print(NOTE, soft_wrap=True, highlight=False)


USAGE = """Predict the classes of your own images with a trained run: the top-k classes and their probabilities per
image.

    python predict.py --checkpoint runs/<run> cat.jpg photos/ [--top-k 3] [--json] [--grid grid.png]
    python predict.py --checkpoint cifar_net.pth cat.jpg      # the tutorial's state_dict
    python predict.py --checkpoint cifar_net.pth cat.jpg data.normalize=cifar   # overrides: section.key=value

Any image file Pillow reads (PNG, JPEG, ...; grayscale, palette and transparent images made RGB), any size: each is
resized to 32 pixels on its shorter side and center-cropped to 32x32, as CIFAR-10 networks see them. Runs on the GPU
when there is one. Exit status: 0; 1 when some inputs were not images (each named on an `error:` line, the others
predicted); 2 for a bad checkpoint or option.
"""


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help="image files, or folders whose files are all read")
    parser.add_argument("--top-k", type=int, default=3, help="classes shown per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    parser.add_argument("--grid", metavar="PNG", help="also draw the images (the first 64) as the network saw "
                                                      "them, with their top class, into this PNG (.png is added to "
                                                      "a name without it; a folder gets predictions.png)")
    args, extra = parser.parse_known_args(argv)
    paths, overrides = split_overrides(args.images)
    return predict_images(args.checkpoint, paths, extra + overrides, args.top_k, args.json, args.grid, args.pick)


def command() -> None:
    """The `cifar-predict` console script: main(), then the process exits with its status (a rank of a multi-process
    run without interpreter finalization: errors.exit_as_command)."""
    exit_as_command(main)


if __name__ == "__main__":
    exit_as_command(main)
