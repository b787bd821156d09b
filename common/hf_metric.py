"""Loads metrics/harness_retrieval with the installed `evaluate` package, which this repository's
evaluate.py shadows: from the repository root (or with it on sys.path) `import evaluate` finds the script."""

import importlib.machinery
import importlib.util
import os
import sys

from common.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_PATH = os.path.join(ROOT, "metrics", "harness_retrieval")


def hf_evaluate():
    """The installed `evaluate` package, imported past the repository's evaluate.py.

    While the package is imported and a metric loaded, sys.modules["evaluate"] is the package; a script
    module that held the name before gets it back in load_retrieval_metric.
    """
    module = sys.modules.get("evaluate")
    if module is not None and hasattr(module, "load"):
        return module
    search_path = [path for path in sys.path if os.path.realpath(path or os.getcwd()) != ROOT]
    spec = importlib.machinery.PathFinder.find_spec("evaluate", search_path)
    if spec is None or spec.submodule_search_locations is None:
        raise UserError("The `evaluate` package is not installed; pip install evaluate.")
    package = importlib.util.module_from_spec(spec)
    sys.modules["evaluate"] = package
    spec.loader.exec_module(package)
    return package


def load_retrieval_metric(**kwargs):
    """evaluate.load of the repository's metric module, offline (no Hub lookup)."""
    script = sys.modules.get("evaluate")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # the module imports common.retrieval
    try:
        return hf_evaluate().load(METRIC_PATH, **kwargs)
    finally:
        if script is not None and not hasattr(script, "load"):
            sys.modules["evaluate"] = script  # `import evaluate` keeps meaning what it meant before
