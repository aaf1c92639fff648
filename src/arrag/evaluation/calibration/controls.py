"""Content-free distributions to mix in instead of p_ret: what retrieval must beat to count as informative.

Mixing almost anything into a miscalibrated distribution lowers its NLL (smoothing). A control is mixed in the
same way, with its own λ tuned on validation; retrieval informs the model only by what it adds beyond the best:

- ``frequency``: the database's next-token frequencies, the same for every position;
- ``bucket-frequency``: the next tokens of the neighbours retrieved for validation positions whose nearest
  distance falls in the same bucket (buckets fixed on validation): it knows how close the context's nearest match
  is, not which tokens it found;
- ``conditional`` (for the guided distribution only): the model's own unguided distribution.

Shapes: M held-out positions, V codebook size.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from arrag.retrieval.database import PatchDatabase
from arrag.retrieval.neighbours import Neighbours


def database_token_counts(database: PatchDatabase) -> np.ndarray:
    """(V,) how often each token is an entry's next token, over the whole database."""
    if database.next_tokens is not None:
        tokens = np.asarray(database.next_tokens)
    else:  # the ids of an id-storing index carry the tokens
        tokens = database.locate(_stored_ids(database.index))[2]
    return np.bincount(tokens.astype(np.int64), minlength=database.spec.codebook_size)


def _stored_ids(index: faiss.Index) -> np.ndarray:
    """Every id an id-storing index (an id map or an IVF) holds."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map)
    ivf = faiss.extract_index_ivf(index)
    lists, parts = ivf.invlists, [np.zeros(0, dtype=np.int64)]
    for i in range(ivf.nlist):
        if size := lists.list_size(i):
            pointer = lists.get_ids(i)
            parts.append(faiss.rev_swig_ptr(pointer, size).copy())
            lists.release_ids(i, pointer)
    return np.concatenate(parts)


def frequency_control(token_counts: np.ndarray, targets: torch.Tensor) -> torch.Tensor:
    """(V,) token counts and (M,) targets -> (M,) log q(y) of the normalised counts."""
    counts = torch.as_tensor(np.asarray(token_counts, dtype=np.float64))
    return torch.log(counts / counts.sum())[targets]


def bucket_control(bucket_counts: np.ndarray, buckets: np.ndarray, targets: torch.Tensor) -> torch.Tensor:
    """(buckets, V) token counts per nearest-distance bucket, (M,) each position's bucket and (M,) targets -> (M,)
    log q(y) of the position's bucket's normalised counts (the pooled counts for an empty bucket)."""
    counts = torch.as_tensor(np.asarray(bucket_counts, dtype=np.float64))  # (buckets, V)
    counts = torch.where(counts.sum(-1, keepdim=True) > 0, counts, counts.sum(0))
    return torch.log(counts / counts.sum(-1, keepdim=True))[torch.as_tensor(buckets), targets]


def bucket_edges(nearest: np.ndarray, buckets: int) -> np.ndarray:
    """(n,) nearest distances -> the inner edges of ``buckets`` equally filled buckets (ties merge buckets)."""
    if buckets < 2 or not len(nearest):
        return np.zeros(0)
    return np.unique(np.quantile(nearest, np.arange(1, buckets) / buckets))


def bucket_of(nearest: torch.Tensor | np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each distance's bucket: the number of edges below it (a distance on an edge joins the lower bucket)."""
    return np.searchsorted(edges, np.asarray(nearest, dtype=np.float64), side="left")


def bucket_token_counts(
    found: Neighbours, rows: torch.Tensor, nearest: torch.Tensor, edges: np.ndarray, vocab_size: int
) -> np.ndarray:
    """(buckets, V + 1) how often each token follows the neighbours of these positions (``rows`` of ``found``),
    per bucket of their nearest distance; column V counts padding, which the caller drops."""
    tokens = torch.where(found.valid, found.tokens, vocab_size)  # (b, K)
    histogram = torch.zeros(len(tokens), vocab_size + 1).scatter_add_(
        -1, tokens, torch.ones(tokens.shape)
    )  # (b, V + 1)
    members = torch.zeros(len(tokens), len(edges) + 1)  # (b, buckets): validation positions per query and bucket
    members.index_put_((rows, torch.from_numpy(bucket_of(nearest, edges))), torch.ones(len(rows)), accumulate=True)
    return (members.T.double() @ histogram.double()).numpy()  # (buckets, V + 1)
