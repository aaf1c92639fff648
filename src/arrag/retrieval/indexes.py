"""FAISS indexes over patch keys: factory strings, the lossless codebook PQ, training, merging, on-disk lists.

An :class:`IndexConfig` names the index with a description:

- any FAISS factory string — ``Flat``, ``IVF4096,PQ8``, ``OPQ8,IVF4096,PQ8`` (the paper's), ``HNSW32``,
  ``IVF1024,PQ16x4fs``, ``IDMap,Flat`` ...;
- ``<any index>,Refine(CodebookPQ)``, e.g. ``IVF4096,PQ32x4fs,Refine(CodebookPQ)``: the first index (fast,
  lossy: SIMD-scanned 4-bit PQ) makes a shortlist of ``k_factor_rf`` × k entries that the codebook PQ's
  exact distances re-rank, so the results are ordered by exact distances at fast-scan speed;
- ``CodebookPQ``, ``IVF<n>,CodebookPQ`` and ``IVF<n>_HNSW<m>,CodebookPQ``: a product quantizer with one
  sub-quantizer per neighbour cell whose centroids are the L2-normalised codebook (plus the zero vector when
  cells off the grid are zero-padded). A codebook key is a concatenation of such vectors, so its code — the
  neighbours' token ids — is exact, distances are exact, and a key takes
  ``ceil(neighbours · log2(codebook size) / 8)`` bytes. Nothing is trained but the optional IVF coarse
  quantizer (searched through an HNSW graph with ``_HNSW<m>``, for many lists).

Indexes with ids of their own (IVF, ``IDMap``) store the ids of :mod:`arrag.retrieval.database`; the others — flat
codes, HNSW — number entries in the order they are added, so they spend no bytes on ids and must be given
entries in entry order. Shapes: M entries, D key length, n neighbour cells per key,
V codebook size, d code size.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)

_CODEBOOK_PQ = re.compile(r"(?:IVF(\d+)(_HNSW\d+)?,)?CodebookPQ")
_CODEBOOK_REFINE = re.compile(r"(.+),Refine\(CodebookPQ\)")


@dataclass(frozen=True)
class IndexConfig:
    """Which FAISS index a database uses and how it is trained and searched.

    Attributes:
        description: a FAISS factory string, ``CodebookPQ``, ``IVF<n>,CodebookPQ`` or
            ``<factory string>,Refine(CodebookPQ)``.
        on_disk: keep the inverted lists in a memory-mapped ``.ivfdata`` file beside the index (IVF only),
            for databases larger than RAM.
        search_params: FAISS ``ParameterSpace`` settings applied whenever the index is opened, e.g.
            ``nprobe=32`` or ``efSearch=128``; they reach indexes wrapped in OPQ or id maps.
        train_size: keys sampled (evenly over the database) to train quantizers.
    """

    description: str = "Flat"
    on_disk: bool = False
    search_params: str = ""
    train_size: int = 100_000

    def __post_init__(self) -> None:
        if not self.description.strip():
            raise ValueError("an index description is needed, e.g. Flat, IVF1024,CodebookPQ or OPQ8,IVF4096,PQ8")
        if self.train_size < 1:
            raise ValueError(f"train_size must be >= 1, got {self.train_size}")
        if any(int(lists) < 1 for lists in re.findall(r"IVF(\d+)", self.description)):
            raise ValueError(f"an IVF index needs at least one list, not {self.description!r}")
        if self.on_disk and (not self.is_ivf or self.codebook_refine):
            raise ValueError(f"on-disk inverted lists need an IVF index without refinement, not {self.description!r}")
        for setting in filter(None, self.search_params.split(",")):
            name, _, value = setting.partition("=")
            try:
                float(value)
            except ValueError:
                raise ValueError(f"search_params are name=number pairs like nprobe=32, got {setting!r}") from None
            if not name:
                raise ValueError(f"search_params are name=number pairs like nprobe=32, got {setting!r}")
            if name == "k_factor_rf" and not 1 <= float(value) <= 1000:  # FAISS cannot read the index back otherwise
                raise ValueError(f"k_factor_rf must be in [1, 1000], got {value}")
            if name in ("nprobe", "efSearch") and float(value) < 1:  # FAISS would search nothing, or fail
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def codebook_pq(self) -> bool:
        return _CODEBOOK_PQ.fullmatch(self.description) is not None

    @property
    def codebook_refine(self) -> bool:
        return _CODEBOOK_REFINE.fullmatch(self.description) is not None

    @property
    def codebook_codes(self) -> bool:
        """Whether the index stores codebook PQ codes (of codebook keys, not encoder latents)."""
        return self.codebook_pq or self.codebook_refine

    @property
    def is_ivf(self) -> bool:
        return "IVF" in self.description

    @property
    def nlist(self) -> int | None:
        match = re.search(r"IVF(\d+)", self.description)
        return int(match.group(1)) if match else None

    def to_dict(self) -> dict[str, object]:
        return {
            "description": self.description,
            "on_disk": self.on_disk,
            "search_params": self.search_params,
            "train_size": self.train_size,
        }

    @classmethod
    def from_dict(cls, data: dict) -> IndexConfig:
        return cls(
            description=data["description"],
            on_disk=data.get("on_disk", False),
            search_params=data.get("search_params", ""),
            train_size=data.get("train_size", 100_000),
        )


def codebook_bits(codebook_size: int, with_zero: bool) -> int:
    """Bits per neighbour in a codebook PQ code: enough for V tokens, plus one for the zero cell if needed."""
    return max(1, math.ceil(math.log2(codebook_size + int(with_zero))))


def codebook_pq_table(codebook: np.ndarray, bits: int) -> np.ndarray:
    """(2**bits, d) centroid table of one sub-quantizer: the unit codebook, then zero rows (row V: a cell off
    the grid)."""
    table = np.zeros((1 << bits, codebook.shape[1]), dtype=np.float32)
    table[: len(codebook)] = codebook
    return table


def make_index(
    config: IndexConfig, key_dim: int, cells: int, codebook: np.ndarray | None = None, zero_cells: bool = False
) -> faiss.Index:
    """An empty index for ``key_dim``-long keys made of ``cells`` cells.

    Args:
        config: which index.
        key_dim: D.
        cells: n, the neighbour cells per key (D = n·d).
        codebook: (V, d) unit codebook vectors; needed by the codebook PQ, whose index is then ready to add to
            (or, under IVF, ready once its coarse quantizer is trained).
        zero_cells: whether keys hold zero vectors for cells off the grid (the codebook PQ then needs a code
            for them).
    """
    if config.codebook_codes:
        if codebook is None:
            raise ValueError(f"a {config.description} index needs the tokenizer's codebook")
        if key_dim != cells * codebook.shape[1]:
            raise ValueError(f"CodebookPQ keys must be {cells} codebook vectors of {codebook.shape[1]} values")
        bits = codebook_bits(len(codebook), with_zero=zero_cells)
        if bits > 16:
            raise ValueError(f"CodebookPQ supports codebooks of up to 65,535 codes, not {len(codebook)}")
    refined = _CODEBOOK_REFINE.fullmatch(config.description)
    if refined:
        try:
            index = faiss.index_factory(key_dim, f"{refined.group(1)},Refine(PQ{cells}x{bits})")
        except RuntimeError as error:
            raise ValueError(f"FAISS cannot make index {refined.group(1)!r}: {str(error).splitlines()[-1]}") from error
        refine = faiss.downcast_index(index.refine_index)
        _set_codebook_tables(refine, codebook, bits, cells)
        refine.is_trained = True
        return index
    match = _CODEBOOK_PQ.fullmatch(config.description)
    if match:
        nlist, graph = match.group(1), match.group(2) or ""
        factory = f"IVF{nlist}{graph},PQ{cells}x{bits}" if nlist else f"PQ{cells}x{bits}"
        index = faiss.index_factory(key_dim, factory)
        pq_index = faiss.downcast_index(faiss.extract_index_ivf(index) if nlist else index)
        if nlist:
            pq_index.by_residual = False  # codes hold the keys themselves, not residuals from list centroids
        _set_codebook_tables(pq_index, codebook, bits, cells)
        if not nlist:
            pq_index.is_trained = True
        return index
    try:
        return faiss.index_factory(key_dim, config.description, faiss.METRIC_L2)
    except RuntimeError as error:
        raise ValueError(f"FAISS cannot make index {config.description!r}: {str(error).splitlines()[-1]}") from error


def stores_ids(index: faiss.Index) -> bool:
    """Whether ``index`` keeps the ids it is given (IVF, id maps) rather than numbering entries as added."""
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return True
    # an IVF under a refinement stage still numbers entries as added: IndexRefine takes no ids
    return (
        not isinstance(faiss.downcast_index(index), faiss.IndexRefine)
        and faiss.try_extract_index_ivf(index) is not None
    )


def _set_codebook_tables(pq_index: faiss.Index, codebook: np.ndarray, bits: int, cells: int) -> None:
    """Make every sub-quantizer of ``pq_index`` (an IndexPQ or IndexIVFPQ) the unit codebook."""
    tables = np.tile(codebook_pq_table(codebook, bits), (cells, 1))  # (n·2**bits, d)
    faiss.copy_array_to_vector(tables.ravel(), pq_index.pq.centroids)


def _refinement(index: faiss.Index) -> faiss.IndexRefine | None:
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexRefine) else None


def train(index: faiss.Index, config: IndexConfig, sample: np.ndarray, seed: int = 0) -> None:
    """Train ``index`` on (S, D) sample keys; for the codebook PQ only the IVF coarse quantizer is trained."""
    nlist = config.nlist
    if nlist is not None and len(sample) < nlist:
        raise ValueError(
            f"{config.description} needs at least {nlist} training keys, the database has {len(sample)}; "
            f"choose fewer lists (IVF{max(1, len(sample) // 39)} suits it)"
        )
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    refinement = _refinement(index)
    if refinement is not None:  # train the shortlisting index only: the codebook PQ is exact as it is
        base = faiss.downcast_index(refinement.base_index)
        train(base, IndexConfig(config.description.rsplit(",Refine(", 1)[0]), sample, seed)
        refinement.is_trained = True
        return
    if config.codebook_pq:
        ivf = faiss.extract_index_ivf(index)
        kmeans = faiss.Kmeans(sample.shape[1], nlist, niter=20, seed=seed, spherical=False)
        kmeans.train(sample)
        ivf.quantizer.add(kmeans.centroids)
        ivf.is_trained = True
        index.is_trained = True
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    index.train(sample)


def pack_codes(cells: np.ndarray, bits: int) -> np.ndarray:
    """(M, n) neighbour token ids -> (M, ceil(n·bits/8)) uint8 PQ codes in FAISS's little-endian bit order."""
    cells = np.asarray(cells, dtype=np.int64)
    bit_matrix = ((cells[:, :, None] >> np.arange(bits)) & 1).astype(np.uint8)  # (M, n, bits)
    return np.packbits(bit_matrix.reshape(len(cells), -1), axis=1, bitorder="little")


def add_entries(index: faiss.Index, config: IndexConfig, keys: np.ndarray, ids: np.ndarray, cells: np.ndarray) -> None:
    """Add (M, D) keys under (M,) ids (kept by :func:`stores_ids` indexes; the others number entries as added);
    the codebook PQ stores the (M, n) neighbour tokens ``cells`` as its codes."""
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64) if stores_ids(index) else None
    refinement = _refinement(index)
    if refinement is not None and config.codebook_refine:  # both parts numbered as added
        refine = faiss.downcast_index(refinement.refine_index)
        refine.add_sa_codes(_codebook_codes(refine, cells))
        faiss.downcast_index(refinement.base_index).add(keys)
        refinement.ntotal = refine.ntotal
        return
    if not config.codebook_pq:
        if ids is None:
            index.add(keys)
        else:
            index.add_with_ids(keys, ids)
        return
    ivf = faiss.try_extract_index_ivf(index)
    codes = _codebook_codes(faiss.downcast_index(ivf if ivf is not None else index), cells)  # (M, code_size)
    if ivf is not None:
        lists = ivf.quantizer.assign(keys, 1).ravel()  # (M,)
        coarse = lists.astype("<i8").view(np.uint8).reshape(-1, 8)[:, : ivf.coarse_code_size()]
        codes = np.ascontiguousarray(np.concatenate([coarse, codes], axis=1))
    index.add_sa_codes(codes, ids)


def _codebook_codes(pq_index: faiss.Index, cells: np.ndarray) -> np.ndarray:
    """(M, n) neighbour tokens -> the (M, code_size) codes of ``pq_index``, a codebook PQ."""
    if len(cells) and cells.max() >= 1 << pq_index.pq.nbits:
        raise ValueError(f"token {cells.max()} does not fit the {pq_index.pq.nbits}-bit codes of this CodebookPQ")
    return pack_codes(cells, pq_index.pq.nbits)


def _hnsw(index: faiss.Index) -> faiss.IndexHNSW | None:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def _fast_scan(index: faiss.Index) -> bool:
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.BlockInvertedLists)


def _merges_by_keys(index: faiss.Index) -> bool:
    """HNSW graphs cannot be merged, and FAISS 1.15's merge of fast-scan (block) inverted lists corrupts the
    heap for some list sizes (found with MALLOC_CHECK_=3, then valgrind): their shards keep the keys instead."""
    return _hnsw(index) is not None or _fast_scan(index)


def shard_template(template: faiss.Index) -> faiss.Index:
    """An empty index to build one shard of a database in: a copy of the trained empty ``template``; for indexes
    that cannot merge shards (HNSW, fast-scan IVF), a flat index (id-mapped like the template) whose keys
    :func:`merge_into` adds to the database's index; for a refined index, an IndexRefine of such a flat index
    and the codebook PQ."""
    refinement = _refinement(template)
    if refinement is not None:  # keys for the shortlist index (see merge_into), codes for the codebook PQ
        return faiss.IndexRefine(faiss.IndexFlatL2(template.d), faiss.clone_index(refinement.refine_index))
    if _merges_by_keys(template):
        flat = faiss.IndexFlatL2(template.d)
        return faiss.IndexIDMap(flat) if stores_ids(template) else flat
    return faiss.clone_index(template)


def merge_into(base: faiss.Index, part: faiss.Index) -> None:
    """Move every entry of ``part`` (a :func:`shard_template` of ``base``'s template) after those of ``base``."""
    refinement = _refinement(base)
    if refinement is not None:  # the shortlist index takes the part's keys, the codebook PQ its codes
        other = _refinement(part)
        if other.ntotal:
            keys = faiss.downcast_index(other.base_index).reconstruct_n(0, other.ntotal)  # (M, D)
            faiss.downcast_index(refinement.base_index).add(keys)
            faiss.downcast_index(refinement.refine_index).merge_from(faiss.downcast_index(other.refine_index), 0)
            refinement.ntotal = faiss.downcast_index(refinement.base_index).ntotal
        return
    if _merges_by_keys(base):
        if not part.ntotal:
            return
        if stores_ids(part):
            keys = faiss.downcast_index(part.index).reconstruct_n(0, part.ntotal)  # (M, D)
            base.add_with_ids(keys, faiss.vector_to_array(part.id_map))
        else:
            base.add(part.reconstruct_n(0, part.ntotal))
        return
    base.merge_from(part, 0)


def merge_on_disk(
    template: faiss.Index, parts: list[Path], ivfdata: Path, base: faiss.Index | None = None
) -> faiss.Index:
    """Merge the inverted lists of IVF index files into ``ivfdata`` (memory-mapped) under ``template``.

    As ``faiss.contrib.ondisk.merge_ondisk``: the part files are memory-mapped, not loaded. ``base``, an
    open on-disk index, goes first: that is how :func:`arrag.build.add_to_database` grows an on-disk database
    (its lists cannot be opened with ``IO_FLAG_MMAP``).
    """
    template_ivf = faiss.extract_index_ivf(template)
    if template.ntotal:
        raise ValueError("merge_on_disk needs an empty trained template")
    opened = [base] if base is not None else []
    opened += [faiss.read_index(str(path), faiss.IO_FLAG_MMAP) for path in parts]
    pointers = faiss.InvertedListsPtrVector()
    for index in opened:  # kept open until the merge is done
        pointers.push_back(faiss.extract_index_ivf(index).invlists)
    merged = faiss.OnDiskInvertedLists(template_ivf.nlist, template_ivf.code_size, str(ivfdata))
    total = merged.merge_from_multiple(pointers.data(), pointers.size(), False)
    template.ntotal = template_ivf.ntotal = total
    template_ivf.replace_invlists(merged, True)
    merged.this.disown()
    return template


def set_search_params(index: faiss.Index, params: str) -> None:
    """Apply ``name=value,...`` search parameters through ``faiss.ParameterSpace``, which reaches wrapped
    indexes (OPQ pre-transforms, id maps) where setting ``index.nprobe`` in Python silently does nothing."""
    if not params:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as error:
        raise ValueError(f"search parameters {params!r} do not apply to this index: {error}") from error


def read_index(path: Path) -> faiss.Index:
    """Read an index file; on-disk inverted lists are looked up beside it, so a database folder can move."""
    return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
