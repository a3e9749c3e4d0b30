"""Nested dicts (a config, a metrics row) to one level of keys: the one flatten of the project, light (no torch) so
that compare imports it as cheaply as config, resume, sweep and tracking do."""


def flatten(tree: dict, sep: str = "/", prefix: str = "", keep_none: bool = False) -> dict:
    """{"test/per_class": {"cat": 50.0}} -> {"test/per_class/cat": 50.0} (W&B's keys) or, with sep=".", a config's
    dotted keys. None values are dropped, unless keep_none: then a None and an empty section are values too (compare:
    a setting left null is a setting, and differs from a key a run's config lacks)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and (value or not keep_none):
            out.update(flatten(value, sep, f"{prefix}{key}{sep}", keep_none))
        elif value is not None or keep_none:
            out[f"{prefix}{key}"] = value
    return out
