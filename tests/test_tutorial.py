"""From the tutorial and back: its cifar_net.pth into evaluate.py and predict.py, a run out again as a cifar_net.pth
its own code loads and as a torch.export program that runs without this package, and predictions on a person's own
image files. The tutorial's side is written here as its notebook writes it: its Net, its transforms, its
torchvision CIFAR10 dataset, its test loop, its torch.save / torch.load."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import ROOT, env, logged_warnings, read_json, run, write_cifar
from inprocess import call, one_thread, refusal
from PIL import Image
from safetensors.torch import save_file
from test_evaluate import run_together
from torchvision import transforms

from cifar.config import load_config
from cifar.data import CLASSES, DATASETS, synthetic_split
from cifar.errors import UserError
from cifar.export import export
from cifar.files import read_state_dict
from cifar.models import build_model
from cifar.predict_cli import read_image, split_overrides


class Net(nn.Module):
    """The tutorial's network, as its notebook defines it (not imported from cifar: the keys must match by name)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


class CIFAR10(torchvision.datasets.CIFAR10):
    """The tutorial's dataset class on this test's files: their MD5s are not the real files' (md5 None: exists)."""
    train_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}


TRANSFORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
N_TRAIN, N_TEST = 500, 100


def write_learnable_cifar(root: str) -> str:
    """write_cifar's layout holding synthetic_split's images (a coarse pattern per class under noise): a network
    trained on them scores far above chance, so its predictions really depend on how its inputs are scaled."""
    write_cifar(root, N_TRAIN, N_TEST)
    folder = os.path.join(root, "cifar-10-batches-py")
    info = DATASETS["cifar10"]
    for train, names, n in ((True, info.train_files, N_TRAIN), (False, info.test_files, N_TEST)):
        split, start = synthetic_split(n, train), 0
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                batch = pickle.load(f)
            k = len(batch["labels"])
            batch["data"] = split.images[start:start + k].reshape(k, -1)
            batch["labels"] = split.labels[start:start + k].tolist()
            start += k
            with open(os.path.join(folder, name), "wb") as f:
                pickle.dump(batch, f)
    return root


def tutorial_test_loop(net: nn.Module, root: str, transform=TRANSFORM) -> tuple[list[list[int]], list[int]]:
    """The tutorial's evaluation (batch 4, no shuffle, argmax of the outputs): (confusion [true][predicted], the
    prediction of every test image in order)."""
    loader = torch.utils.data.DataLoader(CIFAR10(root=root, train=False, download=False, transform=transform),
                                         batch_size=4, shuffle=False, num_workers=0)
    confusion, predictions = np.zeros((10, 10), dtype=np.int64), []
    net.eval()
    with torch.no_grad():
        for images, labels in loader:
            _, predicted = torch.max(net(images), 1)
            for t, p in zip(labels.tolist(), predicted.tolist()):
                confusion[t, p] += 1
            predictions += predicted.tolist()
    return confusion.tolist(), predictions


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """What a tutorial reader holds: ./data, and the cifar_net.pth its notebook trained (2 epochs of batch 4, SGD
    with momentum; lr 0.01, as these 500 images give fewer steps than the tutorial's 50,000) and saved."""
    base = tmp_path_factory.mktemp("tutorial")
    root = write_learnable_cifar(str(base / "data"))
    loader = torch.utils.data.DataLoader(CIFAR10(root=root, train=True, download=False, transform=TRANSFORM),
                                         batch_size=4, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    net = Net()
    criterion, optimizer = nn.CrossEntropyLoss(), torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    with one_thread():
        for _ in range(2):
            for inputs, labels in loader:
                optimizer.zero_grad()
                criterion(net(inputs), labels).backward()
                optimizer.step()
    path = base / "cifar_net.pth"
    torch.save(net.state_dict(), path)
    return {"root": root, "pth": path, "net": net, "base": base}


@pytest.fixture(scope="module")
def evaluated(tutorial):
    """evaluate.py on the cifar_net.pth as it is, with data.normalize=cifar, and on a run folder from before
    data.normalize existed (its config.yaml without the key) holding the same weights; at once."""
    base, data = tutorial["base"], [f"data.root={tutorial['root']}", "data.download=false", "data.num_workers=0"]
    old_run = base / "old-run"
    old_run.mkdir()
    saved = load_config(os.path.join(ROOT, "configs", "tutorial.yaml")).to_dict()
    del saved["data"]["normalize"]
    (old_run / "config.yaml").write_text(json.dumps(saved))            # JSON is YAML
    save_file({k: v.contiguous() for k, v in tutorial["net"].state_dict().items()}, str(old_run / "model.safetensors"))
    procs = run_together(["--checkpoint", str(tutorial["pth"]), "--output", str(base / "eval-tutorial"), *data],
                         ["--checkpoint", str(tutorial["pth"]), "--output", str(base / "eval-cifar"), *data,
                          "data.normalize=cifar"],
                         ["--checkpoint", str(old_run), *data])
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tutorial": read_json(base / "eval-tutorial" / "eval.json"), "stdout": procs[0].stdout,
            "cifar": read_json(base / "eval-cifar" / "eval.json"), "old-run": read_json(old_run / "eval.json")}


@pytest.mark.slow
def test_evaluate_scores_the_tutorials_cifar_net_pth_as_the_tutorial_does(tutorial, evaluated):
    """evaluate.py --checkpoint cifar_net.pth takes it as the tutorial's Net and preprocessing and counts exactly
    what the tutorial's own test loop counts: the same confusion matrix (so the same overall and per-class counts),
    the same prediction for each previewed image, the tutorial's report lines. With data.normalize=cifar the counts
    change (the test sees the preprocessing), and a run saved before data.normalize existed is read as cifar."""
    confusion, predictions = tutorial_test_loop(tutorial["net"], tutorial["root"])
    correct = sum(confusion[i][i] for i in range(10))
    assert correct >= 50, correct                      # learnt: the comparison is not one of constant outputs
    report = evaluated["tutorial"]
    assert report["confusion"] == confusion and report["count"] == N_TEST
    assert report["model"] == "tutorial_net" and report["normalize"] == "tutorial"
    assert [s["predicted"] for s in report["samples"]] == predictions[:len(report["samples"])] and report["samples"]
    out = evaluated["stdout"]
    assert f"Accuracy of the network on the {N_TEST} test images: {100 * correct / N_TEST:.2f} %" in out
    for i, name in enumerate(CLASSES):
        assert f"Accuracy of {name:>5s} : {100 * confusion[i][i] / max(sum(confusion[i]), 1):5.1f} %" in out
    assert "cifar_net.pth: a bare PyTorch state_dict, taken as model.name=tutorial_net with " \
        "data.normalize=tutorial" in out

    assert evaluated["cifar"]["confusion"] != confusion and evaluated["cifar"]["normalize"] == "cifar"
    assert evaluated["old-run"]["normalize"] == "cifar"
    assert evaluated["old-run"]["confusion"] == evaluated["cifar"]["confusion"]


def test_a_pth_that_needs_unpickling_or_is_not_a_state_dict_is_refused_by_name(tmp_path):
    """The reader (weights_only=True only) says which: a whole pickled network needs arbitrary unpickling (and
    names the class it would import), a checkpoint dict is not a state_dict, text is not a PyTorch file."""
    torch.save(Net(), tmp_path / "whole.pth")
    torch.save({"epoch": 2, "model_state_dict": Net().state_dict()}, tmp_path / "dict.pth")
    (tmp_path / "text.pth").write_text("not a network\n")
    torch.save(Net().state_dict(), tmp_path / "ok.pt")
    cases = {"whole.pth": f"needs arbitrary unpickling to load (it holds a {__name__}.Net",
             "dict.pth": "is not a state_dict (it holds a mapping with keys epoch, model_state_dict",
             "text.pth": "is not a PyTorch file, or is truncated or corrupt"}
    for name, expected in cases.items():
        with pytest.raises(UserError) as e:
            read_state_dict(str(tmp_path / name))
        assert expected in str(e.value) and str(tmp_path / name) in str(e.value)
    assert read_state_dict(str(tmp_path / "ok.pt")).keys() == Net().state_dict().keys()


def test_evaluate_refuses_a_pth_that_needs_unpickling_or_holds_another_network(tmp_path, capsys):
    """One line, exit 2, saying which: arbitrary unpickling (a whole network saved with torch.save(net)), or a
    network of another shape (the tutorial's Net with 64 units in fc1) with the first mismatching layer."""
    torch.save(Net(), tmp_path / "whole.pth")
    other = Net()
    other.fc1, other.fc2 = nn.Linear(400, 64), nn.Linear(64, 84)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    line = refusal(capsys, "evaluate.py", "--checkpoint", tmp_path / "whole.pth")
    assert "whole.pth needs arbitrary unpickling" in line and "weights_only=True" in line
    line = refusal(capsys, "evaluate.py", "--checkpoint", tmp_path / "other.pth")
    assert "other.pth do not fit model TutorialNet (first mismatch: fc1.bias: [64] in the file, [120] here)" in line
    assert "holds a network of another shape" in line and "model.name=" in line
    assert sorted(os.listdir(tmp_path)) == ["other.pth", "whole.pth"]          # no eval.json beside them


# ----------------------------------------------------------------------------- and back

def python_together(*arg_lists) -> list[subprocess.CompletedProcess]:
    """Several `python ARGS` at once, as a user runs them from the repository (2 cores: each mostly imports)."""
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for args in arg_lists]
    outputs = [p.communicate(timeout=300) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs)]


PROGRAM = """
import json, sys
sys.modules["cifar"] = None                   # this project's package is not there: `import cifar` fails
try:
    import cifar
    sys.exit("cifar is importable")
except ImportError:
    pass
import numpy as np, torch
extra = {"cifar.json": ""}
net = torch.export.load(sys.argv[1], extra_files=extra).module()
images = torch.from_numpy(np.load(sys.argv[2])).float() / 255          # what ToTensor makes of uint8 pixels
logits = net(images)
assert not [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] == "cifar"]
print(json.dumps({"predicted": logits.argmax(1).tolist(), "logits": logits.tolist(),
                  "metadata": json.loads(extra["cifar.json"])}))
"""


@pytest.mark.slow
def test_a_run_exported_for_the_tutorial_and_for_deployment_predicts_as_evaluate_does(tutorial, tmp_path):
    """A run trained here (configs/tutorial.yaml) exported --format tutorial loads into the tutorial's Net with
    torch.load(PATH, weights_only=True) and, through the tutorial's own test loop, gives evaluate.py's confusion
    matrix and previewed predictions; --format pt2 runs in a Python that cannot import cifar and predicts every test
    image as that Net does."""
    data = [f"data.root={tutorial['root']}", "data.download=false", "data.num_workers=0"]
    out = tmp_path / "run"
    run("train.py", "--config", "configs/tutorial.yaml", *data, "optim.lr=0.01", f"output_dir={out}")
    evaluation, to_tutorial, to_pt2 = python_together(
        [os.path.join(ROOT, "evaluate.py"), "--checkpoint", str(out), *data],
        ["-m", "cifar.export", "--checkpoint", str(out), "--format", "tutorial"],
        ["-m", "cifar.export", "--checkpoint", str(out), "--format", "pt2", "--output", str(tmp_path / "net.pt2")])
    for proc in (evaluation, to_tutorial, to_pt2):
        assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr[-3000:]
    report = read_json(out / "eval.json")
    assert "load it with: net = Net(); net.load_state_dict(torch.load(" in to_tutorial.stdout

    net = Net()
    net.load_state_dict(torch.load(out / "cifar_net.pth", weights_only=True))
    confusion, predictions = tutorial_test_loop(net, tutorial["root"])
    assert confusion == report["confusion"]
    assert [s["predicted"] for s in report["samples"]] == predictions[:len(report["samples"])]

    images = CIFAR10(root=tutorial["root"], train=False, download=False).data.transpose(0, 3, 1, 2)
    np.save(tmp_path / "images.npy", np.ascontiguousarray(images))
    proc = subprocess.run([sys.executable, "-I", "-c", PROGRAM, str(tmp_path / "net.pt2"),
                           str(tmp_path / "images.npy")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["predicted"] == predictions
    with torch.no_grad():
        ours = net(TRANSFORM.transforms[1](torch.from_numpy(images).float() / 255))
    assert torch.allclose(torch.tensor(result["logits"]), ours, atol=1e-5)
    assert result["metadata"]["classes"] == list(CLASSES) and result["metadata"]["normalize"] == "tutorial"


# ----------------------------------------------------------------------------- a person's own images

def save_images(folder) -> None:
    """A PNG, a JPEG, a grayscale, an RGBA and a 500x300 image, and a text file."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "photo.png")
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / "photo.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA").save(folder / "clear.png")
    Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)).save(folder / "wide.png")
    (folder / "notes.txt").write_text("my cat is called Tom\n")


@pytest.fixture
def untrained_pth(tmp_path) -> str:
    """A cifar_net.pth as the tutorial's torch.save writes it, of a Net not trained at all: enough where the claim is
    about the files read and the lines printed, not about what the network predicts."""
    torch.manual_seed(0)
    torch.save(Net().state_dict(), tmp_path / "cifar_net.pth")
    return str(tmp_path / "cifar_net.pth")


def notes_line(folder) -> str:
    return (f"error: {folder / 'notes.txt'} is not an image Pillow can read (cannot identify image file "
            f"'{folder / 'notes.txt'}'); pass PNG, JPEG or another image file")


def test_predict_on_a_folder_of_assorted_files(untrained_pth, tmp_path, capsys):
    """Five predictions (PNG, JPEG, grayscale, RGBA, 500x300), the text file one `error:` line of its own, exit
    status 1 (some inputs failed), a table with top-3 per image and the 32-pixel note, a grid PNG."""
    save_images(tmp_path / "mine")
    capsys.readouterr()
    assert call("predict.py", "--checkpoint", untrained_pth, tmp_path / "mine", "--grid", tmp_path / "grid.png") == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [notes_line(tmp_path / "mine")]
    rows = [line for line in out.splitlines() if str(tmp_path / "mine") in line]
    assert len(rows) == 5 and all(line.count("%") == 3 for line in rows)
    for name in ("photo.png", "photo.jpg", "gray.png", "clear.png", "wide.png"):
        assert sum(name in line for line in rows) == 1, name
    assert "note: CIFAR-10 networks see 32x32 images" in out
    grid = Image.open(tmp_path / "grid.png")
    assert grid.format == "PNG" and grid.width >= 500


@pytest.mark.slow
def test_predict_py_exits_1_when_some_inputs_are_not_images(untrained_pth, tmp_path):
    """The real process: `python predict.py` on the folder exits with status 1 (sys.exit of what main returns), its
    stderr the one line about the text file, the five images predicted."""
    save_images(tmp_path / "mine")
    proc = run("predict.py", "--checkpoint", untrained_pth, str(tmp_path / "mine"), check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [notes_line(tmp_path / "mine")]
    assert len([line for line in proc.stdout.splitlines() if str(tmp_path / "mine") in line]) == 5


@pytest.mark.slow
def test_predicts_top1_as_evaluate_does_on_images_cut_out_of_the_test_set(tutorial, evaluated, tmp_path):
    """The previewed test images, each saved as its own PNG: predict.py --json's top-1 is evaluate.py's prediction
    for each, with the tutorial's normalisation and with data.normalize=cifar (predict applies the one it is given),
    and the probabilities are a distribution, highest first."""
    images = CIFAR10(root=tutorial["root"], train=False, download=False).data
    folder = tmp_path / "cut"
    folder.mkdir()
    indices = [s["index"] for s in evaluated["tutorial"]["samples"]]
    for i in indices:
        Image.fromarray(images[i]).save(folder / f"test-{i:04d}.png")
    args = ["--checkpoint", str(tutorial["pth"]), str(folder), "--json", "--top-k", "10"]
    procs = run_together(args, [*args, "data.normalize=cifar"], script="predict.py")
    for proc, key in zip(procs, ("tutorial", "cifar")):
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
        result = json.loads(proc.stdout)
        assert result["normalize"] == key and result["errors"] == []
        top1 = [CLASSES.index(p["top"][0]["class"]) for p in result["predictions"]]
        assert top1 == [s["predicted"] for s in evaluated[key]["samples"]]
        for p in result["predictions"]:
            probabilities = [t["probability"] for t in p["top"]]
            assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 1) < 1e-5
    assert [p["top"][0]["class"] for p in json.loads(procs[0].stdout)["predictions"]] != \
        [p["top"][0]["class"] for p in json.loads(procs[1].stdout)["predictions"]]


def test_images_are_made_rgb_and_32_pixels_as_torchvision_does(tmp_path):
    """Grayscale is expanded to 3 equal channels, transparency is flattened onto white, a palette image is its
    colours, a 500x300 image is torchvision's Resize(32) + CenterCrop(32) of it, a 32x32 PNG is its exact pixels,
    and the original size is reported."""
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    x, size = read_image(str(tmp_path / "gray.png"))
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and size == (32, 32)
    assert all(torch.equal(x[c], torch.from_numpy(gray)) for c in range(3))

    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[:16, :, 3] = 0                                    # top half fully transparent
    rgba[16:, :, 3] = 255                                  # bottom half opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    x, _ = read_image(str(tmp_path / "clear.png"))
    assert (x[:, :16] == 255).all() and torch.equal(x[:, 16:], torch.from_numpy(rgba[16:, :, :3]).permute(2, 0, 1))

    rgb = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    x, size = read_image(str(tmp_path / "wide.png"))
    expected = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.PILToTensor()])(
        Image.fromarray(rgb))
    assert size == (500, 300) and torch.equal(x, expected)

    palette = Image.fromarray(rgb[:32, :32]).convert("P")
    palette.save(tmp_path / "palette.png")
    x, _ = read_image(str(tmp_path / "palette.png"))
    assert torch.equal(x, torch.from_numpy(np.array(palette.convert("RGB"))).permute(2, 0, 1))

    exact = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(exact).save(tmp_path / "exact.png")
    assert torch.equal(read_image(str(tmp_path / "exact.png"))[0], torch.from_numpy(exact).permute(2, 0, 1))


def test_predict_tells_overrides_from_paths(tmp_path, monkeypatch):
    """`section.key=value` among the image arguments is an override, unless a file of that name exists."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.root=x.png").write_bytes(b"")
    paths, overrides = split_overrides(["cat.jpg", "data.normalize=cifar", "data.root=x.png", "photos/"])
    assert paths == ["cat.jpg", "data.root=x.png", "photos/"] and overrides == ["data.normalize=cifar"]


def test_export_for_the_tutorial_says_what_does_not_fit_it(tmp_path, capsys, caplog):
    """--format tutorial: a run trained with the CIFAR statistics is written with one warning naming the Normalize
    the notebook must use instead (the weights load, the notebook's (0.5, ...) would score lower); a network that
    is not the tutorial's Net is refused, naming --format pt2; an export onto its own input is refused."""
    def fake_run(name: str, overrides: list[str], net: nn.Module):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.yaml").write_text(load_config(os.path.join(ROOT, "configs", "tutorial.yaml"),
                                                        overrides).to_yaml())
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
        return folder

    cifar_run = fake_run("cifar", ["data.normalize=cifar"], Net())
    export(str(cifar_run), "tutorial", None, [])
    err = (capsys.readouterr().err + logged_warnings(caplog)).strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: this run was trained with data.normalize=cifar")
    assert "transforms.Normalize((0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616))" in err[0]
    net = Net()
    net.load_state_dict(torch.load(cifar_run / "cifar_net.pth", weights_only=True))

    resnet_run = fake_run("resnet", ["model.name=resnet18"], build_model("resnet18"))
    with pytest.raises(UserError, match="this run is model resnet18; use --format pt2"):
        export(str(resnet_run), "tutorial", None, [])
    with pytest.raises(UserError, match="would overwrite its input"):
        export(str(cifar_run / "cifar_net.pth"), "tutorial", None, [])
