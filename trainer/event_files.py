"""TensorBoard event files for scalar metrics, written without TensorFlow or the tensorboard package.

An event file is a TFRecord file of ``Event`` protocol buffers (tensorflow/core/util/event.proto):
the first event holds ``file_version: "brain.Event:2"``, each later one a wall time, a step and a
``Summary`` of ``(tag, simple_value)`` pairs. A TFRecord is ``uint64 length, uint32 masked
CRC-32C(length), data, uint32 masked CRC-32C(data)``, little-endian
(tensorflow/core/lib/io/record_writer.cc). Only the few protobuf fields used here are encoded,
by hand, so the trainer image needs no extra dependency; ``tensorboard --logdir`` reads the files
(tests/trainer/test_event_files.py reads them back with tensorboard's own loader).
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tf_record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def scalar_event(*, wall_time: float, step: int, scalars: dict[str, float]) -> bytes:
    """One serialised ``Event`` with a ``Summary`` holding each (tag, simple_value); step must be >= 0."""
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
        for tag, value in scalars.items())
    return (b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
            + _length_delimited(5, values))


def version_event(*, wall_time: float) -> bytes:
    return b"\x09" + struct.pack("<d", wall_time) + _length_delimited(3, b"brain.Event:2")


class EventFileWriter:
    """Appends scalar events to ``directory/events.out.tfevents.<time>.<host>`` (one file per process start)."""

    def __init__(self, directory: str | Path, *, clock=time.time):
        self._clock = clock
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        now = clock()
        self.path = directory / f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        self._file = open(self.path, "ab")
        self._file.write(tf_record(version_event(wall_time=now)))
        self._file.flush()

    def add_scalars(self, step: int, scalars: dict[str, float], *, wall_time: float | None = None) -> None:
        if not scalars:
            return
        event = scalar_event(wall_time=self._clock() if wall_time is None else wall_time, step=max(step, 0),
                             scalars=scalars)
        self._file.write(tf_record(event))
        self._file.flush()  # TensorBoard reads while the stage runs

    def close(self) -> None:
        self._file.close()
