"""dinoscale: distributed self-supervised pretraining of Vision Transformers.

``dinoscale.pretrain(config, overrides={...})`` trains in the calling process and ``dinoscale.embed(model, images)``
returns CLS features (both in :mod:`dinoscale.api`). They are imported on first use, so that ``import dinoscale.X``
stays light (``tools/submit.py`` imports ``dinoscale.launch`` without torch).
"""

__version__ = "0.1.0"

__all__ = ["PretrainResult", "embed", "pretrain"]


def __getattr__(name: str):
    if name in __all__:
        from dinoscale import api  # on first use only: it imports torch and the whole training stack

        return getattr(api, name)
    raise AttributeError(f"module 'dinoscale' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
