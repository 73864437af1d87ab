"""MinHash signatures and an LSH index in compact numpy form, for near-duplicate search at scale.

Why not datasketch's ``MinHash`` + ``MinHashLSH`` objects directly: a ``MinHash`` per record costs a
Python object and several numpy calls (~70 us per short record, see ``bench/RESULTS.md``), and
``MinHashLSH`` keeps every band of every record as Python bytes in dicts (several hundred bytes per
record and band), which does not fit a million records in bounded memory. So this module

* takes the permutation parameters and the (b, r) banding from datasketch, and computes exactly
  datasketch's ``affine32`` signatures (MurmurHash3 finalizer, then ``a * h + b mod 2**32``; a test
  checks equality with ``datasketch.MinHash``) for a whole batch of records with a few numpy calls;
* keeps the LSH buckets as sorted uint64 arrays (:class:`SortedMultimap`, ~12 bytes per entry);
* keeps signatures of kept records in a temporary file (:class:`SignatureStore`) and reads back only
  the few that an LSH candidate needs for its Jaccard estimate.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence

import numpy as np
import xxhash

_MASK32 = np.uint32(0xFFFFFFFF)
# Rows of (shingles x permutations) computed at once; bounds the temporary matrix to ~16 MB.
_CHUNK_SHINGLES = 32768


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (a bijection that spreads the bits of weak hashes)."""
    h = h.astype(np.uint32, copy=True)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def shingles(norm: str, size: int, unit: str = "word") -> list[str]:
    """Overlapping word (or character) n-grams of a normalised text; a short text is one shingle."""
    if unit == "char":
        if len(norm) <= size:
            return [norm]
        return [norm[i:i + size] for i in range(len(norm) - size + 1)]
    w = norm.split()
    if len(w) <= size:
        return [" ".join(w)]
    return [" ".join(w[i:i + size]) for i in range(len(w) - size + 1)]


def shingle_hashes(norm: str, size: int, unit: str = "word") -> list[int]:
    """32-bit xxhash of every shingle (the input hash datasketch calls ``hashfunc``)."""
    h = xxhash.xxh32_intdigest
    return [h(s.encode()) for s in shingles(norm, size, unit)]


@functools.lru_cache(maxsize=32)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) from datasketch's optimiser, weighting missed pairs 9x more than false candidates.

    Every LSH candidate is verified with its Jaccard estimate, so a false candidate costs one
    comparison while a missed pair is a duplicate left in the data. With equal weights, 128
    permutations and threshold 0.8 give 9 bands of 13 rows, which finds a pair of Jaccard 0.85
    only 69% of the time; the 9:1 weighting gives 14 bands of 9 rows and 97.5%.
    """
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    return lsh.b, lsh.r


class MinHasher:
    """Batched MinHash signatures identical to ``datasketch.MinHash(num_perm, seed)`` (affine32)
    fed with :func:`shingle_hashes`."""

    def __init__(self, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHash

        m = MinHash(num_perm=num_perm, seed=seed)
        if getattr(m, "scheme", None) != "affine32":
            raise RuntimeError("instructkit needs datasketch>=2.0 (affine32 MinHash): "
                               "pip install -U 'datasketch>=2.0'")
        a, b = m.permutations
        self.a = np.asarray(a, dtype=np.uint32)[:, None]
        self.b = np.asarray(b, dtype=np.uint32)[:, None]
        self.num_perm = num_perm

    def _min_rows(self, hv: np.ndarray, starts: np.ndarray) -> np.ndarray:
        # (permutations x shingles): reducing along the contiguous axis is ~10x faster than along rows.
        phv = self.a * fmix32(hv)[None, :] + self.b  # uint32 wrap-around is the mod 2**32
        return np.minimum.reduceat(phv, starts, axis=1).T

    def signatures(self, hash_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """(len(hash_lists), num_perm) uint32 signatures; every list must be non-empty."""
        out = np.empty((len(hash_lists), self.num_perm), dtype=np.uint32)
        i = 0
        while i < len(hash_lists):
            j, total = i, 0
            while j < len(hash_lists) and (j == i or total + len(hash_lists[j]) <= _CHUNK_SHINGLES):
                total += len(hash_lists[j])
                j += 1
            if j == i + 1 and total > _CHUNK_SHINGLES:  # one long record: running minimum by slices
                hv = np.asarray(hash_lists[i], dtype=np.uint32)
                sig = np.full(self.num_perm, _MASK32, dtype=np.uint32)
                for s in range(0, len(hv), _CHUNK_SHINGLES):
                    sig = np.minimum(sig, self._min_rows(hv[s:s + _CHUNK_SHINGLES], np.array([0]))[0])
                out[i] = sig
            else:
                lens = np.fromiter((len(h) for h in hash_lists[i:j]), dtype=np.int64, count=j - i)
                starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
                flat = np.fromiter((x for h in hash_lists[i:j] for x in h), dtype=np.uint32, count=total)
                out[i:j] = self._min_rows(flat, starts)
            i = j
        return out


def band_keys(sigs: np.ndarray, bands: int, rows: int, seed: int = 1) -> np.ndarray:
    """(n, bands) uint64 keys; two records share a key in band i when their rows of band i agree."""
    n = sigs.shape[0]
    salt = np.random.RandomState(seed).randint(0, 2**63, size=bands, dtype=np.uint64)
    parts = sigs[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    h = np.broadcast_to(salt, (n, bands)).copy()
    for j in range(rows):
        h = fmix64(h ^ (parts[:, :, j] + np.uint64(0x9E3779B97F4A7C15)))
    return h


def _merge(k1: np.ndarray, v1: np.ndarray, k2: np.ndarray, v2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge two sorted runs; within equal keys the first run's entries stay first."""
    pos = np.searchsorted(k1, k2, side="right") + np.arange(len(k2))
    from_second = np.zeros(len(k1) + len(k2), dtype=bool)
    from_second[pos] = True
    k = np.empty(len(from_second), dtype=k1.dtype)
    v = np.empty(len(from_second), dtype=v1.dtype)
    k[from_second], v[from_second] = k2, v2
    k[~from_second], v[~from_second] = k1, v1
    return k, v


class SortedMultimap:
    """uint64 key -> uint32 values in a few sorted numpy runs (log-structured, 12 bytes per entry).

    Insertion appends a sorted run and merges runs of similar size, so there are O(log n) runs and
    each entry is merged O(log n) times; lookups are binary searches in every run.
    """

    def __init__(self):
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self._runs)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        self._runs.append((keys[order].astype(np.uint64), values[order].astype(np.uint32)))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (k1, v1), (k2, v2) = self._runs[-2:]
            self._runs[-2:] = [_merge(k1, v1, k2, v2)]

    def first(self, keys: np.ndarray) -> np.ndarray:
        """The smallest value stored under each key, or -1."""
        order = np.argsort(keys)  # sorted needles make the binary searches cache-friendly (~5x)
        sk = keys[order]
        best = np.full(len(keys), -1, dtype=np.int64)
        for k, v in self._runs:
            pos = np.searchsorted(k, sk)
            hit = pos < len(k)
            hit[hit] = k[pos[hit]] == sk[hit]
            vals = v[pos[hit]].astype(np.int64)
            cur = best[hit]
            best[hit] = np.where((cur < 0) | (vals < cur), vals, cur)
        out = np.empty_like(best)
        out[order] = best
        return out

    def pairs(self, keys: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """All (query index, value) matches, at most ``limit`` per query and run (oldest first)."""
        order = np.argsort(keys)
        sk = keys[order]
        qs, vs = [], []
        for k, v in self._runs:
            lo = np.searchsorted(k, sk, "left")
            cnt = np.minimum(np.searchsorted(k, sk, "right") - lo, limit)
            m = np.nonzero(cnt)[0]
            if not len(m):
                continue
            q, idx = expand_ranges(lo[m], cnt[m])
            qs.append(order[m][q])
            vs.append(v[idx].astype(np.int64))
        if not qs:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        return np.concatenate(qs), np.concatenate(vs)


def expand_ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges ``[starts[i], starts[i] + counts[i])``: (range number, index) of every element."""
    which = np.repeat(np.arange(len(counts)), counts)
    offs = np.arange(len(which)) - np.repeat(np.cumsum(counts) - counts, counts)
    return which, np.repeat(starts, counts) + offs


def colliding_pairs(keys: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (later row, earlier row) of a (rows, bands) key matrix sharing a key in some band.

    Each row is paired with at most ``limit`` of the earliest rows in each shared bucket.
    """
    n, b = keys.shape
    flat = keys.ravel()
    order = np.argsort(flat, kind="stable")  # stable: within a key, earlier rows first
    sk = flat[order]
    new = np.ones(len(sk), dtype=bool)
    new[1:] = sk[1:] != sk[:-1]
    start = np.maximum.accumulate(np.where(new, np.arange(len(sk)), 0))
    rank = np.arange(len(sk)) - start  # position within its bucket
    later = np.nonzero(rank)[0]
    if not len(later):
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    q, idx = expand_ranges(start[later], np.minimum(rank[later], limit))
    rows = order // b
    return rows[later][q], rows[idx]


class SignatureStore:
    """Signatures of kept records, appended to a temporary file and read back one by one.

    Only LSH candidates are read back, which are few, so the signatures (num_perm x 4 bytes per
    record) cost disk, not memory.
    """

    def __init__(self, num_perm: int, directory: str | None = None):
        self._fh = tempfile.TemporaryFile(dir=directory)
        self._row = num_perm * 4
        self._num_perm = num_perm
        self.n = 0

    def append(self, sigs: np.ndarray) -> None:
        self._fh.seek(0, 2)
        self._fh.write(np.ascontiguousarray(sigs, dtype=np.uint32).tobytes())
        self.n += len(sigs)

    def get(self, ids: Sequence[int]) -> np.ndarray:
        out = np.empty((len(ids), self._num_perm), dtype=np.uint32)
        for i, idx in enumerate(ids):
            self._fh.seek(int(idx) * self._row)
            out[i] = np.frombuffer(self._fh.read(self._row), dtype=np.uint32)
        return out

    def close(self) -> None:
        self._fh.close()
