"""Pre-trained tiny models really learn digits: FID (digits features) far below an
untrained model's and shuffled-pixel digits'; xAR comparable to flow at a similar budget."""

import pytest
import torch

from neon_ray import checkpoints
from neon_ray.config import from_dict
from neon_ray.data.digits import load_digits
from neon_ray.evaluate.features import ExtractorConfig, build_extractor, extract
from neon_ray.evaluate.refstats import ref_stats_from_features
from neon_ray.evaluate.run import balanced_labels, evaluate_images, sample_images
from neon_ray.families import get_family
from neon_ray.pretrain import PretrainConfig, run

N = 500  # samples per FID (> the 64-dim digits feature space)
STEPS = {"flow": 600, "edm": 600, "xar": 600}
BATCH = {"flow": 128, "edm": 128, "xar": 64}   # an xar step costs ~4× a flow step per image


@pytest.fixture(scope="module")
def digits_ref():
    extractor = build_extractor(ExtractorConfig())
    images, _ = load_digits()
    return extractor, ref_stats_from_features(extract(extractor, images), extractor.id)


def fid_of(family, model, cfg, digits_ref):
    extractor, ref = digits_ref
    sampler = family.default_sampler(cfg)
    labels = balanced_labels(N, cfg.num_classes)
    images = sample_images(family, model, labels, torch.arange(N, dtype=torch.int64), sampler, 250)
    return evaluate_images(images, ref, extractor)["fid"]


@pytest.fixture(scope="module")
def reference_fids(digits_ref):
    extractor, ref = digits_ref
    images, _ = load_digits()
    g = torch.Generator().manual_seed(0)
    shuffled = torch.stack([im.flatten()[torch.randperm(64, generator=g)].view(1, 8, 8) for im in images[:N]])
    return {"shuffled": evaluate_images(shuffled, ref, extractor)["fid"]}


@pytest.mark.parametrize("name", ["flow", "edm"])
def test_pretrained_model_beats_untrained_and_shuffled(name, tmp_path, digits_ref, reference_fids):
    out = str(tmp_path / name)
    run(from_dict(PretrainConfig, {"out": out, "family": name, "steps": STEPS[name], "progress": False,
                                   "threads": 1}))
    family, cfg, model, info = checkpoints.load_model(out, expect_family=name)
    assert info.images_seen == STEPS[name] * 128 and info.weights == "ema"
    torch.manual_seed(0)
    untrained = family.build(cfg).eval()
    trained_fid, untrained_fid = fid_of(family, model, cfg, digits_ref), fid_of(family, untrained, cfg, digits_ref)
    print(f"\n{name}: trained FID {trained_fid:.2f}, untrained {untrained_fid:.2f}, "
          f"shuffled-pixel digits {reference_fids['shuffled']:.2f}")
    assert trained_fid < untrained_fid / 5 and trained_fid < reference_fids["shuffled"] / 5


def test_xar_comparable_to_flow_at_similar_budget(tmp_path, digits_ref, reference_fids):
    fids = {}
    for name in ("flow", "xar"):
        out = str(tmp_path / name)
        run(from_dict(PretrainConfig, {"out": out, "family": name, "steps": STEPS[name], "progress": False,
                                       "threads": 1, "batch_size": BATCH[name]}))
        family, cfg, model, _ = checkpoints.load_model(out)
        fids[name] = fid_of(family, model, cfg, digits_ref)
    print(f"\nflow FID {fids['flow']:.2f} ({STEPS['flow']}×{BATCH['flow']}), xar FID {fids['xar']:.2f} "
          f"({STEPS['xar']}×{BATCH['xar']}), shuffled {reference_fids['shuffled']:.2f}")
    assert fids["xar"] < reference_fids["shuffled"] / 20
    assert fids["xar"] < 2 * fids["flow"]


def test_other_family_checkpoint_is_refused(tiny_flow_base):
    with pytest.raises(ValueError, match="is of family 'flow', expected 'edm'"):
        checkpoints.load_model(tiny_flow_base, expect_family="edm")
    assert get_family("flow").name == "flow"
