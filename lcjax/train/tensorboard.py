"""TensorBoard event files of scalars, written directly: no tensorboardX, no TensorFlow.

tensorboardX imports torch whenever torch is installed (2 s at every start of a training
process that has torch beside it, e.g. the test environment), and a run only writes
scalars, so lcjax writes the file format itself:

* a file `events.out.tfevents.<time>.<host>.<pid>.<n>` of TFRecords: each record is the
  uint64 length, its masked CRC-32C, the bytes, and their masked CRC-32C (TensorFlow's
  `tensorflow/core/lib/io/record_writer.cc`; mask: rotate right by 15, add 0xa282ead8);
* each record one `Event` protocol buffer (`tensorflow/core/util/event.proto`): the first
  holds `file_version = "brain.Event:2"`; scalars are `Event{wall_time, step,
  summary: Summary{value: [Value{tag, simple_value}]}}`;
* a resumed run first writes `Event{step, session_log: SessionLog{status: START}}`,
  which makes TensorBoard drop the earlier file's events at and after that step (what
  tensorboardX's `purge_step` does), so a step appears once after a resume.

The protocol buffers are encoded by hand (varints, fixed64 doubles, fixed32 floats,
length-delimited fields); tests/test_train_units.py decodes them with tensorboardX's
generated `event_pb2` as the oracle.
"""

from __future__ import annotations

import os
import socket
import struct
import time

__all__ = ["EventWriter", "crc32c", "encode_scalars_event"]

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected
_CRC32C_TABLE = []
for _byte in range(256):
  _crc = _byte
  for _ in range(8):
    _crc = (_crc >> 1) ^ (_CRC32C_POLY if _crc & 1 else 0)
  _CRC32C_TABLE.append(_crc)


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`, as TFRecord framing uses (crc32c("123456789") = 0xe3069283)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
  """A length-delimited field (wire type 2)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, body: bytes) -> bytes:
  """Event{wall_time = 1 (double), step = 2 (int64)} followed by its `what` field."""
  return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + body


def encode_scalars_event(step: int, scalars: dict[str, float], wall_time: float) -> bytes:
  """Event{step, summary: Summary{value: [Value{tag = 1, simple_value = 2 (float)}, ...]}}."""
  values = b"".join(
    _field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
    for tag, value in scalars.items()
  )
  return _event(wall_time, step, _field_bytes(5, values))


class EventWriter:
  """Appends scalar events to a new event file in `directory` (one file per writer)."""

  def __init__(self, directory: str, *, purge_step: int | None = None):
    os.makedirs(directory, exist_ok=True)
    # TensorBoard reads a run's files in name order: the creation time first, then a
    # counter for writers opened in the same second by the same process.
    stem = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    n = 0
    while os.path.exists(os.path.join(directory, f"{stem}.{n}")):
      n += 1
    self.path = os.path.join(directory, f"{stem}.{n}")
    self._file = open(self.path, "xb")  # noqa: SIM115 - closed in close()
    self._write(_event(time.time(), 0, _field_bytes(3, b"brain.Event:2")))
    if purge_step is not None:  # SessionLog{status = 1 (START)}: TensorBoard purges >= step
      self._write(_event(time.time(), purge_step, _field_bytes(7, b"\x08\x01")))
    self._file.flush()

  def _write(self, record: bytes) -> None:
    length = struct.pack("<Q", len(record))
    header = length + struct.pack("<I", _masked_crc(length))
    self._file.write(header + record + struct.pack("<I", _masked_crc(record)))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """One event holding every scalar of this step."""
    if values:
      self._write(encode_scalars_event(step, values, time.time()))
      self._file.flush()

  def close(self) -> None:
    self._file.close()
