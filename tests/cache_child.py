"""A separate process that loads a prepared split through the cache, for the cache tests.

    python tests/cache_child.py '{"data_root": ..., "cache_dir": ..., "image_size": 32, "reads": LOG,
                                  "delay": 0.01, "go": PATH}'

Every image read is appended to the `reads` log as this process's pid (after a `delay`, so that a
build lasts long enough for another process to run into it). With `go`, the process waits for that
file before loading (having created `ready`.PID), so two processes can start loading at the same
moment. Prints one JSON line:
{"pid": ..., "fingerprint": ...}.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time


def fingerprint(split) -> str:
    """SHA-256 over every field of a PreparedSplit, tensors by dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name in ("images", "keypoints", "visible", "crop_to_original", "bbox", "category", "instance_ids"):
        tensor = getattr(split, name)
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    digest.update(json.dumps({
        "rows_by_category": {str(k): v.tolist() for k, v in split.rows_by_category.items()},
        "categories": [repr(c) for c in split.categories.values()], "category_ids": split.category_ids,
        "skipped": {str(k): v for k, v in split.skipped.items()}, "notes": {str(k): v for k, v in split.notes.items()},
        "adjacency": {str(k): v.tolist() for k, v in split.adjacency.items()},
        "sizes": [split.image_size, split.num_shots, split.num_queries], "source": split.source,
    }).encode())
    return digest.hexdigest()


def main() -> None:
    args = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(1)
    from cape_ray.config import TrainConfig
    from cape_ray.data import mp100
    from cape_ray.data.loading import load_split

    read_image = mp100.MP100ImageLoader.__call__

    def logged_read(self, inst):
        with open(args["reads"], "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(args.get("delay", 0.0))
        return read_image(self, inst)

    mp100.MP100ImageLoader.__call__ = logged_read
    config = TrainConfig(data_root=args["data_root"], cache_dir=args["cache_dir"], image_size=args["image_size"])
    if args.get("go"):
        open(f"{args['ready']}.{os.getpid()}", "w").close()
        while not os.path.exists(args["go"]):
            time.sleep(0.01)
    split = load_split(config, "train", 2)
    print(json.dumps({"pid": os.getpid(), "fingerprint": fingerprint(split)}), flush=True)


if __name__ == "__main__":
    main()
