"""Corpus, token cache and block ownership: every training token belongs to exactly one rank."""

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpilm import data
from mpilm.errors import UsageError


@pytest.mark.parametrize("n_train", [1, 7, 1000, 1001, 99991])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_blocks_partition_the_training_tokens(n_train, world_size):
    owned = np.zeros(n_train, dtype=int)
    previous_stop = 0
    for r in range(world_size):
        lo, hi = data.block_range(n_train, world_size, r)
        assert lo == previous_stop, "blocks are contiguous and in rank order"
        owned[lo:hi] += 1
        previous_stop = hi
    assert previous_stop == n_train and (owned == 1).all()


def test_cache_is_built_once_and_reused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes("héllo wörld\n".encode() * 50)
    (corpus / "b.bin").write_bytes(bytes([0xFF, 0xFE, 0x00]) * 10)  # undecodable bytes are kept
    path, header, built = data.build_cache(str(corpus), str(tmp_path / "cache"))
    assert built and header["vocab"] == 256
    assert header["n_tokens"] == (corpus / "a.txt").stat().st_size + 30
    tokens = np.fromfile(path, np.uint8, offset=header["header_bytes"])
    assert tokens.tobytes() == (corpus / "a.txt").read_bytes() + (corpus / "b.bin").read_bytes()
    _, _, built_again = data.build_cache(str(corpus), str(tmp_path / "cache"))
    assert not built_again
    (corpus / "c.txt").write_text("new file changes the key\n")
    path2, _, built3 = data.build_cache(str(corpus), str(tmp_path / "cache"))
    assert built3 and path2 != path


def test_truncated_cache_is_rebuilt(tmp_path):
    (tmp_path / "t.txt").write_text("x" * 1000)
    path, _, _ = data.build_cache(str(tmp_path / "t.txt"), str(tmp_path / "cache"))
    path.write_bytes(path.read_bytes()[:100])  # a torn file under the right name
    with pytest.raises(ValueError):
        data.read_header(path)
    _, header, built = data.build_cache(str(tmp_path / "t.txt"), str(tmp_path / "cache"))
    assert built and header["n_tokens"] == 1000


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(UsageError, match="no such file or directory"):
        data.build_cache(str(tmp_path / "nope"), str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no files"):
        data.build_cache(str(tmp_path / "empty"), str(tmp_path))
    (tmp_path / "zero.txt").write_bytes(b"")
    with pytest.raises(UsageError, match="no bytes"):
        data.build_cache(str(tmp_path / "zero.txt"), str(tmp_path / "c"))


def test_default_corpus_is_the_stdlib():
    files = data.corpus_files(None)
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_sampler_is_recomputable_and_rank_dependent():
    block = torch.arange(10_000) % 251
    a = data.sample_batch(block, 4, 16, seed=1, rank=0, step=5)
    b = data.sample_batch(block, 4, 16, seed=1, rank=0, step=5)
    c = data.sample_batch(block, 4, 16, seed=1, rank=1, step=5)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[0][:, 1:], a[1][:, :-1]), "targets are the inputs shifted by one"


@pytest.mark.mpi(min_size=2)
def test_scatter_and_mpiio_give_identical_blocks(tmp_path_factory):
    comm = MPI.COMM_WORLD
    root = comm.bcast(str(tmp_path_factory.mktemp("corpus")) if comm.rank == 0 else None)
    if comm.rank == 0:
        rng = np.random.default_rng(0)
        (__import__("pathlib").Path(root) / "c.bin").write_bytes(rng.integers(0, 256, 50_003, dtype=np.uint8).tobytes())
    comm.Barrier()
    a = data.load(comm, root, root + "/cache", 0.01, 8, "scatter")
    b = data.load(comm, root, root + "/cache", 0.01, 8, "mpiio")
    assert torch.equal(a.block, b.block) and torch.equal(a.val, b.val)
    lo, hi = data.block_range(a.n_train, comm.size, comm.rank)
    everything = np.fromfile(root + "/c.bin", np.uint8)
    assert torch.equal(a.block, torch.from_numpy(everything[lo:hi]))
    assert torch.equal(a.val, torch.from_numpy(everything[a.n_train:]))
    assert comm.allreduce(a.block.numel()) == a.n_train


@pytest.mark.mpi(min_size=2)
def test_corpus_too_small_is_a_usage_error_on_every_rank(tmp_path_factory):
    comm = MPI.COMM_WORLD
    root = comm.bcast(str(tmp_path_factory.mktemp("tiny")) if comm.rank == 0 else None)
    if comm.rank == 0:
        (__import__("pathlib").Path(root) / "t.txt").write_text("too small")
    comm.Barrier()
    with pytest.raises(UsageError, match="corpus too small"):
        data.load(comm, root, root + "/cache", 0.01, 64, "scatter")
