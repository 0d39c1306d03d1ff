"""Pretraining data: reading, packing, deterministic/resumable batches, per-process shards."""
import json

import numpy as np
import pytest
from conftest import REPO

from biomedlm_jax.core import errors
from biomedlm_jax.data import input_pipeline as ip
from biomedlm_jax.data import packing, readers, shards
from biomedlm_jax.data import tokenizer as tokenizer_lib

ABSTRACTS = REPO / "data" / "pubmed_abstracts" / "abstracts.jsonl"


@pytest.fixture(scope="module")
def gpt2_tok():
    return tokenizer_lib.load_tokenizer(str(REPO / "data" / "gpt2_tokenizer"))


def test_reads_shipped_abstracts_with_ids():
    docs = list(readers.read_documents(readers.expand_files(str(ABSTRACTS))))
    source = (REPO / "data" / "pubmed_abstracts" / "SOURCE.md").read_text()
    assert len(docs) == 1692 and "1,692 documents" in source
    assert all(doc_id.isdigit() for doc_id, _ in docs[:50])
    assert len({d for d, _ in docs}) == len(docs)


def test_bad_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(errors.DataError, match=r"bad.jsonl:2: not valid JSON"):
        list(readers.read_jsonl(str(p)))
    p.write_text('{"text": "ok"}\n\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(errors.DataError, match=r"bad.jsonl:3: expected an object with 'text'"):
        list(readers.read_jsonl(str(p)))
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        readers.expand_files(str(tmp_path / "nothing-here*.jsonl"))


def test_packing_keeps_every_token_and_separates_documents(gpt2_tok):
    docs = [(str(i), f"Document {i} about thrombocytopenia and TNF-α, β-blockers.") for i in range(40)]
    docs.insert(5, ("empty", "   "))
    packed = packing.pack_documents(docs, gpt2_tok, row_len=17)
    eos = gpt2_tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    stream = []
    for _, text in docs:
        if text.strip():
            stream += gpt2_tok.encode(text).ids + [eos]
    assert packed.num_documents == 40 and packed.num_empty == 1
    assert packed.rows.size + packed.dropped_tokens == len(stream)
    np.testing.assert_array_equal(packed.rows.reshape(-1), stream[: packed.rows.size])
    assert (packed.rows == eos).sum() == stream[: packed.rows.size].count(eos)
    assert packed.row_doc_ids[0] == "0"


def test_every_row_once_per_epoch_and_reshuffled():
    rows = np.arange(20 * 5).reshape(20, 5)
    it = ip.BatchIterator(rows, global_batch=4, seed=3)
    seen = [next(it)["inputs"][0, :, 0] // 5 for _ in range(10)]  # 40 rows = 2 epochs
    first, second = np.concatenate(seen[:5]), np.concatenate(seen[5:])
    assert sorted(first) == list(range(20)) and sorted(second) == list(range(20))
    assert not np.array_equal(first, second)
    assert next(it)["targets"].shape == (1, 4, 4)


def test_restored_iterator_continues_exactly_across_epochs():
    rows = np.arange(13 * 9).reshape(13, 9)  # 13 rows: batches of 4 straddle epoch boundaries
    a = ip.BatchIterator(rows, 4, seed=7, grad_accum=2)
    for _ in range(5):
        next(a)
    state = json.loads(json.dumps(a.state()))  # it goes through the checkpoint's JSON
    want = [next(a) for _ in range(6)]
    b = ip.BatchIterator(rows, 4, seed=7, grad_accum=2)
    b.restore(state)
    for w in want:
        got = next(b)
        np.testing.assert_array_equal(got["inputs"], w["inputs"])
        np.testing.assert_array_equal(got["targets"], w["targets"])
    with pytest.raises(errors.DataError, match="training data changed"):
        ip.BatchIterator(rows[:12], 4, seed=7).restore(state)


def test_process_shards_are_disjoint_and_cover_the_global_batch():
    rows = np.arange(32 * 3).reshape(32, 3)
    whole = ip.BatchIterator(rows, 8, seed=1, grad_accum=2)
    parts = [ip.BatchIterator(rows, 8, seed=1, grad_accum=2, local_rows=(0, 2)),
             ip.BatchIterator(rows, 8, seed=1, grad_accum=2, local_rows=(2, 4))]
    for _ in range(6):
        w = next(whole)["inputs"]
        p0, p1 = (next(p)["inputs"] for p in parts)
        np.testing.assert_array_equal(np.concatenate([p0, p1], axis=1), w)
        assert not set(p0[..., 0].ravel()) & set(p1[..., 0].ravel())


def test_eval_batches_pad_with_zero_weight():
    rows = np.arange(5 * 4).reshape(5, 4)
    batches = list(ip.eval_batches(rows, batch=2))
    assert len(batches) == 3
    assert batches[-1]["weights"].sum() == 3 and batches[0]["weights"].sum() == 6
    assert sum(b["weights"].sum() for b in batches) == rows[:, 1:].size


def test_hash_split_is_stable():
    ids = [str(i) for i in range(2000)]
    held = [i for i in ids if packing.in_eval_split(i, 0.05)]
    assert 60 < len(held) < 140
    assert held == [i for i in ids if packing.in_eval_split(i, 0.05)]


def test_tf_dataset_yields_the_same_batches_and_resumes_by_position():
    pytest.importorskip("tensorflow")
    rows = np.arange(11 * 6).reshape(11, 6).astype(np.uint16)
    it = ip.BatchIterator(rows, 4, seed=5, grad_accum=2)
    want = [next(it) for _ in range(6)]
    it.restore({"position": 0, "seed": 5, "num_rows": 11})
    got = [b for b in ip.tf_dataset(it, num_batches=6).as_numpy_iterator()]
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w["inputs"], g["inputs"])
        np.testing.assert_array_equal(w["targets"], g["targets"])
    it.restore({"position": 3 * 4, "seed": 5, "num_rows": 11})  # resume after 3 batches
    resumed = list(ip.tf_dataset(it, num_batches=3).as_numpy_iterator())
    np.testing.assert_array_equal(resumed[0]["inputs"], want[3]["inputs"])
    np.testing.assert_array_equal(resumed[2]["targets"], want[5]["targets"])


def test_range_reads_fetch_only_the_rows_asked_for_within_one_cache_bound(tmp_path):
    """How prepared shards on gs:// are read (ShardedRows by byte range), here on local files: the
    rows of np.load; a batch's bytes are its own rows only, one range per run of consecutive rows
    within a shard; one cache bound for all shards; shapes from the manifest's records (nothing opened
    before a read); a truncated shard names the file."""
    data = np.random.default_rng(0).integers(0, 50257, (300, 33)).astype(np.uint16)
    np.save(tmp_path / "a.npy", data[:120])
    np.save(tmp_path / "b.npy", data[120:])
    infos = [shards.ShardInfo(str(tmp_path / "a.npy"), 120, 33, "<u2", 128),
             shards.ShardInfo(str(tmp_path / "b.npy"), 180, 33, "<u2", 128)]
    shard = shards.ShardedRows(infos, cache_bytes=50 * 33 * 2, by_range=True)  # 50 rows in all
    assert shard.requests == 0 and shard.bytes_read == 0
    assert len(shard) == 300 and shard.shape == (300, 33) and shard.dtype == np.uint16
    idx = np.array([17, 3, 4, 5, 250, 4, 299, 0, 119, 120])
    np.testing.assert_array_equal(shard[idx], data[idx])
    assert shard.bytes_read == len(set(idx.tolist())) * 33 * 2  # duplicates read once
    # runs: 0, 3-5, 17, 119 | 120, 250, 299 (119 and 120 are in different shards)
    assert shard.requests == 7
    before = shard.bytes_read
    np.testing.assert_array_equal(shard[[4, 5, 250]], data[[4, 5, 250]])  # from the cache
    assert shard.bytes_read == before
    for start in range(0, 300, 40):  # read everything once: the cache evicts, never exceeds its bound
        np.testing.assert_array_equal(shard[np.arange(start, min(start + 40, 300))], data[start:start + 40])
        assert shard.cached_bytes <= 50 * 33 * 2
    with pytest.raises(IndexError):
        shard[[300]]
    # a manifest written before shard records had header_bytes: the header is read once, lazily
    old = shards.ShardedRows([shards.ShardInfo(i.path, i.rows, i.row_len, i.dtype) for i in infos], by_range=True)
    assert old.requests == 0
    np.testing.assert_array_equal(old[[5, 200, 201]], data[[5, 200, 201]])
    assert old.requests == 2 + 2  # one header read per shard touched, then a range per run of rows
    cut = tmp_path / "cut.npy"
    cut.write_bytes((tmp_path / "b.npy").read_bytes()[:-100])
    with pytest.raises(errors.DataError, match=r"cut\.npy: truncated"):
        shards.ShardedRows([str(cut)], by_range=True)[[179]]


def test_read_ahead_builds_the_next_batch_off_the_callers_thread_and_changes_nothing_else():
    import threading

    data = np.random.default_rng(1).integers(0, 1000, (97, 17)).astype(np.uint16)

    class Rows:  # rows that record which thread reads them
        shape, threads = data.shape, []

        def __len__(self):
            return len(data)

        def __getitem__(self, idx):
            self.threads.append(threading.current_thread().name)
            return data[idx]

    rows = Rows()
    plain = ip.BatchIterator(data, 8, seed=3, grad_accum=2, local_rows=(1, 3))
    ahead = ip.BatchIterator(rows, 8, seed=3, grad_accum=2, local_rows=(1, 3), read_ahead=True)
    for _ in range(20):  # crosses epochs
        a, b = next(plain), next(ahead)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert rows.threads[0] == threading.current_thread().name
    assert all(t.startswith("batch-read-ahead") for t in rows.threads[1:])
    state = plain.state()
    plain.restore(dict(state, position=40))
    ahead.restore(dict(state, position=40))  # the batch read ahead for position 160 is dropped
    for _ in range(3):
        a, b = next(plain), next(ahead)
        assert all(np.array_equal(a[k], b[k]) for k in a)
