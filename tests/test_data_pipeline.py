"""The grain training pipeline: restore, epochs, sharding, mixtures, DD, config errors."""

import json

import grain
import numpy as np
import pytest

from lcjax.config import ConfigError
from lcjax.data import default_data_config, make_eval_documents, make_train_iterator
from lcjax.data.mixture import MixtureSampler
from lcjax.data.tokenizers import ByteTokenizer, UndecodableDocument

BOS = 257


class FakeTokenizer(ByteTokenizer):
  """The byte tokenizer, except that documents starting with 0xff are undecodable."""

  def encode(self, doc):
    if doc.startswith(b"\xff"):
      raise UndecodableDocument("not UTF-8")
    return super().encode(doc)


def numbered_docs(count, seed=0, letters=b"abcdefghijklmnopqrstuvwxyz", max_len=60):
  """Documents `#0007|` + random letters, so the document order can be read back from rows."""
  rng = np.random.default_rng(seed)
  alphabet = np.frombuffer(letters, np.uint8)
  return [
    b"#%04d|" % i + bytes(rng.choice(alphabet, rng.integers(1, max_len))) for i in range(count)
  ]


CORPORA = {
  "small": numbered_docs(24),
  "upper": numbered_docs(30, seed=1, letters=b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
  "lower": numbered_docs(30, seed=2, max_len=20),
  "dirty": [b"", b"\xffbad", *numbered_docs(10, seed=3), b"", b"\xff", b""],
  "long": numbered_docs(40, seed=4, max_len=400),
}


def fake_source(source_config, split):
  if source_config["kind"] != "fake":
    raise AssertionError("tests use fake sources unless they build the real default")
  return grain.MapDataset.source(CORPORA[source_config["name"]])


def fake_tokenizer(tokenizer_config):
  assert tokenizer_config == {"kind": "byte"}  # validated: unset options dropped
  return FakeTokenizer()


def fake_iterator(data_config, **kwargs):
  """`make_train_iterator` on the fake corpora and tokenizer."""
  return make_train_iterator(
    data_config, build_source=fake_source, build_tokenizer=fake_tokenizer, **kwargs
  )


def fake_eval_documents(data_config, *args, **kwargs):
  return make_eval_documents(
    data_config, *args, build_source=fake_source, build_tokenizer=fake_tokenizer, **kwargs
  )


def config(name="small", **overrides):
  cfg = default_data_config()
  cfg.source = {"kind": "fake", "name": name}
  cfg.seq_len = 32
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    assert g.keys() == w.keys()
    for key in w:
      np.testing.assert_array_equal(g[key], w[key])


def document_order(batches):
  """Ids of the documents in stream order (rows concatenate framed documents in order)."""
  flat = np.concatenate([row[seg > 0] for b in batches for row, seg in zip(*_rows(b), strict=True)])
  starts = np.flatnonzero(flat == BOS)
  return [int(bytes(flat[s + 2 : s + 6].astype(np.uint8))) for s in starts if s + 6 <= flat.size]


def _rows(batch):
  return batch["tokens"], batch["segment_ids"]


def test_batches_follow_the_contract():
  it = fake_iterator(config(position_scheme="per_document"), batch_size=3, seed=0)
  batch = next(it)
  assert sorted(batch) == sorted(["tokens", "targets", "segment_ids", "positions", "loss_weights"])
  for key, value in batch.items():
    assert value.shape == (3, 32)
    assert value.dtype == (np.float32 if key == "loss_weights" else np.int32)
  assert np.all(batch["positions"][batch["tokens"] == BOS] == 0)


def test_save_restore_gives_identical_next_batches():
  cfg = config()
  it = fake_iterator(cfg, batch_size=4, seed=5)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serializable
  want = take(it, 20)  # crosses epoch boundaries
  assert it.get_state()["iterator"]["cursor"] > 2 * len(CORPORA["small"])
  fresh = fake_iterator(cfg, batch_size=4, seed=5)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 20), want)
  it.set_state(state)
  assert_same_batches(take(it, 20), want)
  assert fresh.stats() == it.stats()


def test_epochs_reshuffle_deterministically():
  n = len(CORPORA["small"])

  def order(seed, shuffle=True):
    it = fake_iterator(config(shuffle=shuffle), batch_size=4, seed=seed)
    ids = document_order(take(it, 30))
    assert len(ids) >= 3 * n
    return [ids[:n], ids[n : 2 * n], ids[2 * n : 3 * n]]

  epochs = order(0)
  for epoch in epochs:
    assert sorted(epoch) == list(range(n))  # every document once per epoch
  assert epochs[0] != epochs[1] != epochs[2]
  assert order(0) == epochs
  assert order(1) != epochs
  assert order(0, shuffle=False) == [list(range(n))] * 3


def test_processes_read_disjoint_documents():
  n = len(CORPORA["small"])
  seen = []
  for process in range(3):
    it = fake_iterator(config(), batch_size=2, seed=0, process_index=process, process_count=3)
    seen.append(set(document_order(take(it, 8))))
  assert seen[0].isdisjoint(seen[1]) and seen[0].isdisjoint(seen[2]) and seen[1].isdisjoint(seen[2])
  assert set.union(*seen) == set(range(n))
  assert seen[1] == set(range(1, n, 3))


def test_stats_count_skipped_documents():
  docs = CORPORA["dirty"]
  n = len(docs)
  it = fake_iterator(config("dirty", shuffle=False), batch_size=2, seed=0)
  batches = take(it, 15)
  state = it.get_state()["iterator"]
  cursor, offset = state["cursor"], state["offset"]
  read = [docs[i % n] for i in range(cursor)]
  stats = it.stats()
  assert cursor > n  # more than one epoch, so each skip was counted twice
  assert stats["skipped_empty"] == sum(d == b"" for d in read)
  assert stats["skipped_undecodable"] == sum(d.startswith(b"\xff") for d in read)
  good = sum(d != b"" and not d.startswith(b"\xff") for d in read)
  assert stats["documents"] == good + (offset > 0)
  assert stats["rows"] == 30 and stats["tokens"] == 30 * 32
  assert sum(int((b["tokens"] == BOS).sum()) for b in batches) == stats["documents"]


def test_mixture_sampler_frequencies_within_one_percent():
  weights = [0.6, 0.3, 0.1]
  sampler = MixtureSampler(weights, seed=11)
  draws = sampler.choices(0, 100_000)
  freqs = np.bincount(draws, minlength=3) / draws.size
  np.testing.assert_allclose(freqs, weights, atol=0.01)
  np.testing.assert_allclose(freqs, weights, rtol=0.01)  # also within 1% of each weight
  for block in draws[:98304].reshape(-1, 4096):  # stratified: each block within one draw
    assert np.all(np.abs(np.bincount(block, minlength=3) - 4096 * np.array(weights)) < 1 + 1e-9)
  np.testing.assert_array_equal(draws[4090:4200], [sampler.choice(i) for i in range(4090, 4200)])
  np.testing.assert_array_equal(MixtureSampler(weights, seed=11).choices(0, 5000), draws[:5000])
  assert not np.array_equal(MixtureSampler(weights, seed=12).choices(0, 5000), draws[:5000])
  assert np.mean(draws[:-1] == draws[1:]) < 0.5  # shuffled, not in runs
  assert np.all(MixtureSampler([0.0, 1.0], seed=0).choices(0, 1000) == 1)


def test_mixture_pipeline_follows_the_sampler_and_restores():
  cfg = config(
    mixture=[
      {"source": {"kind": "fake", "name": "upper"}, "weight": 3.0, "name": "long"},
      {"source": {"kind": "fake", "name": "lower"}, "weight": 1.0, "name": "short"},
    ]
  )
  it = fake_iterator(cfg, batch_size=4, seed=2)
  batches = take(it, 30)
  rows = np.concatenate([b["tokens"] for b in batches])
  lower = np.any((rows >= ord("a")) & (rows <= ord("z")), axis=1)
  upper = np.any((rows >= ord("A")) & (rows <= ord("Z")), axis=1)
  assert not np.any(lower & upper), "each row comes from one source"
  np.testing.assert_array_equal(lower, MixtureSampler([3.0, 1.0], seed=2).choices(0, 120) == 1)
  stats = it.stats()
  assert stats["sources"]["short"]["rows"] == lower.sum()
  assert stats["sources"]["long"]["rows"] == 120 - lower.sum()
  assert stats["rows"] == 120
  state = json.loads(json.dumps(it.get_state()))
  want = take(it, 5)
  fresh = fake_iterator(cfg, batch_size=4, seed=2)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 5), want)


def test_decomposition_pipeline_batches_and_restore():
  cfg = config("long", seq_len=64, decomposition={"min_log2": 3, "cycles_per_pass": 2})
  it = fake_iterator(cfg, batch_size=2, seed=0)
  shapes = set()
  for batch in take(it, 12):
    rows, length = batch["tokens"].shape
    assert rows * length == 2 * 64 and length in (8, 16, 32, 64)
    shapes.add(length)
  assert len(shapes) > 1
  state = json.loads(json.dumps(it.get_state()))
  want = take(it, 6)
  fresh = fake_iterator(cfg, batch_size=2, seed=0)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 6), want)
  assert it.stats()["documents"] == len(CORPORA["long"])


def test_decomposition_processes_agree_on_bucket_sizes(monkeypatch):
  """With several processes every step must draw the same bucket everywhere, so the pipeline
  agrees the bucket sizes (an all-gather, faked here) before scheduling."""
  import lcjax.data.pipeline as pipeline

  cfg = config("long", seq_len=64, decomposition={"min_log2": 3})
  local = []
  monkeypatch.setattr(pipeline, "min_over_processes", lambda sizes: local.append(sizes) or sizes)
  for process in range(2):
    fake_iterator(cfg, batch_size=2, seed=0, process_index=process, process_count=2)
  assert len(local) == 2 and not np.array_equal(*local)
  monkeypatch.setattr(pipeline, "min_over_processes", lambda sizes: np.minimum(*local))
  shapes = [
    [b["tokens"].shape for b in take(fake_iterator(cfg, batch_size=2, seed=0, process_index=p,
                                                   process_count=2), 40)]
    for p in range(2)
  ]  # fmt: skip
  assert shapes[0] == shapes[1]
  cfg.num_workers = 1
  with pytest.raises(ConfigError, match="set data.num_workers=0"):
    fake_iterator(cfg, batch_size=2, seed=0, process_index=0, process_count=2)


@pytest.mark.parametrize(
  ("overrides", "match"),
  [
    ({"seq_length": 32}, "field 'seq_length' is unknown"),
    ({"position_scheme": "rope"}, "data.position_scheme='rope' is unknown"),
    ({"loss_weighting": "example"}, "data.loss_weighting='example' is unknown"),
    ({"seq_len": 1}, "data.seq_len must be an int >= 2"),
    ({"num_workers": -1}, "data.num_workers"),
    ({"shuffle": "yes"}, "data.shuffle"),
    ({"source": "stdlib"}, "data.source must be a dict"),
    ({"mixture": []}, "data.mixture must be None or a non-empty list"),
    ({"mixture": [{"source": {"kind": "fake"}, "weight": -1}]}, r"data.mixture\[0\].weight"),
    ({"mixture": [{"source": {"kind": "fake"}, "weight": 0}]}, "weights are all zero"),
    ({"mixture": [{"source": {"kind": "fake"}, "w": 1}]}, r"data.mixture\[0\] has unknown keys"),
    ({"decomposition": {"min_log": 3}}, "data.decomposition has unknown keys"),
    ({"decomposition": {"max_log2": 6}}, "longer than data.seq_len=32"),
    ({"decomposition": {"min_log2": 5, "max_log2": 4}}, "min_log2=5 exceeds max_log2=4"),
    ({"decomposition": {"tokens_per_batch": 40}}, "tokens_per_batch=40 must be a positive"),
    ({"decomposition": {"curriculum": "linear"}}, "curriculum='linear' is unknown"),
    ({"decomposition": {"curriculum": [3, 2, 1]}}, "must hold 6 positive odds"),
    ({"decomposition": {"curriculum": [5, 4, 3, 2, 1, -1]}}, "must hold 6 positive odds"),
    ({"decomposition": {"cycles_per_pass": 0}}, "cycles_per_pass must be an int >= 1"),
    ({"decomposition": {"long_split": "middle"}}, "long_split='middle' is unknown"),
    ({"decomposition": {"curriculum_steps": 10}}, "curriculum_steps was removed"),
    (
      {"decomposition": {}, "mixture": [{"source": {"kind": "fake"}, "weight": 1}]},
      "cannot be combined",
    ),
  ],
)
def test_bad_config_raises_naming_the_field(overrides, match):
  cfg = config().to_dict()
  cfg.update(overrides)
  with pytest.raises(ConfigError, match=match):
    fake_iterator(cfg, batch_size=2, seed=0)


def test_restore_with_other_settings_raises():
  state = fake_iterator(config(), batch_size=4, seed=0).get_state()
  other = fake_iterator(config(), batch_size=2, seed=0)
  with pytest.raises(ConfigError, match="different batch_size"):
    other.set_state(state)
  with pytest.raises(ConfigError, match="process_index=2 must be in"):
    fake_iterator(config(), batch_size=2, seed=0, process_index=2, process_count=2)
  with pytest.raises(ConfigError, match="fewer than the 40 processes"):
    fake_iterator(config(), batch_size=2, seed=0, process_count=40)


def test_eval_documents():
  docs = fake_eval_documents(config("dirty"), max_documents=4)
  assert len(docs) == 4
  for doc, raw in zip(docs, CORPORA["dirty"][2:6], strict=True):
    assert doc.dtype == np.int32 and doc[0] == BOS and doc[-1] == 258
    assert bytes(doc[1:-1].astype(np.uint8)) == raw
  raw = fake_eval_documents(config("dirty"), add_special_tokens=False)
  assert len(raw) == 10 and bytes(raw[0].astype(np.uint8)) == CORPORA["dirty"][2]


def test_default_config_on_the_real_stdlib_corpus():
  cfg = default_data_config()  # the real source and tokenizer registries
  cfg.seq_len = 128
  it = make_train_iterator(cfg, batch_size=2, seed=0)
  batch = next(it)
  assert batch["tokens"].shape == (2, 128) and batch["tokens"].max() < 384
  assert it.stats()["documents"] >= 1
  docs = make_eval_documents(cfg, max_documents=3)
  assert len(docs) == 3 and all(d[0] == BOS and d.size > 2 for d in docs)


def test_worker_processes_restore():
  cfg = default_data_config()  # workers receive the real (picklable) source and tokenizer
  cfg.seq_len, cfg.num_workers = 64, 2

  def take_copies(iterator, n):
    return [{k: np.array(v) for k, v in batch.items()} for batch in take(iterator, n)]

  it = make_train_iterator(cfg, batch_size=2, seed=0)
  take_copies(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  want = take_copies(it, 3)
  assert it.stats()["rows"] == 12
  it.close()
  fresh = make_train_iterator(cfg, batch_size=2, seed=0)
  fresh.set_state(state)
  got = take_copies(fresh, 3)
  fresh.close()
  assert_same_batches(got, want)
