"""The HDF5 model file: one file is one model (see docs/DESIGN.md, "Files"). This module gathers the public
names of the model-file modules in one import; each part lives in its own module:

- :mod:`~deepnet.formats.layout`: every HDF5 name;      :mod:`~deepnet.formats.validate`: opening and checking;
- :mod:`~deepnet.formats.model_file`: ``ModelFile``;   :mod:`~deepnet.formats.core_rows`: the core's rows;
- :mod:`~deepnet.formats.create`: new files, copies;   :mod:`~deepnet.formats.commit`, ``record``: commits;
- :mod:`~deepnet.formats.locking`: the one-writer lock; :mod:`~deepnet.formats.atomic`: atomic replacement;
- :mod:`~deepnet.formats.h5io`: HDF5 access properties, attributes and raw writes.

Layout (format "deepnet", format_version 1, kind "dense")::

    /                    attrs: format, format_version, kind, width, layers, activation, alpha,
                                input_dim, n_classes, step, seed, rng_state, created, updated, init_scale
    /core/weights        float32 (L, w*w + w), chunked along layers; row i = [W_i (in, out) row-major | b_i]
    /core/chunk_step     int64 (n_storage_chunks,): the step that last wrote each storage chunk
    /head/input/weight   float32 (input_dim, w)      /head/input/bias   float32 (w,)
    /head/output/weight  float32 (w, n_classes)      /head/output/bias  float32 (n_classes,)
    /train/log           compound (step i8, loss f8, batch_acc f8, seconds f8), resizable
    /train/commit        uint8 (2, COMMIT_SLOT_BYTES), contiguous: two slots of the commit record

The commit record (``/train/commit``) is what makes a step durable. It holds the committed step, the
minibatch generator's state, the training settings, a CRC-32 of the heads, how many rows of
/train/log belong to the committed history and the log rows not yet appended there. It is written as
raw data into a pre-allocated dataset (never HDF5 metadata), alternately into two slots, each slot
checksummed: a write cut short by a kill leaves the other slot, the previous commit, intact. Readers
take the valid slot with the highest sequence number; the root attributes ``step``/``rng_state``/
``updated`` mirror it at report boundaries (files without the dataset, written before it existed, are
read from those attributes and get it on their first commit).

A step is committed in this order: every storage chunk's ``chunk_step`` is set to the new step before
the chunk is modified, the heads are written, then the record. So a file is in one of three states:

- healthy: every ``chunk_step`` <= the record's step and the heads match its checksum;
- torn: some ``chunk_step`` = step + 1 (a step was being written when the writer died), or the heads
  differ from the record (it died between the heads and the record);
- damaged: anything else (see :mod:`deepnet.tools.check`).

What survives what. Against the death of the writing process (SIGKILL, the OOM killer, a crash, a
second Ctrl-C) every write already made is in the OS page cache and reaches the disk, so the file is
always a committed step or a torn step that ``deepnet check`` describes. Against power loss or an OS
crash only what was fsync'd is safe: an in-memory checkpoint (the new file and its directory are
fsync'd before and after the rename), and in streamed mode the file at every checkpoint and at the end of
a run (``--checkpoint-every``; the memory-mapped core is written back by the same fsync); between those
the OS writes dirty pages back in an order of its choosing. An fsync after every step would make that
per-step too, at a cost that is a large fraction of a step (bench/README.md, "deepnet.formats"), so it
is not done.

Choices worth knowing about:

- Creation writes a temporary file next to the target and renames it into place after an fsync
  (:func:`~deepnet.formats.atomic.atomic_path`), so an interrupted ``init`` never leaves a file that
  looks complete.
- The per-step write path (``write_layers``) only writes raw data into datasets whose every chunk was
  written at creation, so it never changes HDF5 metadata: a process killed mid-step leaves a file
  that still opens, and ``chunk_step`` says which storage chunks the interrupted step had reached.
  ``chunk_step`` is marked *before* the rows are written, so a torn chunk is never mistaken for an
  untouched one.
- Attributes rewritten during training (``updated``, ``rng_state``) are stored as fixed-length ASCII
  strings: rewriting a variable-length string attribute leaks its old value in the file's global heap
  (about 50 bytes per rewrite, forever), which over millions of steps would grow the file.
- Raw chunk I/O bypasses HDF5's chunk cache (``rdcc_nbytes=0``): chunks are read and written whole
  and sequentially, the OS page cache already holds recent ones, and the cache would only add a copy.
- HDF5's data sieve buffer is off too (``sieve_buf_size=0``): with it, a small raw write (a
  ``chunk_step`` mark) could sit in HDF5's buffer while a later, larger one (the rows it guards) went
  straight to the file, reversing the order a kill must see; and the memory-mapped writers would have
  h5py read stale copies. Raw writes to contiguous datasets (heads, commit record, ``chunk_step``) go
  to the file with one ``pwrite`` each.
- One writer: HDF5 locks the file (flock) while it is open, exclusively for writing; a second writer or
  a reader during training is refused with a one-line message. Where HDF5's locking is switched off
  (``HDF5_USE_FILE_LOCKING=FALSE``, as on some network file systems) deepnet takes the same flock itself.
"""

from deepnet.formats.atomic import fsync_dir, remove_stale_temporaries, stale_temporaries
from deepnet.formats.commit import COMMIT_SLOT_BYTES, COMMIT_SLOTS, FileState
from deepnet.formats.create import STORAGE_CHUNK_BYTES, default_alpha, default_storage_chunk_layers
from deepnet.formats.h5io import WRITE_BLOCK_BYTES
from deepnet.formats.layout import FORMAT, FORMAT_VERSION, HEAD_KEYS, LOG_CHUNK_ROWS, LOG_DTYPE
from deepnet.formats.layout import KIND_DENSE as KIND
from deepnet.formats.model_file import ModelFile
from deepnet.formats.record import LOG_PENDING_MAX

__all__ = [
    "COMMIT_SLOTS", "COMMIT_SLOT_BYTES", "FORMAT", "FORMAT_VERSION", "FileState", "HEAD_KEYS", "KIND",
    "LOG_CHUNK_ROWS", "LOG_DTYPE", "LOG_PENDING_MAX", "ModelFile", "STORAGE_CHUNK_BYTES", "WRITE_BLOCK_BYTES",
    "default_alpha", "default_storage_chunk_layers", "fsync_dir", "remove_stale_temporaries", "stale_temporaries",
]
