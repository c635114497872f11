"""Sharding work over processes and seeding random streams: the same results for any number of processes."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_ddpm import distributed
from hf_ddpm.distributed import Stream, run_sharded, seeded_generator, seeded_generators, shard


def fake_accelerator(rank: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(process_index=rank, num_processes=world, is_main_process=rank == 0,
                           is_local_main_process=rank % 2 == 0)  # fmt: skip


def test_without_an_accelerator_there_is_one_main_process():
    assert (distributed.rank(None), distributed.world_size(None)) == (0, 1)
    assert distributed.is_main(None) and distributed.is_main(None, local=True)
    third = fake_accelerator(3, 4)
    assert (distributed.rank(third), distributed.world_size(third)) == (3, 4)
    assert not distributed.is_main(third) and not distributed.is_main(third, local=True)
    assert distributed.is_main(fake_accelerator(2, 4), local=True)


@pytest.mark.parametrize("num_items", [1, 3, 7, 8, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_are_contiguous_blocks_that_cover_every_item_once_in_order(num_items, world):
    shares = [shard(num_items, fake_accelerator(rank, world)) for rank in range(world)]
    assert [i for share in shares for i in share] == list(range(num_items))
    assert max(len(share) for share in shares) == -(-num_items // world)


def test_gathered_outputs_come_back_in_item_order(monkeypatch):
    """Each rank's output, as `gather_object` would deliver them all, concatenated in item order."""
    world, num_items = 3, 7

    def outputs(share: range) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor(list(share)) * 10, "pairs": torch.tensor([[i, i] for i in share])}

    all_parts = [outputs(shard(num_items, fake_accelerator(rank, world))) for rank in range(world)]
    monkeypatch.setattr(distributed, "gather_object", lambda local: all_parts)
    gathered = run_sharded(outputs, num_items, fake_accelerator(1, world))
    assert torch.equal(gathered["x"], torch.arange(7) * 10) and gathered["pairs"].shape == (7, 2)
    single = run_sharded(lambda share: torch.tensor(list(share)) ** 2, num_items)
    assert torch.equal(single, torch.arange(7) ** 2)


def test_a_process_with_no_items_does_not_run_the_function(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "gather_object", lambda local: [torch.zeros(1, 2), None, *local])
    assert run_sharded(calls.append, 2, fake_accelerator(3, 4)).shape == (1, 2)  # ranks 2 and 3 hold nothing
    assert calls == []


def test_image_seeds_are_the_plain_numpy_seed_sequence_of_seed_and_index():
    """What the model card's plain-diffusers snippet computes, so its images are generate()'s."""
    for seed, i in [(0, 0), (3, 5), (7, 1_000_003)]:
        expected = int(np.random.SeedSequence((seed, i)).generate_state(1, np.uint64)[0])
        assert seeded_generator(Stream.IMAGES, seed, i).initial_seed() == expected


@pytest.mark.parametrize("stream", list(Stream))
def test_seeded_generators_hash_many_keys_at_once_as_numpys_seed_sequence_does(stream):
    """The vectorised hash equals numpy's SeedSequence for keys of 1 to 6 words (the pool holds 4), with and
    without a spawn key, at the ends of the uint32 range; larger integers go through numpy itself."""
    indices = [*range(200), 65_535, 2**31, 2**32 - 1]
    for seed in (0, 1, 2**32 - 1):
        for prefix in ((), (7,), (3, 2), (1, 0, 3), (5, 6, 7, 8)):
            spawn_key = (int(stream),) if stream else ()
            sequences = [np.random.SeedSequence((seed, *prefix, i), spawn_key=spawn_key) for i in indices]
            expected = [int(sequence.generate_state(1, np.uint64)[0]) for sequence in sequences]
            made = seeded_generators(stream, seed, indices, prefix=prefix)
            assert [g.initial_seed() for g in made] == expected, (seed, prefix)
    big = [2**32, 2**70]
    assert [g.initial_seed() for g in seeded_generators(stream, 2**40, big)] == [
        seeded_generator(stream, 2**40, i).initial_seed() for i in big
    ]
    assert seeded_generators(stream, 0, []) == []
    with pytest.raises(ValueError):
        seeded_generators(stream, 0, [-1])


def test_streams_and_keys_never_share_a_seed():
    """SeedSequence pads short keys with zeros, so without streams micro-step m on rank 0, (seed, m, 0), would
    draw image m's noise, (seed, m)."""
    keys = [(Stream.IMAGES, i) for i in range(4)] + [(Stream.EPOCH_ORDER, e) for e in range(4)]
    keys += [(Stream.MICRO_BATCHES, m, r) for m in range(4) for r in range(2)]
    assert len({seeded_generator(stream, 0, *key).initial_seed() for stream, *key in keys}) == len(keys)


@pytest.fixture
def store(monkeypatch):
    """A real TCPStore (server and client in this process) as the process group's store."""
    server = torch.distributed.TCPStore("127.0.0.1", 0, 2, True, timedelta(seconds=5), wait_for_workers=False)
    client = torch.distributed.TCPStore("127.0.0.1", server.port, 2, False, timedelta(seconds=5))
    monkeypatch.setattr(distributed, "_store", lambda: torch.distributed.PrefixStore("default_pg", client))
    return SimpleNamespace(server=server, client=client)


def test_a_reported_failure_is_read_by_the_other_processes_not_by_itself(store):
    distributed.report_failure(fake_accelerator(1, 3), "cannot decode image 7")
    assert distributed.reported_failures(fake_accelerator(0, 3), grace_s=0.2) == {1: "cannot decode image 7"}
    assert distributed.reported_failures(fake_accelerator(2, 3), grace_s=0.2) == {1: "cannot decode image 7"}
    began = time.monotonic()
    assert distributed.reported_failures(fake_accelerator(1, 3), grace_s=0.2) == {}  # its own is no news
    assert 0.2 <= time.monotonic() - began < 2


def test_a_failure_reported_during_the_grace_is_still_read(store):
    later = threading.Timer(0.3, distributed.report_failure, (fake_accelerator(1, 2), "KeyError: 'x'"))
    later.start()
    assert distributed.reported_failures(fake_accelerator(0, 2), grace_s=5) == {1: "KeyError: 'x'"}
    later.join()


def test_with_the_store_gone_failures_are_neither_reported_nor_read_and_nothing_is_printed(store, capfd):
    del store.server  # the process that hosted it exited
    time.sleep(0.2)
    began = time.monotonic()
    distributed.report_failure(fake_accelerator(1, 2), "cannot decode image 7")
    assert distributed.reported_failures(fake_accelerator(0, 2)) == {}
    assert time.monotonic() - began < 3
    assert capfd.readouterr().err == ""  # torch's C++ stack traces of the failed requests are hidden


def test_without_a_process_group_failures_are_neither_reported_nor_read():
    assert distributed._store() is None
    distributed.report_failure(fake_accelerator(1, 2), "cannot decode image 7")
    assert distributed.reported_failures(fake_accelerator(0, 2), grace_s=0) == {}
