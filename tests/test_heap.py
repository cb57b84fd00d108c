"""The retained heap: glibc told to keep freed memory while a command or a heal loop runs, and
told back (memory returned) when the outermost one ends."""

from __future__ import annotations

import resource

import pytest
import torch

from autoprune import heap


class _Libc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_nested_heaps_set_glibc_once_and_restore_it_when_the_outermost_ends(monkeypatch) -> None:
    libc = _Libc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    with heap.retained_heap():
        assert libc.calls == [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]
        with heap.retained_heap():
            pass
        assert len(libc.calls) == 2  # the inner one leaves the outer's settings alone
    assert libc.calls[2:] == [("mallopt", -4, 65536), ("mallopt", -1, 128 * 1024), ("malloc_trim", 0)]


def test_elsewhere_than_glibc_nothing_is_called(monkeypatch) -> None:
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    with heap.retained_heap():
        pass


@pytest.mark.skipif(heap._glibc() is None, reason="glibc only")
def test_within_it_a_freed_large_block_comes_back_without_page_faults() -> None:
    """Outside, glibc unmaps a freed 64 MB block and the next one faults in every page; within,
    some of the next blocks reuse freed memory (glibc's alignment sometimes places a block past
    the freed one, so not every time)."""

    def faults_of_one_block() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(16 * 2**20)  # 64 MB, every page written
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    pages = 16 * 2**20 * 4 // resource.getpagesize()
    assert min(faults_of_one_block() for _ in range(4)) >= pages
    with heap.retained_heap():
        assert min(faults_of_one_block() for _ in range(6)) < pages // 10
