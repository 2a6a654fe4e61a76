"""Evaluation metrics on the host (numpy / scipy / scikit-learn).

Definitions follow docs/METRICS.md:

* ``image_auroc``, ``f1_max``: image level, image score = max of the map.
* ``pixel_auroc``: over all pixels of all images (exact Mann-Whitney statistic,
  ties counted one half; equal to ``sklearn.metrics.roc_auc_score``).
* ``au_pro``: the official MVTec AD dataset-level AU-PRO (8-connected
  components, FPR over every defect-free pixel of every image, PRO = mean over
  every component, trapezoid over FPR in [0, limit] interpolated at the
  limit, divided by the limit), computed EXACTLY over every distinct score.
* ``au_pro_per_image``: the RD4AD / MRKD code's variant (200 thresholds per
  image, FPR < 0.3 rescaled to [0, 1], averaged over anomalous images).
* ``au_spro``: MVTec LOCO AD's AU-sPRO (saturated per-region overlap), exact
  over every distinct score; the official tool's adaptive threshold sampling
  converges to this curve.

Exact curves: the scores are sorted once, and cumulative sums give the FPR
and (s)PRO after every distinct score, so there is no loop over thresholds.
All pixels with the same score cross a threshold together (ties). For the
exact curve it does not matter whether a pixel counts when ``map > t``
(LOCO's rule) or ``map >= t`` (MVTec AD's): both give the same family of
predicted sets {map >= v : v a distinct score} plus the empty set, hence the
same curve, from (0, 0) to (1, 1).

Undefined values (an evaluation set without an anomalous or without a good
image, no ground-truth region, ...) are returned as ``float('nan')`` with a
logged warning that says why; the report writes them as null.

The functions live in two modules, all importable from ``kdjax.metrics``:
``kdjax.metrics.curves`` (input checks, image level, exact curves and their
areas) and ``kdjax.metrics.regions`` (pixel AUROC, AU-PRO, AU-sPRO and the
per-dataset bundles).
"""

from kdjax.metrics.curves import (  # noqa: F401
    NAN, SPRO_FPR_LIMITS, area_under_curve, areas_under_curve, as_map_list, binarize_mask,
    check_finite, check_same_shapes, f1_max, image_auroc, image_scores)
from kdjax.metrics.regions import (  # noqa: F401
    au_pro, au_pro_per_image, au_spro, loco_metrics, mvtec_ad_metrics, pixel_auroc, pro_curve,
    rd4ad_compute_pro, saturation_area, spro_curve, spro_key)

__all__ = [
    "NAN", "SPRO_FPR_LIMITS", "area_under_curve", "areas_under_curve", "as_map_list",
    "au_pro", "au_pro_per_image", "au_spro", "binarize_mask", "check_finite",
    "check_same_shapes", "f1_max", "image_auroc", "image_scores", "loco_metrics",
    "mvtec_ad_metrics", "pixel_auroc", "pro_curve", "rd4ad_compute_pro", "saturation_area",
    "spro_curve", "spro_key",
]
