"""The image options of every dataset read from files, declared once.

They stay flat init arguments of each dataset (``data.dataset.init_args.image_size``), because configs
and checkpoint fingerprints name them so: ``image_options`` appends them, with their help and the
dataset's defaults, to a dataset's ``__init__`` signature and docstring (what ``inspect``,
jsonargparse's ``--help`` and the fingerprint read), and ``ImageOptions`` checks them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar, get_type_hints

from fedilora.errors import ConfigError

OnBadSample = Literal["error", "skip"]
CheckImages = Literal["auto", "exists", "header", "decode"]

# The help of each option; ``{default}`` is the default of the dataset it documents.
HELP = {
    "image_size": "Side of the square images handed to the model (decoded, resized and centre-cropped on "
    "access). The model resizes again if its own input size differs.",
    "on_bad_sample": "What a malformed sample does (default: ``{default}``). ``error``: the first one ends the "
    "run with a message naming where it is (file and line, or split and row) and the problem. ``skip``: such "
    "samples are left out and the number skipped per split is logged (and kept in ``skipped``).",
    "check_images": "How images are checked when the dataset is loaded (default: ``{default}``): "
    "``exists`` (the file is there), ``header`` (PIL recognises the image; a truncated file passes), "
    "``decode`` (every image decodes as training decodes it; 1.2 ms of CPU per JPEG, 6 ms per PNG here) or "
    "``auto``: ``decode`` under ``on_bad_sample: skip`` (a sample can only be skipped at load time), "
    "``header`` under ``error``. An image that fails later, while training, stops the run with a "
    "``DataError`` naming its file, line and client split.",
    "cache_size": "Decoded images kept in memory per pool (LRU); 0 disables the cache.",
    "max_samples": "If set, keep a seeded random subset of at most this many samples per split, for quick "
    "runs on a large dataset.",
    "seed": "Seed of the ``max_samples`` subsets (and of held-out splits where a dataset makes them).",
}


@dataclass(frozen=True)
class ImageOptions:
    """How a dataset reads its images and treats bad samples (the options are documented in ``HELP``).

    ``check_images`` is the level asked for; ``check`` the one applied (``auto`` resolved).
    """

    image_size: int = 224
    on_bad_sample: OnBadSample = "error"
    check_images: CheckImages = "auto"
    cache_size: int = 1024
    max_samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"data.dataset.image_size: must be >= 8, got {self.image_size}")
        if self.on_bad_sample not in ("error", "skip"):
            raise ConfigError(f"data.dataset.on_bad_sample: unknown {self.on_bad_sample!r}; allowed: error, skip")
        if self.check_images not in ("auto", "exists", "header", "decode"):
            raise ConfigError(
                f"data.dataset.check_images: unknown {self.check_images!r}; allowed: auto, exists, header, decode"
            )
        if self.cache_size < 0:
            raise ConfigError(f"data.dataset.cache_size: must be >= 0, got {self.cache_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"data.dataset.max_samples: must be >= 1 or null, got {self.max_samples}")

    @property
    def check(self) -> CheckImages:
        if self.check_images == "auto":
            return "decode" if self.on_bad_sample == "skip" else "header"
        return self.check_images


T = TypeVar("T", bound=type)


def image_options(**defaults: Any) -> Callable[[T], T]:
    """Class decorator: ``cls.__init__`` takes the image options as keyword arguments, with these
    defaults (the others ``ImageOptions``'s), passes them on as ``**image`` and documents them at the end
    of ``cls``'s docstring (its ``Args:`` section)."""
    names = [f.name for f in fields(ImageOptions)]
    if unknown := set(defaults) - set(names):
        raise TypeError(f"image_options: not an image option: {sorted(unknown)}")
    values = {f.name: defaults.get(f.name, f.default) for f in fields(ImageOptions)}
    ImageOptions(**values)  # a wrong default fails at import, not in a user's run
    types = get_type_hints(ImageOptions)

    def decorate(cls: T) -> T:
        init = cls.__init__
        declared = inspect.signature(init)
        own = [p for p in declared.parameters.values() if p.kind is not p.VAR_KEYWORD]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=values[n], annotation=types[n])
                 for n in names]  # fmt: skip
        signature = declared.replace(parameters=own + added)

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()  # this class's defaults, not those of the class it passes them to
            init(*bound.args, **bound.kwargs)

        __init__.__signature__ = signature  # type: ignore[attr-defined]
        cls.__init__ = __init__
        entries = [f"    {n}: {HELP[n].format(default=values[n])}" for n in names]
        cls.__doc__ = "\n".join([inspect.cleandoc(cls.__doc__ or ""), *entries])
        return cls

    return decorate
