"""Published MP-100 test PCK@0.2 (percent) per split, 1-shot and 5-shot, shown beside cape-ray's by
`cape-ray evaluate --protocol mp100`.

Every number is copied from the source named in its entry; None = not found in a readable source.
A mean is given only where that source states it; otherwise the table computes it from the five
splits and says so. The metric is the papers' PCK@0.2 (normalised by max(w, h) of the query's
bounding box, averaged over all support-query pairs of a split's 20 test categories, 200 episodes x
15 queries per category).

An entry: method, backbone, paper, venue, year, and per setting ("1-shot", "5-shot"): splits (five
values or None), mean (or None), source (where the numbers were read), note (optional).
"""

from __future__ import annotations

_NONE = [None] * 5
_CAPENEXT = ("comparison table 'Results on MP-100 dataset' in the README of github.com/yzrs/CapeNext "
             "(commit 4e08e71)")
_CAPEFORMER = "README of github.com/flyinglynx/CapeFormer (commit b034735)"
_ESCAPE = "README of github.com/khoiucd/escape-tgt (commit c5f249a), section 'Results and pretrained checkpoints'"
_POSE_ANYTHING = "README of github.com/orhir/PoseAnything (commit 078f744)"
_CAPEX = "README of github.com/matanr/capex (commit cbb591f), section 'Evaluation and Pretrained Models'"
_CAPEX_NO_5_SHOT = dict(splits=_NONE, mean=None, source="",
                        note="no 5-shot setting: CapeX takes text descriptions of the keypoints, not support images")

PUBLISHED = [
    dict(method="POMNet", backbone="ResNet-50", venue="ECCV", year=2022,
         paper="Pose for Everything: Towards Category-Agnostic Pose Estimation (Xu et al.)",
         **{"1-shot": dict(splits=[84.23, 78.25, 78.17, 78.68, 79.17], mean=79.70,
                           source=f"{_CAPENEXT}, row POMNet / ResNet-50"),
            "5-shot": dict(splits=_NONE, mean=80.71,
                           source="SCAPE (Liang et al., ECCV 2024, arXiv 2407.13483), main MP-100 comparison table, "
                                  "read through a public paper note (table number not verified)",
                           note="per-split 5-shot numbers were not found in a readable source")}),
    dict(method="CapeFormer", backbone="ResNet-50", venue="CVPR", year=2023,
         paper="Matching Is Not Enough: A Two-Stage Framework for Category-Agnostic Pose Estimation (Shi et al.)",
         **{"1-shot": dict(splits=[89.45, 84.88, 83.59, 83.59, 85.09], mean=None,
                           source=f"{_CAPEFORMER}, table of the 1-shot checkpoints ('1-shot PCK')",
                           note="the README repeats 83.59 for splits 3 and 4; the yzrs/CapeNext README lists split 4 "
                                "as 83.53 and the mean as 85.31"),
            "5-shot": dict(splits=[91.94, 88.92, 89.40, 88.01, 88.25], mean=None,
                           source=f"{_CAPEFORMER}, table of the 5-shot checkpoints ('5-shot PCK')")}),
    dict(method="ESCAPE", backbone="ResNet-50", venue="CVPR", year=2024,
         paper="ESCAPE: Encoding Super-keypoints for Category-Agnostic Pose Estimation (Nguyen et al.)",
         **{"1-shot": dict(splits=[85.98, 82.72, 81.35, 82.00, 80.99], mean=None,
                           source=f"{_ESCAPE}, row ESCAPE 1-shot",
                           note="released checkpoints; the README says they score slightly differently from the paper "
                                "(other seeds); the yzrs/CapeNext README lists the paper's 1-shot as 86.89 / 82.55 / "
                                "81.25 / 81.72 / 81.32, mean 82.74"),
            "5-shot": dict(splits=[91.19, 87.57, 85.46, 87.69, 86.42], mean=None,
                           source=f"{_ESCAPE}, row ESCAPE 5-shot")}),
    dict(method="Pose Anything", backbone="SwinV2-T", venue="ECCV", year=2024,
         paper="A Graph-Based Approach for Category-Agnostic Pose Estimation (Hirschorn and Avidan)",
         **{"1-shot": dict(splits=[91.19, 87.81, 85.68, 85.87, 85.61], mean=None,
                           source=f"{_POSE_ANYTHING}, section '1-Shot Models', row Tiny"),
            "5-shot": dict(splits=[94.24, 91.32, 90.15, 90.37, 89.73], mean=None,
                           source=f"{_POSE_ANYTHING}, section '5-Shot Models', row Tiny")}),
    dict(method="Pose Anything", backbone="SwinV2-S", venue="ECCV", year=2024,
         paper="A Graph-Based Approach for Category-Agnostic Pose Estimation (Hirschorn and Avidan)",
         **{"1-shot": dict(splits=[94.73, 89.79, 90.69, 88.09, 90.11], mean=None,
                           source=f"{_POSE_ANYTHING}, section '1-Shot Models', row Small"),
            "5-shot": dict(splits=[96.67, 91.48, 92.62, 90.95, 92.41], mean=None,
                           source=f"{_POSE_ANYTHING}, section '5-Shot Models', row Small")}),
    dict(method="CapeX", backbone="SwinV2-T", venue="ICLR", year=2025,
         paper="CapeX: Category-Agnostic Pose Estimation from Textual Point Explanation (Rusanovsky et al.)",
         **{"1-shot": dict(splits=[92.79, 89.47, 84.95, 87.25, 89.61], mean=88.81,
                           source=f"{_CAPEX}, row CapeX (configs/tiny)"),
            "5-shot": _CAPEX_NO_5_SHOT}),
    dict(method="CapeX", backbone="SwinV2-S", venue="ICLR", year=2025,
         paper="CapeX: Category-Agnostic Pose Estimation from Textual Point Explanation (Rusanovsky et al.)",
         **{"1-shot": dict(splits=[95.62, 90.94, 88.95, 89.43, 92.57], mean=91.50,
                           source=f"{_CAPEX}, row CapeX-S (configs/small)"),
            "5-shot": _CAPEX_NO_5_SHOT}),
]
