"""The artifact layer: every stage reads and writes its artifacts through here, on a local disk or in object storage.

Every ``--input``, ``--out``, ``--data``, ``--tree``, ``--checkpoint`` and ``--embeddings`` may be a local
path or a pyarrow.fs URI (``s3://``, ``gs://``, ``hdfs://``, ``file://``); both go through ``pyarrow.fs``
(a ``LocalFileSystem`` for a path), resolved by one function. Stages compute on local files; this layer
moves whole artifacts:

    path = local_copy("s3://bucket/run/tree")            # a verified node-local copy (a path: itself)
    with atomic_dir("s3://bucket/run/tree", "tree") as tmp:   # a local dir to write in, published on success
        np.save(tmp / "codes.npy", codes)
        write_manifest(tmp, {"artifact": "tree", "schema_version": 1})   # checksums every file, last
    manifest = read_manifest("runs/b/tree", "tree", 1)    # kind and schema checked
    verify_files("runs/b/tree", manifest)                 # every listed file present, inside, unchanged
    with writer_lock("runs/b", inside=True): ...          # one writer per local output; a URI has none

One module per idea:

* :mod:`~seater_dist.artifacts.fs`: where artifacts live (the only place that tells a URI from a path),
  whole-file reads and writes;
* :mod:`~seater_dist.artifacts.manifest`: ``manifest.json`` and the one verification on read;
* :mod:`~seater_dist.artifacts.lock`: the single-writer lock of a local output and the disk probes
  (object storage has no lock: run one writer per prefix);
* :mod:`~seater_dist.artifacts.publishing`: the one "may I replace this?" rule and the one atomic publish
  (renames on a local disk, manifest last on object storage);
* :mod:`~seater_dist.artifacts.cache`: verified copies of remote artifacts in a node-local cache.
"""

from seater_dist.artifacts.cache import cache_root, local_copy, private_dir
from seater_dist.artifacts.fs import (
    ArtifactError,
    check_apart,
    exists,
    is_remote,
    join,
    local_path,
    location,
    name_of,
    parent,
    path_or_uri,
    read_bytes,
    resolve,
    uri,
    write_bytes,
)
from seater_dist.artifacts.lock import MIN_FREE_BYTES, lock_path, output_lock, writer_lock
from seater_dist.artifacts.manifest import (
    MANIFEST,
    member,
    read_manifest,
    sha256_file,
    to_jsonable,
    verify_files,
    write_manifest,
)
from seater_dist.artifacts.publishing import (
    atomic_dir,
    check_replaceable,
    collect_task_outputs,
    publish,
    staged_output,
    task_output_dir,
)

__all__ = [
    "MANIFEST", "MIN_FREE_BYTES", "ArtifactError", "atomic_dir", "cache_root", "check_apart", "check_replaceable",
    "collect_task_outputs", "exists", "is_remote", "join", "local_copy", "local_path", "location", "lock_path",
    "member", "name_of", "output_lock", "parent", "path_or_uri", "private_dir", "publish", "read_bytes",
    "read_manifest", "resolve", "sha256_file", "staged_output", "task_output_dir", "to_jsonable", "uri",
    "verify_files", "write_bytes", "write_manifest", "writer_lock",
]
