"""Exact duplicates between the data a model trains on and the data it is evaluated on.

A test sample whose exact copy (the same image bytes and the same text) is also a training sample
makes test metrics measure memory, not generalisation. Such copies are counted, not removed: which
copy to keep is the user's decision, and removing samples would change the partition.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from torch import Tensor

from fedilora.data.errors import DataError
from fedilora.data.source import MultimodalData


def image_digest(data: MultimodalData, row: int) -> bytes:
    """A hash of sample ``row``'s image bytes: the file's bytes for image files, the pixels for a tensor."""
    images = data.images
    if isinstance(images, Tensor):
        return hashlib.blake2b(images[row].contiguous().numpy().tobytes(), digest_size=16).digest()
    try:
        return images.digest(row)
    except OSError as err:
        raise DataError(f"image file {images.paths[row]} cannot be read ({err.strerror or err})") from None


def count_copies(seen: MultimodalData, seen_rows: Tensor, probe: MultimodalData, probe_rows: Tensor) -> int:
    """How many of ``probe_rows`` (samples of ``probe``) have an exact copy among ``seen_rows`` of ``seen``.

    Texts are compared first, so only the images of samples that share a text are hashed: a data set
    without repeated texts costs no file reads.
    """
    by_text: dict[str, list[int]] = defaultdict(list)
    for row in seen_rows.tolist():
        by_text[seen.texts[row]].append(row)
    candidates = [row for row in probe_rows.tolist() if probe.texts[row] in by_text]
    if not candidates:
        return 0
    seen_digests: dict[int, bytes] = {}
    copies = 0
    for row in candidates:
        mine = image_digest(probe, row)
        for other in by_text[probe.texts[row]]:
            if other not in seen_digests:
                seen_digests[other] = image_digest(seen, other)
            if seen_digests[other] == mine:
                copies += 1
                break
    return copies
