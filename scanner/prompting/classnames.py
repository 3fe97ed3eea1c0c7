"""Class names <-> tokens: the BPE tokenizer, and recovering names from a CoOp ``token_suffix``.

Dassl checkpoints do not store class names, but CoOp's ``token_suffix`` (n_cls, L-1-M, D) rows are
copies of rows of the backbone's token-embedding table: [name tokens] "." EOT padding. A nearest-row
lookup that must match exactly (within ``atol``) turns them back into token ids, and the tokenizer's
``decode`` turns ids into text. A row that matches no table row means the checkpoint was tuned on a
different backbone (or is not a CoOp suffix), which is reported rather than guessed at.
"""

from __future__ import annotations

import functools

import open_clip
import torch

from scanner.clip.backbone import ClipBackbone
from scanner.errors import CheckpointError

_POSITIONS = ("end", "middle", "front")
_ROW_CHUNK = 256  # suffix rows compared with the embedding table at once: bounds memory to 256 x V


@functools.cache
def simple_tokenizer() -> open_clip.SimpleTokenizer:
    """open_clip's CLIP BPE tokenizer (the one ``ClipBackbone.tokenize`` uses), loaded once."""
    return open_clip.SimpleTokenizer()


def _nearest_token_ids(table: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ids (N,) of the nearest table rows (V, D) to ``rows`` (N, D) and the worst max-abs difference."""
    ids = []
    worst = 0.0
    sq_table = (table * table).sum(-1)  # (V,)
    for start in range(0, rows.shape[0], _ROW_CHUNK):
        chunk = rows[start:start + _ROW_CHUNK]  # (n, D)
        # ||a - b||^2 up to the constant ||a||^2: one matmul over the vocabulary.
        dist = sq_table.unsqueeze(0) - 2.0 * chunk @ table.T  # (n, V)
        best = dist.argmin(dim=-1)
        diff = (table[best] - chunk).abs().amax(dim=-1)  # (n,)
        worst = max(worst, float(diff.max()))
        ids.append(best)
    return torch.cat(ids), worst


def decode_classnames(backbone: ClipBackbone, token_suffix: torch.Tensor, position: str = "end", *,
                      atol: float = 1e-4) -> list[str]:
    """Class names from a CoOp ``token_suffix`` (n_cls, L', D) built on ``backbone``.

    ``position`` is validated but does not change the decoding: CoOp stores the same suffix layout
    (name, ".", EOT, padding) for every class-token position. Rows are compared in the suffix's own
    dtype, so an fp16 checkpoint decodes exactly too. Names come back as the tokenizer cleans them
    (lower case, single spaces). Raises :class:`CheckpointError` when a row is not a table row or a
    class has no end-of-text token.
    """
    if position not in _POSITIONS:
        raise CheckpointError(
            f"class_token_position must be one of {', '.join(_POSITIONS)}; got {position!r}"
        )
    if token_suffix.ndim != 3:
        raise CheckpointError(
            f"token_suffix must be (n_cls, tokens, width); found shape {tuple(token_suffix.shape)}"
        )
    weight = backbone.token_embedding.weight.detach()
    if token_suffix.shape[-1] != weight.shape[1]:
        raise CheckpointError(
            f"token_suffix width {token_suffix.shape[-1]} does not match the backbone's token embedding "
            f"width {weight.shape[1]}; load the checkpoint with the backbone it was tuned on"
        )
    tok = simple_tokenizer()
    eot, dot = tok.eot_token_id, tok.encoder[".</w>"]
    # Compare in the checkpoint's precision: the table rounded like the suffix was when it was saved.
    table = weight.to("cpu", token_suffix.dtype).float()  # the backbone may sit on a GPU
    suffix = token_suffix.detach().float()
    n_cls, length, _ = suffix.shape
    names: list[str] = []
    # Decode column by column and stop once every class has met its EOT: names are short, the
    # padding after them is most of the suffix, and real vocabularies are large (49408 x 512).
    ids = torch.full((n_cls, length), -1, dtype=torch.long)
    done = torch.zeros(n_cls, dtype=torch.bool)
    for col in range(length):
        todo = (~done).nonzero().flatten()
        if todo.numel() == 0:
            break
        found, worst = _nearest_token_ids(table, suffix[todo, col])
        if worst > atol:
            raise CheckpointError(
                f"token_suffix position {col} is not a row of the backbone's token-embedding table (max "
                f"difference {worst:.3g} > {atol:g}): the checkpoint was tuned on another backbone; pass the "
                "matching backbone or give the class names explicitly"
            )
        ids[todo, col] = found
        done[todo] = found == eot
    for k in range(n_cls):
        row = ids[k].tolist()
        if eot not in row:
            raise CheckpointError(
                f"class {k}: token_suffix has no end-of-text token; it is not a CoOp suffix — give the class "
                "names explicitly"
            )
        name_ids = row[:row.index(eot)]
        if name_ids and name_ids[-1] == dot:  # CoOp prompts end in "{name}."
            name_ids = name_ids[:-1]
        names.append(tok.decode(name_ids).strip())
    return names
