"""Predict the classes of your own images with a trained run: the top-k classes and their probabilities per image.

    python predict.py --checkpoint runs/<run> cat.jpg photos/ [--top-k 3] [--json] [--grid grid.png]
    python predict.py --checkpoint cifar_net.pth cat.jpg      # the tutorial's state_dict
    python predict.py --checkpoint cifar_net.pth cat.jpg data.normalize=cifar   # overrides: section.key=value

Any image file Pillow reads (PNG, JPEG, ...; grayscale, palette and transparent images made RGB), any size: each is
resized to 32 pixels on its shorter side and center-cropped to 32x32, as CIFAR-10 networks see them. Runs on the GPU
when there is one. Exit status: 0; 1 when some inputs were not images (each named on an `error:` line, the others
predicted); 2 for a bad checkpoint or option.
"""
import argparse

from cifar.errors import cli, exit_as_command
from cifar.evaluate_run import add_run_arguments
from cifar.predict import predict_images, split_overrides


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


if __name__ == "__main__":
    exit_as_command(main)
