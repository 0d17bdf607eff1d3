"""Labels for image files and/or texts from a model written by ``fedilora export``.

Command line (one line per input: the input, ``->``, the label and its probability)::

    fedilora predict runs/export --image cat.jpg dog.jpg --text "a cat" "a dog"
    cat.jpg + "a cat" -> cat (0.9132)
    dog.jpg + "a dog" -> dog (0.8710)

    fedilora predict runs/export --image cat.jpg dog.jpg      # images alone: the text is missing
    fedilora predict runs/export --text "a cat" --json        # one JSON object per line

``EXPORT`` is the folder ``fedilora export`` wrote (its global model), or one of its adapters:
``EXPORT/global`` or ``EXPORT/clients/client_<k>`` (a client's personalized model). With both
``--image`` and ``--text``, the k-th image and the k-th text are one input (give the same number of
each); an empty value (``""``) leaves that modality out of that input. An input without image or
without text is handled by the model's missing-modality strategy (``zero``: blank pixels or the empty
text, ``learned``: the learned embedding), as in training. Other options: ``--batch_size`` (32) and
``--device`` (``cpu``). A file that does not exist, an altered export or a model with NaN weights is one
line on stderr and exit status 2.

Python::

    import fedilora

    for p in fedilora.predict("runs/export", images=["cat.jpg", "dog.jpg"], texts=["a cat", None]):
        print(p)  # cat.jpg + "a cat" -> cat (0.9132)
        p.label, p.probability, p.probabilities  # "cat", 0.9132, {"bird": 0.04, "cat": 0.91, "dog": 0.05}

``images`` and ``texts`` are lists (or one of them alone); ``None`` or ``""`` in either leaves that
modality out of that input. Labels are the data's class names (``id2label`` of the export; the class
index where the data has no names). ``multiclass``: the most probable class; ``binary``: the positive
class (the second name) when its probability is at least 0.5, else the negative; ``multilabel``: every
label with probability >= 0.5, joined by ``|`` (``""`` if none), with the smallest of their
probabilities (if none, 1 - the largest probability).

The inputs go through the data pipeline's own steps: images through ``decode_image`` at the size the
training data was decoded to (``image_size`` of the export), texts through the model's tokenizer
(``tokenize_texts``), and both through the model's forward pass (normalisation and resizing included).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedilora.errors import ConfigError


@dataclass(frozen=True)
class Prediction:
    """The label of one input, its probability, and every class's probability."""

    image: str | None
    text: str | None
    label: str
    probability: float
    probabilities: dict[str, float] = field(default_factory=dict)

    @property
    def source(self) -> str:
        parts = [self.image, json.dumps(self.text) if self.text is not None else None]
        return " + ".join(part for part in parts if part is not None)

    def __str__(self) -> str:
        return f"{self.source} -> {self.label or '(no label)'} ({self.probability:.4f})"


def _inputs(images: Sequence | None, texts: Sequence | None) -> list[tuple[str | None, str | None]]:
    """(image, text) pairs; None where a modality is left out."""
    if isinstance(images, (str, Path)) or isinstance(texts, str):
        raise ConfigError("predict: images and texts are lists (of paths, of texts); wrap a single one in [...]")
    if images is None and texts is None:
        raise ConfigError("predict: give images (--image FILE ...), texts (--text TEXT ...) or both")
    if images is not None and texts is not None and len(images) != len(texts):
        raise ConfigError(
            f"predict: {len(images)} images and {len(texts)} texts; with both, the k-th image and the k-th text are "
            'one input: give as many of each (an empty "" leaves that modality out of its input)'
        )
    count = len(images) if images is not None else len(texts)
    pairs = []
    for k in range(count):
        image = images[k] if images is not None else None
        text = texts[k] if texts is not None else None
        image = str(image) if image not in (None, "") else None
        text = None if text is None or text == "" else str(text)
        if image is None and text is None:
            raise ConfigError(f"predict: input {k + 1} has neither an image nor a text")
        if image is not None and not Path(image).is_file():
            what = "is a folder, not an image file" if Path(image).is_dir() else "does not exist"
            raise ConfigError(f"predict: image {image} {what}")
        pairs.append((image, text))
    return pairs


def predict(
    export: str | Path,
    images: Sequence[str | Path | None] | None = None,
    texts: Sequence[str | None] | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> list[Prediction]:
    """One ``Prediction`` per input of the exported model at ``export`` (see the module's docstring)."""
    from fedilora.export import load_export

    if batch_size < 1:
        raise ConfigError(f"predict: batch_size must be >= 1, got {batch_size}")
    pairs = _inputs(images, texts)
    model, meta = load_export(export, "predict")
    return predict_with(model, pairs, meta.get("id2label"), meta.get("image_size"), batch_size, device)


def predict_with(
    model,
    pairs: Sequence[tuple[str | None, str | None]],
    id2label: Mapping[str, str] | None = None,
    image_size: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> list[Prediction]:
    """Predictions of a loaded ``LoRACLIPClassifier`` for ``(image path or None, text or None)`` pairs."""
    import torch

    count = 2 if model.task == "binary" else model.num_classes  # binary: negative and positive class
    names = [str(id2label.get(str(i), i)) if id2label else str(i) for i in range(count)]
    model = model.to(device).eval()
    out: list[Prediction] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        with torch.no_grad():
            scores = model.predictions(model(_batch(model, chunk, image_size, device))).cpu()
        for (image, text), row in zip(chunk, scores, strict=True):
            out.append(_prediction(model.task, names, image, text, row))
    return out


def _batch(model, pairs: Sequence[tuple[str | None, str | None]], image_size: int | None, device: str) -> dict:
    """``{image, tokens, image_present, text_present}`` as the datamodule builds it: uint8 pixels decoded by
    ``decode_image`` (zeros where the image is missing), token ids from ``tokenize_texts``."""
    import open_clip
    import torch

    from fedilora.data.datamodule import tokenize_texts
    from fedilora.data.files import decode_image

    size = int(image_size or model.image_size[0])
    images = torch.zeros(len(pairs), 3, size, size, dtype=torch.uint8)
    for k, (image, _) in enumerate(pairs):
        if image is not None:
            images[k] = decode_image(image, size)
    tokens = tokenize_texts(open_clip.get_tokenizer(model.model_name), [text or "" for _, text in pairs])
    return {
        "image": images.to(device),
        "tokens": tokens.to(device),
        "image_present": torch.tensor([image is not None for image, _ in pairs], device=device),
        "text_present": torch.tensor([text is not None for _, text in pairs], device=device),
    }


def _prediction(task: str, names: list[str], image: str | None, text: str | None, scores) -> Prediction:
    values = [float(v) for v in scores.reshape(-1)]
    if task == "binary":  # one probability: of the positive class, names[1]
        positive = values[0]
        probabilities = {names[0]: 1.0 - positive, names[1]: positive}
        label = names[1] if positive >= 0.5 else names[0]
        return Prediction(image, text, label, probabilities[label], probabilities)
    probabilities = dict(zip(names, values, strict=True))
    if task == "multilabel":
        chosen = [name for name, p in probabilities.items() if p >= 0.5]
        probability = min(probabilities[n] for n in chosen) if chosen else 1.0 - max(values)
        return Prediction(image, text, "|".join(chosen), probability, probabilities)
    best = max(range(len(values)), key=values.__getitem__)
    return Prediction(image, text, names[best], values[best], probabilities)


def main(argv: Sequence[str] | None = None) -> None:
    """``fedilora predict EXPORT [--image FILE ...] [--text TEXT ...]``: one line per input."""
    parser = argparse.ArgumentParser(
        prog="fedilora predict",
        description="Labels of image files and/or texts from a model written by `fedilora export`.",
        allow_abbrev=False,
    )
    parser.add_argument("export", help="export folder (its global model), EXPORT/global or EXPORT/clients/client_<k>")
    parser.add_argument("--image", "--images", dest="images", nargs="+", action="extend", metavar="FILE",
                        help="image files; with --text, the k-th image and the k-th text are one input")  # fmt: skip
    parser.add_argument("--text", "--texts", dest="texts", nargs="+", action="extend", metavar="TEXT",
                        help='texts; "" leaves the text out of that input')  # fmt: skip
    parser.add_argument("--batch_size", type=int, default=32, help="inputs per forward pass (default 32)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        predictions = predict(args.export, args.images, args.texts, args.batch_size, args.device)
    except ConfigError as err:
        print(f"fedilora predict: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for p in predictions:
        if args.json:
            print(json.dumps({"image": p.image, "text": p.text, "label": p.label, "probability": p.probability,
                              "probabilities": p.probabilities}))  # fmt: skip
        else:
            print(p)


if __name__ == "__main__":
    main()
