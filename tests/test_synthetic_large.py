import numpy as np
from PIL import Image

from cape_ray.data import synthetic_large as large
from cape_ray.data.mp100 import load_mp100
from cape_ray.data.synthetic import make_template, render_instances, synthetic_category_ids


def test_mp100_sized_export_reads_back_with_mp100_shapes_and_aligned_keypoints(tmp_path):
    large.export_mp100_sized(tmp_path, seed=0, scale=0.04, image_format="png", threads=2, subsets=("val",))
    dataset = load_mp100(tmp_path, 1, "val")
    assert dataset.category_ids == synthetic_category_ids("val", 0)
    for cid in dataset.category_ids:
        instances = dataset.instances[cid]
        assert len(instances) == large.instances_per_category(cid, 0, 0.04) >= large.MIN_INSTANCES
        assert 5 <= dataset.categories[cid].num_keypoints <= 35
        for inst in instances:
            assert large.LONG_SIDE[0] <= max(inst.width, inst.height) <= large.LONG_SIDE[1]
            assert min(inst.width, inst.height) >= large.ASPECT[0] * max(inst.width, inst.height) - 1
    # Keypoints land where the object was drawn: the pixels around each visible keypoint of the
    # written image match those around it in the object as rendered before resizing.
    cid = dataset.category_ids[0]
    template = make_template(cid, 0, large.KEYPOINT_RANGE)
    n = len(dataset.instances[cid])
    objects, keypoints, visible = render_instances(template, n, np.random.default_rng([0, cid, large._RENDER_TAG]),
                                                   large.OBJECT_CANVAS)
    differences = []
    for i, inst in enumerate(dataset.instances[cid]):
        written = np.asarray(Image.open(tmp_path / "images" / inst.file_name).convert("RGB"), dtype=np.float64)
        for (x, y), (u, v), seen in zip(inst.keypoints, keypoints[i], visible[i]):
            if seen:
                here = written[int(round(y)), int(round(x))]
                there = objects[i][int(round(v)), int(round(u))].astype(np.float64)
                differences.append(np.abs(here - there).mean())
                assert 0 <= x < inst.width and 0 <= y < inst.height
    assert np.median(differences) < 12, np.median(differences)
