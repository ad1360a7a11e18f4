import itertools

from easyquant.algorithm.chunking import row_slices, rows_per_chunk


def test_row_slices_cover_the_rows_and_leave_no_lone_last_row():
    for num_rows in range(1, 40):
        for chunk in range(1, 12):
            slices = row_slices(num_rows, chunk)
            assert slices[0].start == 0 and slices[-1].stop == num_rows
            assert all(a.stop == b.start for a, b in itertools.pairwise(slices))
            assert all(s.stop - s.start >= 1 for s in slices)
            assert all(s.stop - s.start == chunk for s in slices[:-1])
            if len(slices) > 1:
                assert slices[-1].stop - slices[-1].start >= 2


def test_rows_per_chunk_is_a_multiple_of_the_alignment():
    assert rows_per_chunk(1024, elements=1 << 20) == 1024
    assert rows_per_chunk(1000, align=3, elements=10_000) == 9
    assert rows_per_chunk(1 << 20, align=4, elements=1 << 10) == 4
