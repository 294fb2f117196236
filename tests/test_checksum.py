"""Integrity of what is stored: a flipped byte anywhere in a snapshot or a persisted block is refused with one
line naming the file (safetensors checks a file's structure, not its values)."""

import json

import pytest
import safetensors.torch
import torch
from test_engine import tiny_model

from ff_engine.checksum import KEY, tensors_digest
from ff_engine.engine import Engine, SessionConfig
from ff_engine.engine.snapshot import META_KEY, SessionSnapshot
from ff_engine.errors import SnapshotError
from ff_engine.serving import persist


@pytest.fixture(scope="module")
def snapshot_bytes():
    m = tiny_model(num_layers=1)
    e = Engine(m, num_pages=16, page_size=8, backend="torch")
    s = e.add_session(SessionConfig(prompt=torch.randn(2, m.cfg.text_dim), num_frames=9, seed=3))
    e.step([s.id])
    return e.snapshot(s.id).to_bytes()


def _flip(data: bytes, i: int) -> bytes:
    b = bytearray(data)
    b[i] ^= 0x01
    return bytes(b)


def test_every_single_byte_flip_of_a_snapshot_is_refused(snapshot_bytes):
    """Every byte position (header, meta and tensor data), one bit flipped: never loaded as if nothing happened."""
    assert SessionSnapshot.from_bytes(snapshot_bytes).meta["version"] == 3
    accepted = []
    for i in range(len(snapshot_bytes)):
        try:
            SessionSnapshot.from_bytes(_flip(snapshot_bytes, i))
        except SnapshotError:
            continue
        accepted.append(i)
    header_end = 8 + int.from_bytes(snapshot_bytes[:8], "little")
    # the header's trailing padding is spaces; a flipped space (0x20 -> 0x21 '!') after the JSON is still JSON
    # garbage, so nothing at all may be accepted
    assert accepted == [], f"{len(accepted)} flips accepted, e.g. {accepted[:5]} (header ends at {header_end})"


def test_a_corrupted_snapshot_file_is_one_line_naming_the_file(snapshot_bytes, tmp_path):
    path = tmp_path / "s.ffsnap"
    data = bytearray(snapshot_bytes)
    data[-5] ^= 0x40  # tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError) as err:
        SessionSnapshot.load(path)
    msg = str(err.value)
    assert str(path) in msg and "corrupted" in msg and "\n" not in msg


def test_a_version_2_snapshot_without_checksum_still_loads(snapshot_bytes):
    snap = SessionSnapshot.from_bytes(snapshot_bytes)
    meta = dict(snap.meta, version=2)
    old = safetensors.torch.save(snap.tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    assert SessionSnapshot.from_bytes(old).meta["version"] == 2
    v3_without = safetensors.torch.save(snap.tensors, metadata={META_KEY: json.dumps(snap.meta, sort_keys=True)})
    with pytest.raises(SnapshotError, match="no checksum"):
        SessionSnapshot.from_bytes(v3_without)


def test_a_flipped_byte_in_a_persisted_block_is_refused(tmp_path):
    lat = torch.randn(3, 4, 4, 6)
    path = persist.write_block(tmp_path, "sess-a", 0, lat)
    assert torch.equal(persist.read_block(tmp_path, "sess-a", 0), lat)
    data = path.read_bytes()
    for i in (len(data) - 1, len(data) - 200, 8 + int.from_bytes(data[:8], "little") + 3):
        path.write_bytes(_flip(data, i))
        with pytest.raises(persist.CorruptFile) as err:
            persist.read_block(tmp_path, "sess-a", 0)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    path.unlink()
    with pytest.raises(FileNotFoundError):
        persist.read_block(tmp_path, "sess-a", 0)


def test_digest_covers_name_dtype_shape_and_values():
    a = {"x": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    base = tensors_digest(a)
    assert tensors_digest({"y": a["x"]}) != base
    assert tensors_digest({"x": a["x"].reshape(3, 2)}) != base
    assert tensors_digest({"x": a["x"].double()}) != base
    assert tensors_digest(a, "meta") != base and KEY.startswith("ff_engine")
