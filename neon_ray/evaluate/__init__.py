"""Evaluation: feature extractors, FID from mergeable moments, k-NN precision/recall.

- :mod:`.moments`: float64 moments (n, Σx, Σxxᵀ) that merge across evaluators; Fréchet distance.
- :mod:`.prdc`: precision/recall (Kynkäänniemi et al. 2019), density/coverage (Naeem et al. 2020).
- :mod:`.features`: extractors (digits CNN, clean-fid Inception, a user's), each with an id.
- :mod:`.refstats`: reference statistics npz, checked against the extractor id.
- :mod:`.run`: the ``evaluate`` and ``ref-stats`` commands and reusable pure pieces.
"""

from neon_ray.evaluate.features import Extractor, ExtractorConfig, build_extractor, extract
from neon_ray.evaluate.moments import Moments, frechet_distance, frechet_distance_moments
from neon_ray.evaluate.prdc import prdc
from neon_ray.evaluate.refstats import (RefStats, check_compatible, load_ref_stats, ref_stats_from_features,
                                        save_ref_stats)

__all__ = ["Extractor", "ExtractorConfig", "Moments", "RefStats", "build_extractor", "check_compatible",
           "extract", "frechet_distance", "frechet_distance_moments", "load_ref_stats", "prdc",
           "ref_stats_from_features", "save_ref_stats"]
