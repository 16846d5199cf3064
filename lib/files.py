"""Files written whole or not at all: a temp file renamed into place (a reader never sees half a
file, a failed write leaves the previous one), and arrays of any size streamed in batches into
.npy and ADM's .npz.
The one atomic write of the project: run folders (lib/runs.py), parts, samples and pictures use
it. Imports no torch."""
import contextlib
import os
import zipfile

import numpy as np


@contextlib.contextmanager
def atomic_file(path):
    """A binary file written as PATH.tmp and renamed into place when the block ends without error,
    removed when it fails: a reader never sees half a file, and a failed write leaves the previous
    file as it was. One writer per path (where processes could meet, the callers hold a lock); the
    PATH.tmp a killed writer leaves is replaced by the next write. An OSError (a full disk, a
    read-only folder) is one ValueError."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        kept = f"; the previous {os.path.basename(path)} is intact" if os.path.exists(path) else ""
        raise ValueError(f"could not write {path} ({e.strerror or e}){kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path, write):
    """write(file) into atomic_file(path)."""
    with atomic_file(path) as f:
        write(f)


class RowWriter:
    """An array of `count` rows written batch by batch in .npy format (the header from the first
    batch's row shape and dtype, then each batch's bytes): never held whole in memory."""

    def __init__(self, file, count):
        self.file = file
        self.count = count
        self.written = 0

    def write(self, rows):
        if self.written == 0:
            header = {"descr": np.lib.format.dtype_to_descr(rows.dtype), "fortran_order": False,
                      "shape": (self.count, *rows.shape[1:])}
            np.lib.format.write_array_header_1_0(self.file, header)
        self.file.write(np.ascontiguousarray(rows).tobytes())
        self.written += len(rows)

    def check_complete(self):
        if self.written != self.count:
            raise ValueError(f"{self.written} rows written of the {self.count} announced")


@contextlib.contextmanager
def npy_writer(path, count):
    """Yields write(rows): a .npy of `count` rows written batch by batch, atomically."""
    with atomic_file(path) as f:
        rows = RowWriter(f, count)
        yield rows.write
        rows.check_complete()


@contextlib.contextmanager
def npz_writer(path, count):
    """Yields add(images, labels): ADM's sample layout (arr_0 (count, H, W, 3) uint8, labels)
    written batch by batch, atomically. arr_0 streams into an uncompressed zip64 member, as
    np.savez writes it: 50,000 images at 256 px (9.8 GB) are never held in memory."""
    labels = []
    with atomic_file(path) as f, zipfile.ZipFile(f, "w", allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            images = RowWriter(member, count)
            yield lambda batch_images, batch_labels: (images.write(batch_images),
                                                      labels.append(batch_labels))
            images.check_complete()
        with archive.open("labels.npy", "w") as member:
            np.lib.format.write_array(member, np.concatenate(labels))
