"""The path layer (core/paths.py) on local files: whole-file writes from many threads, streamed writes
that appear only when complete, listings with sizes and versions, exact byte ranges. The same calls on
gs:// are exercised against the fake GCS server in test_object_store.py and test_prepare_cluster.py."""
import os
import threading

import pytest

from biomedlm_jax.core import paths
from biomedlm_jax.data import readers


def test_concurrent_writers_of_one_file_never_mix_and_leave_no_temporary(tmp_path):
    target = tmp_path / "cache.npz"
    payloads = [bytes([k]) * (1 << 20) for k in range(8)]
    errors = []

    def write(k):
        try:
            for _ in range(5):
                paths.write_bytes(str(target), payloads[k])
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert target.read_bytes() in payloads  # one writer's whole file, never a mix
    assert os.listdir(tmp_path) == ["cache.npz"]
    names = {paths.temporary_name(target) for _ in range(100)}
    names.add(paths.temporary_name(target))
    assert len(names) == 101


def test_a_streamed_write_appears_only_when_complete(tmp_path):
    target = tmp_path / "shard.npy"
    with paths.open_write(str(target)) as f:
        f.write(b"abc")
        assert not target.exists()  # still under a temporary name
        f.write(b"def")
    assert target.read_bytes() == b"abcdef"
    with pytest.raises(RuntimeError):
        with paths.open_write(str(tmp_path / "failed.npy")) as f:
            f.write(b"half")
            raise RuntimeError("the writer failed")
    assert sorted(os.listdir(tmp_path)) == ["shard.npy"]  # nothing of the failed write is left


def test_listings_give_sizes_and_versions_and_ranges_are_exact(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.jsonl").write_text('{"id": "1", "text": "t"}\n')
    (tmp_path / "a" / "b" / "y.xml").write_text("<article/>")
    (tmp_path / "a" / "LICENSE").write_text("not corpus")
    found = paths.glob_files(str(tmp_path / "a" / "**" / "*.*"))
    assert [(os.path.relpath(p, tmp_path), n) for p, n, _ in found] == [("a/b/y.xml", 10), ("a/x.jsonl", 25)]
    version = dict((p, v) for p, _, v in found)[str(tmp_path / "a" / "x.jsonl")]
    os.utime(tmp_path / "a" / "x.jsonl", ns=(1, 1))
    assert dict((p, v) for p, _, v in paths.glob_files(str(tmp_path / "a" / "x.jsonl")))[
        str(tmp_path / "a" / "x.jsonl")] != version  # a changed file is another version
    # a folder: the files whose format is recognised; the same file twice is listed once
    listed = readers.list_files([str(tmp_path / "a"), str(tmp_path / "a" / "x.jsonl")])
    assert [os.path.basename(p) for p, _, _ in listed] == ["y.xml", "x.jsonl"]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        readers.list_files(str(tmp_path / "nothing*.xml"))
    data = bytes(range(256))
    (tmp_path / "r.bin").write_bytes(data)
    f = str(tmp_path / "r.bin")
    assert paths.read_ranges([(f, 3, 7), (f, 250, 256), (f, 0, 1)]) == [data[3:7], data[250:], data[:1]]
