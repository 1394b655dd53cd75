"""The folder of converted models (OPENVINO_CACHE_DIR): written whole or not at all by workers
that may convert at once, and kept to the models used last."""
import glob
import os
import shutil
import tempfile
import time

# Converted models a cache folder keeps: the most recently used (each version served or rolled
# back to marks its own), so that a rollout a day does not fill the disk.
CACHE_KEEP = 8

# A conversion writes into a scratch folder of its own; one untouched for this long belongs to a
# process killed while it converted (a reload superseded, a worker stopped), and is removed.
SCRATCH_PREFIX = "converting-"
STALE_SCRATCH_S = 3600


def cached(xml):
    """Whether the converted model `xml` is in the cache, marking it used if so."""
    try:
        os.utime(xml)
        return True
    except FileNotFoundError:
        return False
    except OSError:  # a cache this process may read but not write
        return os.path.isfile(xml)


def store(xml, save):
    """Put a model in the cache as `xml` and its weights (`save(path)` writes both), then remove
    all but the CACHE_KEEP most recently used there."""
    cache_dir = os.path.dirname(xml)
    os.makedirs(cache_dir, exist_ok=True)
    # Workers starting together may convert at once: each writes its own folder and renames the
    # weights, then the graph (the file `cached` looks for) into place.
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=cache_dir) as scratch:
        save(os.path.join(scratch, "model.xml"))
        os.replace(os.path.join(scratch, "model.bin"), xml[:-4] + ".bin")
        os.replace(os.path.join(scratch, "model.xml"), xml)
    graphs = sorted(glob.glob(os.path.join(cache_dir, "*.xml")), key=last_used, reverse=True)
    for old in graphs[CACHE_KEEP:]:
        for path in (old, old[:-4] + ".bin"):  # the graph first: `cached` no longer finds it
            try:
                os.remove(path)
            except FileNotFoundError:  # removed by another worker meanwhile
                pass
    for scratch in glob.glob(os.path.join(cache_dir, SCRATCH_PREFIX + "*")):
        if time.time() - last_used(scratch) / 1e9 > STALE_SCRATCH_S:
            shutil.rmtree(scratch, ignore_errors=True)


def last_used(path):
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return 0
