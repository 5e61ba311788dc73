"""Response bodies in the OpenAI schema."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np


def embeddings_body(vectors: np.ndarray, encoding_format: str, model: str, prompt_tokens: int) -> bytes:
    """`{"object": "list", "data": [...], "model", "usage"}`; base64 is little-endian float32, as OpenAI's."""
    vectors = np.asarray(vectors, dtype="<f4")
    if encoding_format == "base64":
        encoded: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    else:
        encoded = vectors.tolist()  # float32 → float is exact; JSON's shortest repr reads back to the same float32
    data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
    usage = {"prompt_tokens": int(prompt_tokens), "total_tokens": int(prompt_tokens)}
    return json.dumps({"object": "list", "data": data, "model": model, "usage": usage}).encode("utf-8")


def model_card(model: str, created: float) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": int(created), "owned_by": "pue"}
