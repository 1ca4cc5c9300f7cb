"""A user family (``faulty_family:FaultyFlow``) whose sampler fails at chosen guidance scales.

The sweep tests inject trial failures with it: the flow family, except that
sampling at γ = 1.5 raises an ordinary exception and at γ = 2 reports out of
GPU memory. It reaches Ray workers through PYTHONPATH (see ``ray_local``).
"""

import torch

from neon_ray.families.flow import FlowFamily

RAISES_AT = 1.5
OOM_AT = 2.0


class FaultyFlow(FlowFamily):
    name = "faulty_family:FaultyFlow"

    def sample(self, model, labels, seeds, sampler):
        if sampler.guidance == RAISES_AT:
            raise RuntimeError(f"injected failure at guidance {sampler.guidance}")
        if sampler.guidance == OOM_AT:
            raise torch.OutOfMemoryError(f"injected: CUDA out of memory at guidance {sampler.guidance}")
        return super().sample(model, labels, seeds, sampler)
