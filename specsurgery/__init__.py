"""specsurgery: declarative model specs, interaction maps, and provably safe weight surgery.

    import specsurgery as ss
    model = ss.compile("specs/policy.spec")      # an ss.Model, a torch.nn.Module
    heads = model(model.featurise(records))
    model.save("models/policy.safetensors", metadata={"step": "1000"})

Names are loaded on first use, so `import specsurgery` stays cheap (the
pre-commit hook never pays for torch).
"""

__version__ = "0.1.0"

from .errors import SpecError, UserError  # noqa: E402  (no torch)

# `ss.surgery` is the function, and `specsurgery.surgery` is also the subpackage
# (diff, plan, apply, verify): the name holds the function, which hands the
# subpackage's modules to `import specsurgery.surgery.diff as diff`.
from . import surgery as _surgery_package  # noqa: E402
from .api import surgery as _surgery_function  # noqa: E402


class _Surgery:
    __slots__ = ("__wrapped__", "__doc__")

    def __init__(self):
        self.__wrapped__, self.__doc__ = _surgery_function, _surgery_function.__doc__

    def __call__(self, *args, **kwargs):
        return _surgery_function(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(_surgery_package, name)

    def __repr__(self) -> str:
        return "<function specsurgery.surgery>"


surgery = _Surgery()

_LAZY = {
    "compile": "api", "load": "api", "plan": "api", "apply": "api", "verify": "api",
    "Plan": "api", "Surgery": "api",
    "load_optimizer": "optimizer_state",
    "Model": "model",
    "save_dcp": "dcp", "load_dcp": "dcp",
    "Verification": "surgery.verify",
}

__all__ = ["SpecError", "UserError", "surgery", *_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'specsurgery' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
