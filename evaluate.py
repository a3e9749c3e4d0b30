"""Evaluate a trained run: overall and per-class accuracy, confusion matrix, a grid of predictions.

    python evaluate.py --checkpoint runs/<run> [--pick best] [--tta] [--output DIR] [data.root=/datasets/cifar ...]
    python evaluate.py --checkpoint cifar_net.pth     # the tutorial's torch.save(net.state_dict(), PATH)
    accelerate launch --multi_gpu --num_processes 2 evaluate.py --checkpoint runs/<run>
"""
import argparse

from cifar import log
from cifar.config_help import help_text
from cifar.errors import cli, exit_as_command
from cifar.evaluate_run import add_run_arguments, evaluate_run


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="The run's saved config applies; section.key=value overrides it (data.root "
                                            "for another copy of the data, data.eval_batch_size...).\n\n" + help_text())
    add_run_arguments(parser)
    parser.add_argument("--tta", nargs="?", const="flip", default="none", choices=["none", "flip", "flip_translate"],
                        help="test-time augmentation: average the image with its mirror (flip, the default when "
                             "given alone), and one-pixel shifts of both (flip_translate)")
    parser.add_argument("--output", help="where eval.json and the PNGs go (default: beside the weights)")
    parser.add_argument("--wandb-into-train-run", action="store_true",
                        help="with W&B on (wandb.mode=online|offline), log into the training run instead of a new "
                             "eval run")
    parser.add_argument("--log-level", choices=log.LEVELS,
                        help="debug | info (default) | warning | error; or $CIFAR_LOG_LEVEL")
    args, overrides = parser.parse_known_args(argv)
    log.setup(args.log_level)
    evaluate_run(args.checkpoint, overrides, args.tta, args.output, pick=args.pick,
                 into_train_run=args.wandb_into_train_run)


if __name__ == "__main__":
    exit_as_command(main)
