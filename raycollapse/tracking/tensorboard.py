"""TensorBoard event files of a run: ``<run>/tensorboard/``, one file per iteration.

Each finished iteration t gets ``events.out.tfevents.<t, 6 digits>.raycollapse``, written whole
and atomically (temporary name, then a move): every number of its metrics row as a scalar at
step t (float64 tensors of TensorBoard's scalars plugin, so the values are exactly those of
``metrics.json``), and ``samples.png`` as the image ``samples``. An iteration whose file exists
is never written again, so a resumed run neither duplicates nor loses a point, and enabling
TensorBoard on an existing run fills in its earlier iterations. File names sort by iteration,
the order in which TensorBoard reads the files of a folder.
"""

from __future__ import annotations

import io
import struct
import time
from typing import Any

from raycollapse.io import storage

TB_DIR = "tensorboard"
IMAGE_TAG = "samples"
_SUFFIX = "raycollapse"
_COLORSPACE = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def event_file(run: str, iteration: int) -> str:
    """The event file of one iteration of the run folder ``run``."""
    return storage.join(run, TB_DIR, f"events.out.tfevents.{iteration:06d}.{_SUFFIX}")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The values logged for a metrics row: every int or float except ``iteration`` (null and
    text are not numbers; NaN stays NaN)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "iteration" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _record(data: bytes) -> bytes:
    # TFRecord framing: length, masked CRC-32C of the length, data, masked CRC-32C of the data.
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def _image(png: bytes) -> Any:
    from PIL import Image
    from tensorboardX.proto.summary_pb2 import Summary

    with Image.open(io.BytesIO(png)) as img:
        width, height, mode = img.width, img.height, img.mode
    return Summary.Image(
        height=height, width=width, colorspace=_COLORSPACE.get(mode, 3), encoded_image_string=png
    )


def event_bytes(row: dict[str, Any], png: bytes | None, wall_time: float) -> bytes:
    """The whole event file of one iteration: the version event, then one event at step
    ``row["iteration"]`` with the scalars of :func:`scalars` and the sample grid ``png``."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboardX.proto.tensor_pb2 import TensorProto
    from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto

    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"))
    values = [
        Summary.Value(
            tag=tag,
            metadata=meta,
            tensor=TensorProto(dtype="DT_DOUBLE", double_val=[v], tensor_shape=TensorShapeProto()),
        )
        for tag, v in sorted(scalars(row).items())
    ]
    if png is not None:
        values.append(Summary.Value(tag=IMAGE_TAG, image=_image(png)))
    step = int(row["iteration"])
    head = Event(wall_time=wall_time, step=step, file_version="brain.Event:2")
    body = Event(wall_time=wall_time, step=step, summary=Summary(value=values))
    return _record(head.SerializeToString()) + _record(body.SerializeToString())


def log_iteration(run: str, row: dict[str, Any], png: bytes | None) -> bool:
    """Write the event file of ``row``'s iteration unless it exists; whether it was written."""
    uri = event_file(run, int(row["iteration"]))
    if storage.exists(uri):
        return False
    storage.write_bytes_atomic(uri, event_bytes(row, png, time.time()))
    return True
