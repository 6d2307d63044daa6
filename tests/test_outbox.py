"""The disk outbox: ordered, bounded, policy-driven, and crash-safe (torn tails)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.outbox import HEADER, Outbox

T = 1_700_000_000_000


def fill(ob: Outbox, seqs: range, size: int = 100) -> None:
    for s in seqs:
        assert ob.append(s, bytes([s % 256]) * size, windows=2, readings=20, now_ms=T + s)
    ob.sync()


def test_batches_stay_until_acknowledged_and_survive_a_restart(tmp_path: Path) -> None:
    ob = Outbox(tmp_path, segment_bytes=1_000)
    fill(ob, range(20))
    ob.ack([0, 1, 2, 5])
    ob.close()
    again = Outbox(tmp_path, segment_bytes=1_000)
    assert again.pending() == [3, 4, *range(6, 20)]
    assert again.read(7) == bytes([7]) * 100
    again.ack(list(range(20)))
    again.sync()
    assert again.depth == 0
    assert list(tmp_path.glob("*.seg")) == []  # every fully acknowledged segment is gone


def test_drop_oldest_sheds_and_counts(tmp_path: Path) -> None:
    ob = Outbox(tmp_path, max_bytes=1_000, policy="drop_oldest")
    fill(ob, range(15))
    assert ob.bytes <= 1_000
    assert ob.pending() == list(range(5, 15))
    assert (ob.shed_batches, ob.shed_windows, ob.shed_readings) == (5, 10, 100)


def test_refuse_newest_refuses_and_keeps_the_old(tmp_path: Path) -> None:
    ob = Outbox(tmp_path, max_bytes=1_000, policy="refuse_newest")
    accepted = [ob.append(s, b"x" * 100, windows=1, readings=1, now_ms=T) for s in range(15)]
    assert accepted == [True] * 10 + [False] * 5
    assert ob.refused == 5
    assert not ob.has_room(100)
    ob.ack([0])
    assert ob.has_room(100)


def test_batches_older_than_max_age_expire(tmp_path: Path) -> None:
    ob = Outbox(tmp_path, max_age_ms=1_000)
    fill(ob, range(5))
    ob.expire(T + 1_003)  # seqs 0-2 were appended more than a second ago
    assert ob.pending() == [3, 4]
    assert ob.expired_batches == 3


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(0, 2_000))
def test_a_torn_tail_is_truncated_never_half_read(tmp_path_factory, n: int, cut: int) -> None:
    d = tmp_path_factory.mktemp("ob")
    ob = Outbox(d)
    fill(ob, range(n), size=50)
    ob.close()
    seg = sorted(d.glob("*.seg"))[-1]
    size = seg.stat().st_size
    with seg.open("r+b") as fh:  # a crash mid-write: the file ends anywhere
        fh.truncate(max(0, size - cut))
    again = Outbox(d)
    rec = HEADER.size + 50
    left = max(0, size - cut)
    assert again.pending() == list(range(left // rec))
    for s in again.pending():
        assert again.read(s) == bytes([s % 256]) * 50
    assert again.torn_records == (1 if left % rec else 0)


def test_a_corrupted_record_loses_itself_not_the_records_after_it(tmp_path: Path) -> None:
    """A bad block in the middle of a segment (not a crash tail): the records after it are
    found again by their numbers and kept; the damaged batch is counted as shed, so the
    outbox's ledger still balances and says what was lost."""
    ob = Outbox(tmp_path)
    fill(ob, range(4), size=50)
    ob.close()
    seg = next(tmp_path.glob("*.seg"))
    data = bytearray(seg.read_bytes())
    data[(HEADER.size + 50) * 2 + HEADER.size + 10] ^= 0xFF  # a payload byte of record 2
    seg.write_bytes(bytes(data))
    again = Outbox(tmp_path)
    assert again.pending() == [0, 1, 3]
    assert again.read(3) == bytes([3]) * 50
    assert (again.corrupt_records, again.torn_records) == (1, 0)
    assert (again.shed_batches, again.shed_readings) == (1, 20)
    law(again)
    again.close()
    for _ in range(2):  # and it stays so across restarts, counted once
        later = Outbox(tmp_path)
        assert later.pending() == [0, 1, 3]
        assert later.shed_batches == 1
        law(later)
        later.close()


def test_a_damaged_header_in_the_middle_is_skipped_too(tmp_path: Path) -> None:
    ob = Outbox(tmp_path)
    fill(ob, range(5), size=50)
    ob.close()
    seg = next(tmp_path.glob("*.seg"))
    data = bytearray(seg.read_bytes())
    rec = HEADER.size + 50
    data[rec: rec + HEADER.size] = bytes(HEADER.size)  # record 1's header zeroed
    seg.write_bytes(bytes(data))
    again = Outbox(tmp_path)
    assert again.pending() == [0, 2, 3, 4]
    law(again)


def test_appends_are_fsynced_by_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    ob = Outbox(tmp_path)
    calls.clear()
    ob.append(1, b"abc", windows=1, readings=1, now_ms=T)
    assert calls == []
    ob.sync()
    assert len(calls) >= 1


def law(ob: Outbox) -> None:
    pending_w = sum(e.windows for e in ob.entries.values())
    pending_r = sum(e.readings for e in ob.entries.values())
    assert ob.stored_windows == ob.acked_windows + ob.shed_windows + pending_w
    assert ob.stored_readings == ob.acked_readings + ob.shed_readings + pending_r
    assert ob.stored_batches == ob.acked + ob.shed_batches + ob.depth


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "ack", "sync", "crash", "restart"]),
                          st.integers(0, 30)), min_size=1, max_size=80))
def test_counts_are_durable_across_crashes_and_compaction(
        tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]) -> None:
    """stored = acked + shed + pending holds at every step and after every crash (a reopen
    without close: what was not synced may be gone, the counts stay consistent with what is
    on disk) and every restart, through compactions and a small, shedding outbox."""
    import edge.outbox as outbox_mod

    d = tmp_path_factory.mktemp("ob")
    small = {"max_bytes": 3_000, "segment_bytes": 700}
    old = outbox_mod.COMPACT_BYTES
    outbox_mod.COMPACT_BYTES = 200  # compact often
    try:
        ob = Outbox(d, **small)
        seq = 0
        for op, k in ops:
            if op == "append":
                for _ in range(k % 5 + 1):
                    ob.append(seq, b"x" * 120, windows=3, readings=30 + seq % 7, now_ms=T)
                    seq += 1
            elif op == "ack" and ob.depth:
                ob.ack(ob.pending()[: k % 4 + 1])
            elif op == "sync":
                ob.sync()
            elif op == "crash":
                ob = Outbox(d, **small)  # the old one is simply abandoned
            else:
                ob.close()
                ob = Outbox(d, **small)
            law(ob)
        ob.close()
        law(Outbox(d, **small))
    finally:
        outbox_mod.COMPACT_BYTES = old


def test_counts_of_an_outbox_written_before_the_journal_carried_them(tmp_path: Path) -> None:
    """An acked.log of bare sequence numbers (the old format) still says which batches left."""
    ob = Outbox(tmp_path, segment_bytes=10_000)
    fill(ob, range(6))
    ob.close()
    (tmp_path / "acked.log").write_bytes(b"".join(s.to_bytes(8, "little") for s in (0, 1)))
    again = Outbox(tmp_path, segment_bytes=10_000)
    assert again.pending() == [2, 3, 4, 5]
    law(again)


def test_an_ack_must_name_the_digest_of_the_batch_it_confirms(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 12, item 11: only who received a batch can name its digest."""
    from devices.contract import batch_digest, decode_ack, encode_ack

    ob = Outbox(tmp_path, max_bytes=1_000, policy="drop_oldest")
    fill(ob, range(10))
    proof = {s: batch_digest(bytes([s % 256]) * 100) for s in range(20)}
    forged = decode_ack(encode_ack(list(range(10)), proofs=dict.fromkeys(range(10), "f" * 32)))
    assert ob.ack(forged.acked, forged.proofs) == 0
    assert ob.ack([0, 1], {}) == 0  # no proof at all
    assert ob.unproven_acks == 12
    assert ob.pending() == list(range(10))
    genuine = decode_ack(encode_ack([0, 1, 2], proofs={s: proof[s] for s in (0, 1, 2)}))
    assert ob.ack(genuine.acked, genuine.proofs) == 3
    # a batch shed while on the wire comes back as acknowledged only with its proof too
    fill(ob, range(10, 14))
    assert ob.shed_batches == 1  # seq 3 made room
    ob.ack([3], {3: "0" * 32})
    assert ob.recovered_batches == 0
    with caplog.at_level("WARNING"):
        ob.ack([3], {3: proof[3]})
    assert "seq=3, shed from the outbox, reached the cloud after all" in caplog.text
    assert ob.recovered_batches == 1
    assert ob.shed_batches == 0
    # the digest is rebuilt from disk after a restart
    ob.close()
    again = Outbox(tmp_path, max_bytes=1_000)
    assert again.ack([4, 5], {4: proof[4], 5: proof[6]}) == 1
    assert again.pending() == [5, *range(6, 14)]


def test_zeroed_blocks_in_a_segment_are_no_batches(tmp_path: Path) -> None:
    """An SD card that returns zeros for a segment's blocks: a header of zeros would be a
    record of no bytes whose CRC (of nothing) is 0; it is damage, and ends the segment."""
    ob = Outbox(tmp_path, segment_bytes=1_000_000)
    fill(ob, range(3))
    ob.close()
    seg = next(tmp_path.glob("*.seg"))
    seg.write_bytes(seg.read_bytes() + bytes(4 * HEADER.size))
    again = Outbox(tmp_path, segment_bytes=1_000_000)
    assert again.pending() == [0, 1, 2]
    assert again.read(0) == bytes(100)  # batch 0 is whole (bytes([0]) * 100)
    assert again.torn_records == 1
    law(again)


@pytest.mark.parametrize("damage", ["zeroed", "zeroed-aligned"])
def test_a_damaged_journal_loses_no_batch(tmp_path: Path, damage: str) -> None:
    """acked.log zeroed: read as the old format it would say batch 0 left (again and again),
    and batches waiting for the cloud would vanish. It is set aside instead and every batch on
    disk waits (the cloud acknowledges the ones it has at once)."""
    ob = Outbox(tmp_path, segment_bytes=1_000_000)
    fill(ob, range(6))
    ob.ack([1, 2])
    ob.close()
    journal = tmp_path / "acked.log"
    size = len(journal.read_bytes())
    journal.write_bytes(bytes(size - size % 8 if damage == "zeroed-aligned" else size))
    again = Outbox(tmp_path, segment_bytes=1_000_000)
    assert set(again.pending()) >= {0, 3, 4, 5}  # nothing unacknowledged is lost
    assert again.journal_unreadable
    assert len(list(tmp_path.glob("acked.log.unreadable-*"))) == 1


@pytest.mark.parametrize("where", ["payload", "header"])
def test_a_damaged_intake_log_record_loses_only_its_own_tick(tmp_path: Path, where: str) -> None:
    """The intake log's ticks were acknowledged to the broker once logged: a bad block in the
    middle of a segment must not take the ticks after it along (a crash's torn tail, at the
    end, is still cut off)."""
    from edge.wal import RECORD, IntakeLog

    wal = IntakeLog(tmp_path)
    for k in range(5):
        wal.append([(f"devices/d{k}/readings", b"x" * 40, T + k)])
    wal.sync()
    wal.close()
    seg = next(tmp_path.glob("*.wal"))
    data = bytearray(seg.read_bytes())
    size = len(data) // 5
    if where == "payload":
        data[2 * size + RECORD.size + 5] ^= 0xFF
    else:
        data[2 * size: 2 * size + RECORD.size] = bytes(RECORD.size)
    seg.write_bytes(bytes(data) + b"\x07" * 9)  # and a torn tail after the last record
    again = IntakeLog(tmp_path)
    assert [t for t, _, _ in again.replay(0)] == [1, 2, 4, 5]
    assert (again.corrupt, again.torn) == (1, 1)
    assert again.last_tick == 5


def test_the_intake_log_keeps_the_packet_id_of_each_message(tmp_path: Path) -> None:
    """A restarted agent tells the broker's re-deliveries of what it logged by their packet
    ids: the log keeps them (``qos << 16 | id``), and a record written before it did reads
    with none."""
    from edge.wal import MESSAGE, RECORD, IntakeLog

    wal = IntakeLog(tmp_path)
    wal.append([("devices/d1/readings", b"21.5", T), ("devices/d2/readings", b"", T + 1)],
               [1 << 16 | 7, 0])
    wal.append([("devices/d3/readings", b"x", T + 2)])  # no ids given: none kept
    wal.sync()
    wal.close()
    tb = b"devices/d4/readings"  # a record as the version before wrote it
    body = MESSAGE.pack(T + 3, len(tb), 2) + tb + b"22"
    with next(tmp_path.glob("*.wal")).open("ab") as fh:
        fh.write(RECORD.pack(3, len(body), zlib.crc32(body), 1) + body)
    again = IntakeLog(tmp_path)
    assert [(t, [m[1] for m in msgs], ids) for t, msgs, ids in again.replay(0)] == [
        (1, [b"21.5", b""], [1 << 16 | 7, 0]), (2, [b"x"], None), (3, [b"22"], None)]
    assert [t for t, _, _ in again.replay(2)] == [3]
