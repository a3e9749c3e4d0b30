"""Augmentation beyond crop and flip (cifar/augment.py): the policy registry, erasing, Cutout, MixUp and CutMix on
both loaders, the soft-target loss, and the refusals. All in this process: the batches are built as a training run
builds them (tests/dump_device_batches.py), the runs are train.py's main called here. The 2 x b = 1 x 2b claims are
in test_equivalence.py."""
import math
import os
import re
import sys

import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import ROOT, read_json, read_jsonl
from dump_device_batches import batches_of
from inprocess import entry, refusal, train_here

from cifar.augment import POLICIES, Draws, apply_batch, build_policy, policy_image
from cifar.config import DataConfig, load_config
from cifar.data import POLICY_STREAM, CifarDataset, load_split, mix
from cifar.step import train_loss, train_step

# 64 synthetic images in batches of 16, tutorial normalisation: no pixel of a real image is 0 after it
# ((p / 255 - 0.5) / 0.5 = 0 needs p = 127.5), so the zeros of a batch are exactly what erasing and Cutout set.
SMALL = ["data.limit_train=64", "data.batch_size=16", "data.num_workers=0"]
LOADERS = ["dataloader", "device"]
RUN = ("--config", os.path.join(ROOT, "configs", "debug.yaml"), "train.max_steps=2", "data.batch_size=8",
       "data.limit_train=64", "data.limit_test=40")


@pytest.fixture(autouse=True)
def python_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))     # a user's module puts the working directory on it


def pairs(*overrides) -> list[tuple]:
    """(augmented batch, the same batch without the batched augmentations) for every training batch of epochs 0
    and 3: the same images in the same order, cropped and flipped alike."""
    plain = [k for k in overrides if not re.match(r"data\.(erasing|cutout|mixup_alpha|cutmix_alpha)=", k)]
    got, ref = batches_of([*SMALL, *overrides]), batches_of([*SMALL, *plain])
    return [(a, b) for e in (0, 3) for a, b in zip(got[e], ref[e], strict=True)]


def test_the_policies_are_a_registry_that_help_lists(capsys):
    assert list(POLICIES) == ["none", "autoaugment", "randaugment", "trivialaugment"]
    with pytest.raises(SystemExit):
        entry("train.py")(["--help"])
    out = capsys.readouterr().out
    assert "data.policy (none | autoaugment | randaugment | trivialaugment, default none)" in out
    for key in ("data.erasing (float, default 0.0)", "data.cutout (int, default 0)",
                "data.mixup_alpha (float, default 0.0)", "data.cutmix_alpha (float, default 0.0)"):
        assert key in out


@pytest.mark.parametrize("name", ["autoaugment", "randaugment", "trivialaugment"])
def test_a_policy_is_a_function_of_seed_epoch_and_index_and_leaves_the_global_stream(name):
    """The DataLoader path's dataset: the policy's output for (seed 3, epoch 2, image 5) is torchvision's transform
    under a generator seeded by that triple, whoever asks and whenever; torch's own random stream is as it was."""
    split = load_split(DataConfig(source="synthetic", limit_train=40), train=True)
    transform = build_policy(DataConfig(policy=name))
    plain, augmented = CifarDataset(split, True, seed=3), CifarDataset(split, True, seed=3, policy=transform)
    state = torch.get_rng_state()
    first = augmented[(2, 5)][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, augmented[(2, 5)][0])
    assert torch.equal(first, policy_image(transform, plain[(2, 5)][0], mix(3, 2, 5, POLICY_STREAM) >> 1))
    # the policy does something, and something else in another epoch
    assert sum(not torch.equal(augmented[(2, i)][0], plain[(2, i)][0]) for i in range(40)) > 20
    assert sum(not torch.equal(augmented[(2, i)][0], augmented[(3, i)][0]) for i in range(40)) > 20


def test_a_policy_gives_the_same_batches_in_worker_processes():
    one = batches_of([*SMALL, "data.loader=dataloader", "data.policy=trivialaugment"])
    workers = batches_of([*SMALL, "data.loader=dataloader", "data.policy=trivialaugment", "data.num_workers=2"])
    for e in (0, 3):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one[e], workers[e],
                                                                                        strict=True))


def zero_box(image: torch.Tensor):
    """(y0, y1, x0, x1) of the zeroed pixels of a normalised image, checking they are one rectangle through all
    channels; None when there are none."""
    zero = image == 0
    assert torch.equal(zero, zero[:1].expand_as(zero))
    ys, xs = zero[0].nonzero(as_tuple=True)
    if not len(ys):
        return None
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    assert int(zero[0].sum()) == (y1 - y0) * (x1 - x0)                      # the whole bounding box, nothing else
    return y0, y1, x0, x1


@pytest.mark.parametrize("loader", LOADERS)
def test_erasing_sets_one_rectangle_of_each_image_to_the_mean_on_both_loaders(loader):
    """data.erasing=1: every image has one rectangle of 2-33% of its area set to 0 (the mean after normalisation),
    aspect ratio within torchvision's 0.3-3.3 (give or take the rounding to pixels); the rest is the image as crop
    and flip left it. The rectangles differ from image to image and from epoch to epoch."""
    boxes = []
    for (x, y), (plain, plain_y) in pairs(f"data.loader={loader}", "data.erasing=1.0"):
        assert torch.equal(y, plain_y)
        for image, original in zip(x, plain):
            y0, y1, x0, x1 = zero_box(image)
            h, w = y1 - y0, x1 - x0
            assert 0.02 * 1024 - 2 * 32 <= h * w <= 1024 / 3 + 2 * 32 and 0.2 <= h / w <= 4.5
            outside = torch.ones(32, 32, dtype=torch.bool)
            outside[y0:y1, x0:x1] = False
            assert torch.equal(image[:, outside], original[:, outside])
            boxes.append((y0, y1, x0, x1))
    assert len(boxes) == 2 * 64 and len(set(boxes)) > 64


@pytest.mark.parametrize("loader", LOADERS)
def test_cutout_sets_a_square_to_the_mean_on_both_loaders(loader):
    """data.cutout=8: an 8 x 8 square centred anywhere, cut where it leaves the image."""
    sizes = []
    for (x, _), (plain, _) in pairs(f"data.loader={loader}", "data.cutout=8"):
        for image, original in zip(x, plain):
            y0, y1, x0, x1 = zero_box(image)
            assert y1 - y0 <= 8 and x1 - x0 <= 8 and (y1 - y0 == 8 or y0 == 0 or y1 == 32)
            assert (x1 - x0 == 8 or x0 == 0 or x1 == 32)
            outside = torch.ones(32, 32, dtype=torch.bool)
            outside[y0:y1, x0:x1] = False
            assert torch.equal(image[:, outside], original[:, outside])
            sizes.append((y1 - y0) * (x1 - x0))
    assert 64 in sizes and min(sizes) < 64


def pair_lambda(targets, labels, i) -> float | None:
    """The lambda of the pair (i, i + 1) read off image i's soft target; None when both have the same label."""
    a, b = int(labels[i]), int(labels[i + 1])
    return None if a == b else float(targets[i, a])


@pytest.mark.parametrize("loader", LOADERS)
def test_mixup_blends_each_image_with_its_neighbour_and_the_targets_alike_on_both_loaders(loader):
    """data.mixup_alpha=1: images 2i and 2i+1 of a batch become lam a + (1 - lam) b and lam b + (1 - lam) a, their
    targets lam e_a + (1 - lam) e_b and the mirror; lam ~ Beta(1, 1) differs from pair to pair."""
    lams = []
    for (x, targets), (plain, labels) in pairs(f"data.loader={loader}", "data.mixup_alpha=1.0"):
        assert targets.shape == (16, 10) and torch.allclose(targets.sum(1), torch.ones(16))
        for i in range(0, 16, 2):
            lam = pair_lambda(targets, labels, i)
            if lam is None:
                assert torch.equal(targets[i], torch.nn.functional.one_hot(labels[i], 10).float())
                continue
            a, b = plain[i], plain[i + 1]
            assert float(targets[i + 1, int(labels[i + 1])]) == pytest.approx(lam)
            assert float(targets[i, int(labels[i + 1])]) == pytest.approx(1 - lam)
            assert torch.allclose(x[i], lam * a + (1 - lam) * b, atol=1e-5)
            assert torch.allclose(x[i + 1], lam * b + (1 - lam) * a, atol=1e-5)
            lams.append(lam)
    assert len(lams) > 20 and len({round(v, 6) for v in lams}) == len(lams) and 0 < min(lams) and max(lams) < 1


@pytest.mark.parametrize("loader", LOADERS)
def test_cutmix_pastes_a_box_of_the_neighbour_and_the_targets_follow_its_area_on_both_loaders(loader):
    """data.cutmix_alpha=1: both images of a pair swap the same box; each target gives the neighbour's label the
    box's share of the image. Without crop (data.augment=false: no zero padding that two images share), the box
    is where image 2i holds its neighbour's pixels."""
    shares = []
    for (x, targets), (plain, labels) in pairs(f"data.loader={loader}", "data.augment=false",
                                               "data.cutmix_alpha=1.0"):
        for i in range(0, 16, 2):
            a, b = plain[i], plain[i + 1]
            from_b = (x[i] == b).all(0) & (a != b).any(0)
            if from_b.any():
                ys, xs = from_b.nonzero(as_tuple=True)
                box = torch.zeros(32, 32, dtype=torch.bool)
                box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
            else:
                box = torch.zeros(32, 32, dtype=torch.bool)
            assert torch.equal(x[i], torch.where(box, b, a)) and torch.equal(x[i + 1], torch.where(box, a, b))
            lam = pair_lambda(targets, labels, i)
            if lam is not None:
                assert lam == pytest.approx(1 - float(box.sum()) / 1024)
                shares.append(1 - lam)
    assert len(shares) > 20 and max(shares) > 0.3 and min(shares) < 0.2


def test_mixup_and_cutmix_together_give_each_pair_one_of_the_two():
    cut = blend = 0
    for (x, targets), (plain, labels) in pairs("data.loader=device", "data.mixup_alpha=1.0",
                                               "data.cutmix_alpha=1.0"):
        for i in range(0, 16, 2):
            if pair_lambda(targets, labels, i) is None:
                continue
            a = plain[i]
            # CutMix keeps part of the image exactly; MixUp changes every pixel where the neighbour differs
            if (x[i] == a).all(0).float().mean() > 0.01:
                cut += 1
            else:
                blend += 1
    assert cut >= 5 and blend >= 5


# ----------------------------------------------------------------------------- the loss, by hand

def log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    total = math.log(sum(math.exp(v - top) for v in row)) + top
    return [v - total for v in row]


def test_mixups_loss_equals_a_hand_computation_on_a_fixed_pair():
    """Two images a (label 3) and b (label 7), lam 0.3: the pixels are 0.3 a + 0.7 b and 0.3 b + 0.7 a, and the
    training loss (train_loss, the engine's) is the sum over both of -(0.3 log p(own) + 0.7 log p(other)); with
    label smoothing s every target is first (1 - s) target + s / 10, as with class indices."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 32, 32, generator=g)
    labels = torch.tensor([3, 7])
    draws = Draws(erase=None, cutout=None, lam=torch.tensor([0.3, 0.9]), cut=torch.tensor([False, False]),
                  centre=torch.zeros(2, 2, dtype=torch.long))     # the pair's draws are its first sample's
    mixed, targets = apply_batch(torch.stack([a, b]), labels, torch.tensor([0, 1]), draws, 10)
    assert torch.allclose(mixed[0], 0.3 * a + 0.7 * b) and torch.allclose(mixed[1], 0.3 * b + 0.7 * a)
    logits = torch.randn(2, 10, generator=g)
    lp = [log_softmax(row) for row in logits.tolist()]
    hand = -(0.3 * lp[0][3] + 0.7 * lp[0][7]) - (0.3 * lp[1][7] + 0.7 * lp[1][3])
    assert float(train_loss(0.0)(logits, targets)) == pytest.approx(hand, rel=1e-6)
    s = 0.1
    smoothed = [[(1 - s) * float(targets[i, c]) + s / 10 for c in range(10)] for i in range(2)]
    hand = -sum(smoothed[i][c] * lp[i][c] for i in range(2) for c in range(10))
    assert float(train_loss(s)(logits, targets)) == pytest.approx(hand, rel=1e-6)
    # a one-hot target is its class index: smoothing means the same with and without mixing
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    assert float(train_loss(s)(logits, onehot)) == pytest.approx(float(train_loss(s)(logits, labels)), rel=1e-6)


def test_a_soft_target_counts_as_right_when_the_prediction_is_its_largest_class():
    """train_step under MixUp/CutMix: the loss is the soft targets' cross-entropy summed, and train/acc counts an
    image whose prediction is its target's largest class (lam >= 0.5: its own label)."""
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(4, 3), torch.optim.SGD([torch.nn.Parameter(
        torch.zeros(1))], lr=0.0))
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    predicted = model(x).argmax(1)
    largest = torch.stack([predicted[0], predicted[1], (predicted[2] + 1) % 3, (predicted[3] + 2) % 3])
    targets = 0.7 * torch.nn.functional.one_hot(largest, 3).float() + 0.1
    loss, correct, n, _, _ = train_step(accelerator, model, optimizer, train_loss(0.0), [(x, targets)], None)
    assert (int(correct), n) == (2, 4)
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(-(targets * model(x).log_softmax(1)).sum()), rel=1e-6)


def test_cutmix_box_and_lambda_on_a_fixed_pair():
    """lam 0.75 and centre (16, 16): a 16 x 16 box (side 32 x sqrt(1 - lam)) at rows and columns 8..23, and the
    targets 0.75 / 0.25; a box cut by the border gives its label only the part inside."""
    a, b = torch.ones(3, 32, 32), -torch.ones(3, 32, 32)
    labels = torch.tensor([1, 2])
    for centre, area in (((16, 16), 256), ((0, 31), 8 * 9)):
        draws = Draws(None, None, torch.tensor([0.75, 0.1]), torch.tensor([True, False]),
                      torch.tensor([centre, (5, 5)]))
        mixed, targets = apply_batch(torch.stack([a, b]), labels, torch.tensor([0, 1]), draws, 10)
        assert int((mixed[0, 0] == -1).sum()) == area and int((mixed[1, 0] == 1).sum()) == area
        assert float(targets[0, 2]) == pytest.approx(area / 1024) and float(targets[0, 1]) == pytest.approx(
            1 - area / 1024)
    assert torch.equal(mixed[0, 0, 0, 23:], -torch.ones(9)) and torch.equal(mixed[0, 0, 8, 23:], torch.ones(9))


# ----------------------------------------------------------------------------- training runs and refusals

@pytest.mark.parametrize("loader, extra", [("dataloader", ["data.policy=autoaugment"]), ("device", [])])
def test_every_augmentation_at_once_trains_on_both_loaders_and_the_record_says_so(tmp_path, loader, extra):
    keys = ["data.erasing=0.25", "data.cutout=8", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
            "train.label_smoothing=0.1"]
    out = tmp_path / "run"
    train_here(*RUN, f"data.loader={loader}", *keys, *extra, "train.log_every_steps=1", f"output_dir={out}")
    data = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert (data["loader"], data["erasing"], data["cutout"], data["mixup_alpha"], data["cutmix_alpha"]) == \
        (loader, 0.25, 8, 0.2, 1.0)
    assert data["policy"] == ("autoaugment" if extra else "none")
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["train/loss"]) and 0 <= r["train/acc"] <= 100 for r in rows)
    assert math.isfinite(read_json(out / "summary.json")["final_test_loss"])


@pytest.mark.parametrize("overrides, line", [
    (["data.loader=device", "data.policy=randaugment"],
     "error: config key 'data.policy' must be none with data.loader=device (a policy runs per image in the "
     "DataLoader's workers; the device path batches crop, flip, erasing, cutout, MixUp and CutMix only): set "
     "data.loader=dataloader, or data.policy=none; got 'randaugment'"),
    (["data.policy=autoaugmnt"], "error: config key 'data.policy' must be one of none, autoaugment, randaugment, "
                                 "trivialaugment, <module>:<callable>; got 'autoaugmnt'"),
    (["data.erasing=1.5"], "error: config key 'data.erasing' must be a probability in [0, 1] (0: off); got 1.5"),
    (["data.cutout=33"], "error: config key 'data.cutout' must be in 0..32 pixels"),
    (["data.mixup_alpha=-0.2"], "error: config key 'data.mixup_alpha' must be >= 0 (0: off); got -0.2"),
    (["data.cutmix_alpha=1", "data.batch_size=7"], "error: config key 'data.batch_size' must be even with "
                                                   "data.mixup_alpha or data.cutmix_alpha"),
    (["data.policy=tiny_policy:gray"], "error: data.policy=tiny_policy:gray: its transform turned a uint8 image "
                                       "(3, 32, 32) into a torch.uint8 tensor of shape [1, 32, 32]; it must return "
                                       "a uint8 image of the same shape"),
    (["data.policy=tiny_policy:SIZE"], "error: data.policy=tiny_policy:SIZE: tiny_policy.SIZE is not callable"),
])
def test_an_augmentation_it_cannot_do_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, overrides, line):
    (tmp_path / "tiny_policy.py").write_text("from torchvision.transforms import v2\n\nSIZE = 3\n\n\n"
                                             "def gray(cfg):\n    return v2.Grayscale()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "tiny_policy", raising=False)
    assert refusal(capsys, "train.py", *RUN, *overrides, f"output_dir={tmp_path / 'run'}").startswith(line)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- docs/extending.md

def test_the_docs_augmentation_example_trains_and_changes_the_images(tmp_path, monkeypatch):
    """extending.md's command with examples/my_parts.py's jitter (the page shows the file whole: test_registry):
    it trains (cut to 2 steps), the record names it, and the training images are not what they are without it."""
    with open(os.path.join(ROOT, "docs", "extending.md")) as f:
        page = f.read()
    (command,) = [line for block in re.findall(r"```bash\n(.*?)```", page, re.S) for line in block.splitlines()
                  if "data.policy=" in line]
    args = command.split()[2:]
    assert args == ["--config", "configs/debug.yaml", "data.policy=examples.my_parts:jitter"]
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    train_here(*args, *RUN[2:], f"output_dir={out}")
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["policy"] == "examples.my_parts:jitter"
    cfg = load_config("configs/debug.yaml", args[2:])
    jittered = batches_of([*SMALL, "data.loader=dataloader", f"data.policy={cfg.data.policy}"])[0]
    plain = batches_of([*SMALL, "data.loader=dataloader"])[0]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(jittered, plain, strict=True))
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(jittered, plain))


def test_the_strong_recipe_is_resnet18_with_a_policy_erasing_smoothing_and_ema_and_trains(tmp_path):
    """configs/resnet18-strong.yaml: resnet18.yaml (its model, optimizer and schedule) plus crop and flip, an
    auto-augment policy, random erasing, label smoothing and a moving average; 2 steps of it on synthetic data."""
    strong, base = (load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
                    for name in ("resnet18-strong", "resnet18"))
    assert (strong.model, strong.optim, strong.schedule) == (base.model, base.optim, base.schedule)
    d, t = strong.data, strong.train
    assert d.augment and d.policy == "autoaugment" and d.loader == "dataloader" and d.erasing > 0
    assert t.label_smoothing > 0 and t.ema.decay is not None and t.epochs > base.train.epochs
    out = tmp_path / "run"
    # train.mixed_precision=no: this process's Accelerator state is fp32 already (Accelerate's is process-wide)
    train_here("--config", os.path.join(ROOT, "configs", "resnet18-strong.yaml"), "data.source=synthetic",
               "data.num_workers=0", *RUN[2:], "data.erasing=1.0", "train.mixed_precision=no", f"output_dir={out}")
    summary = read_json(out / "summary.json")
    assert summary["steps"] == 2 and summary["final_ema_test_acc"] is not None


def test_a_resume_refuses_a_changed_augmentation(tmp_path, capsys):
    """The augmentation is part of what was trained: a resume with other augmentation keys is one line naming
    them (as for every data key but the free ones), and the folder keeps training with its own."""
    out = tmp_path / "run"
    train_here(*RUN, "data.mixup_alpha=0.2", f"output_dir={out}")
    line = refusal(capsys, "train.py", *RUN, "data.mixup_alpha=0.4", "data.policy=randaugment",
                   "train.max_steps=3", f"output_dir={out}")
    assert "data.mixup_alpha: 0.2 -> 0.4" in line and "data.policy: none -> randaugment" in line
    train_here(*RUN, "data.mixup_alpha=0.2", "train.max_steps=3", f"output_dir={out}")
    assert read_json(out / "summary.json")["steps"] == 3
