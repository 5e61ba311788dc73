"""Rows made ready for the runtime before they are queued: images decoded, prompts tokenized and checked.

Everything that can be wrong with a row is found here, in the request's own worker thread, so a queued row
never fails a batch that holds other clients' rows. Texts are not truncated: a prompt longer than the bundle's
`max_seq_len` is a 400 naming the row (a client would never see a silent truncation).
"""

from __future__ import annotations

from dataclasses import dataclass

from pue.errors import InputError
from pue.runtime import Query
from pue.runtime.prompts import PromptTokenizer
from pue.serve.errors import bad_request
from pue.serve.limits import Limits, image_from_string
from pue.serve.schema import EmbeddingRequest


@dataclass(frozen=True)
class PreparedRows:
    queries: list[Query]
    token_counts: list[int]  # prompt tokens each row runs (image tokens included, padding not)
    kinds: list[str]

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)


def prepare_rows(request: EmbeddingRequest, prompts: PromptTokenizer, limits: Limits) -> PreparedRows:
    """Decode and tokenize every row of `request`; the first bad row is a 400 naming it."""
    queries, counts, kinds = [], [], []
    for index, row in enumerate(request.rows):
        image = image_from_string(row.image, index, row.param, limits) if row.image is not None else None
        try:
            ids, _ = prompts.encode(row.kind, row.text, index=index, truncate=False)
        except InputError as exc:
            message = exc.message.removeprefix(f"item {index}: ")
            # the runtime's hint offers truncation, which a server never does silently
            hint = "shorten the text" if "max_seq_len" in message else exc.hint
            if hint:
                message += f" ({hint})"
            raise bad_request(f"{row.param}: {message}", param=row.param) from exc
        queries.append(Query(image=image, text=row.text))
        counts.append(len(ids))
        kinds.append(row.kind)
    return PreparedRows(queries, counts, kinds)
