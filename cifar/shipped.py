"""The recipes and sweep files shipped inside the package (cifar/recipes/, cifar/recipes/sweeps/), found by name:
`--config tutorial` or `--config tutorial.yaml` from any folder, an installed wheel too. A path that names a file
is that file; a bare name with nothing of that name here is a shipped one, and an unknown name is one line listing
them."""
import os

from .errors import UserError, shorten

RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
SWEEPS = os.path.join(RECIPES, "sweeps")


def names(folder: str = RECIPES) -> list[str]:
    """The shipped files' names (without .yaml) in a folder, sorted."""
    return sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".yaml"))


def recipe_path(name: str) -> str:
    """`--config NAME`: NAME itself when something is there or it names a folder (configs/debug.yaml), else the
    shipped recipe NAME (a bare name, .yaml or not)."""
    return _find(name, RECIPES, "recipe", "--config")


def sweep_path(name: str) -> str:
    """cifar-sweep's file argument: a sweep file, or a shipped sweep's name (debug-lr-seed)."""
    return _find(name, SWEEPS, "sweep", "cifar-sweep")


def _find(name: str, folder: str, kind: str, how: str) -> str:
    if os.path.lexists(name) or os.sep in name or (os.altsep and os.altsep in name):
        return name     # a path: the reader opens it, or names what is wrong with it (a folder, missing...)
    stem = name.removesuffix(".yaml")
    shipped = os.path.join(folder, f"{stem}.yaml")
    if stem and not stem.startswith(".") and os.path.isfile(shipped):
        return shipped
    raise UserError(f"{kind} {shorten(name)} is neither a file nor a shipped {kind}; pass a path, or {how} one of: "
                    f"{', '.join(names(folder))}")
