"""clipseg/mask_pipeline.py: all phrases of all expressions decoded in one pass per image (or per window), the
expressions evaluated, refined and post-processed in the documented order, SAM prompted with the thresholded map's
components, and options checked."""

import json

import numpy as np
import pytest
from scipy import ndimage

from clipseg.expressions import evaluate_many, parse
from clipseg.mask_pipeline import PipelineOptions, expression_maps, masks_from_maps, sam_components, segment
from clipseg.postprocess import MaskOptions, make_mask
from clipseg.refine import SamRefiner, guided_refine
from clipseg.tiling import tiled_probabilities

PHRASE_FIELDS = {"cat": (0, 1.0), "dog": (1, 0.8), "leash": (2, 0.6)}


class FakeModel:
    """probabilities for each phrase: a smooth function of the pixels (channel, scale), recording every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, pixels, phrases):
        self.calls.append((pixels.shape[:2], list(phrases)))
        maps = []
        for phrase in phrases:
            channel, scale = PHRASE_FIELDS[phrase]
            smooth = ndimage.uniform_filter(pixels[..., channel].astype(np.float32) / 255, 9)
            maps.append(np.clip(smooth * scale, 0, 1))
        return np.stack(maps)


def scene(height=120, width=160):
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[20:70, 30:90, 0] = 230
    pixels[60:110, 80:150, 1] = 240
    pixels[50:80, 100:120, 2] = 250
    return pixels


EXPRESSIONS = [parse("cat | dog"), parse("dog - leash"), parse("cat")]


def test_one_pass_per_image_decodes_every_phrase_and_each_expression_is_post_processed():
    model, pixels = FakeModel(), scene()
    options = PipelineOptions(mask=MaskOptions(threshold=0.5, grow=2, instances=True))
    results = segment(pixels, EXPRESSIONS, model, options)
    assert model.calls == [((120, 160), ["cat", "dog", "leash"])]
    maps = evaluate_many(EXPRESSIONS, ["cat", "dog", "leash"], model(pixels, ["cat", "dog", "leash"]))
    assert [r.expression for r in results] == EXPRESSIONS
    for result, expected in zip(results, maps):
        np.testing.assert_array_equal(result.probs, expected)
        np.testing.assert_array_equal(result.mask.mask, make_mask(expected, options.mask).mask)
        assert result.sam is None
    assert [len(r.mask.instances) for r in results] == [1, 1, 1]
    summary = results[1].summary()
    assert summary["expression"]["expression"] == "dog - leash" and summary["threshold"] == 0.5
    json.dumps([r.summary() for r in results], allow_nan=False)


def test_kept_maps_are_post_processed_again_without_the_model():
    model, pixels = FakeModel(), scene()
    options = PipelineOptions(refine="guided")
    maps = expression_maps(pixels, EXPRESSIONS, model, options)
    assert maps.shape == (3, 120, 160) and len(model.calls) == 1
    stricter = PipelineOptions(mask=MaskOptions(threshold=0.7, shrink=1), refine="guided")
    again = masks_from_maps(pixels, EXPRESSIONS, maps, stricter)
    assert len(model.calls) == 1
    for result, probs in zip(again, maps):
        np.testing.assert_array_equal(result.mask.mask, make_mask(probs, stricter.mask).mask)
    first = segment(pixels, EXPRESSIONS, FakeModel(), options)
    np.testing.assert_array_equal(np.stack([r.probs for r in first]), maps)
    with pytest.raises(ValueError, match="2 maps for 3 expressions"):
        masks_from_maps(pixels, EXPRESSIONS, maps[:2], options)


def test_tiling_decodes_every_phrase_once_per_window_and_context_pass():
    model, pixels = FakeModel(), scene(200, 260)
    options = PipelineOptions(tile=96, tile_overlap=24, tile_context=0.2)
    results = segment(pixels, EXPRESSIONS[:1], model, options)
    windows = len(model.calls) - 1  # rows start at 0, 72, 104; columns at 0, 72, 144, 164
    assert windows == 3 * 4 and model.calls[-1] == ((200, 260), ["cat", "dog"])
    assert all(phrases == ["cat", "dog"] and shape == (96, 96) for shape, phrases in model.calls[:-1])
    expected = tiled_probabilities(pixels, lambda crop: FakeModel()(crop, ["cat", "dog"]), 96, 24, 0.2)
    np.testing.assert_allclose(results[0].probs, np.maximum(expected[0], expected[1]), atol=1e-6)


def test_guided_refinement_acts_on_the_evaluated_maps():
    model, pixels = FakeModel(), scene()
    results = segment(pixels, EXPRESSIONS, model, PipelineOptions(refine="guided"))
    maps = evaluate_many(EXPRESSIONS, ["cat", "dog", "leash"], model(pixels, ["cat", "dog", "leash"]))
    np.testing.assert_allclose(np.stack([r.probs for r in results]), guided_refine(maps, pixels), atol=1e-6)


def test_sam_is_prompted_with_the_thresholded_components_and_its_union_is_post_processed(tiny_sam):
    model, pixels = FakeModel(), scene()
    refiner = SamRefiner.from_pretrained(str(tiny_sam()))
    prompted = []
    refine = refiner.refine
    refiner.refine = lambda image, probs, instances: (prompted.append(instances), refine(image, probs, instances))[1]
    options = PipelineOptions(mask=MaskOptions(threshold=0.5, min_area=50, max_instances=2, feather=3), refine="sam")
    results = segment(pixels, [parse("cat | leash")], model, options, sam=refiner)
    probs = results[0].probs
    assert prompted == [sam_components(probs, options.mask)] and len(prompted[0]) == 2
    expected = make_mask(probs, options.mask, start=results[0].sam.union)
    np.testing.assert_array_equal(results[0].mask.mask, expected.mask)
    np.testing.assert_array_equal(results[0].mask.soft, expected.soft)
    assert len(results[0].summary()["sam_scores"]) == 2


def test_sam_components_drop_small_ones_and_keep_the_best():
    probs = np.zeros((30, 40), np.float32)
    probs[2:10, 2:10] = 0.9  # 64 px
    probs[15:20, 15:20] = 0.95  # 25 px
    probs[25:27, 30:32] = 0.99  # 4 px
    found = sam_components(probs, MaskOptions(threshold=0.5, min_area=5, sort_by="score", max_instances=1))
    assert [(i.area, i.box) for i in found] == [(25, (15, 15, 20, 20))]


def test_options_are_checked_and_recorded():
    assert PipelineOptions(tile=352).to_dict() == {
        "mask": MaskOptions().to_dict(),
        "refine": "none",
        "tile": 352,
        "tile_overlap": 88,
        "tile_context": 0.0,
    }
    for kwargs, message in (
        ({"refine": "crf"}, "refine must be one of none, guided, sam"),
        ({"tile": 0}, "tile side"),
        ({"tile": 64, "tile_overlap": 64}, "overlap"),
        ({"tile_overlap": 8}, "need tiling"),
        ({"tile": 64, "tile_context": 1.0}, "tile_context"),
    ):
        with pytest.raises(ValueError, match=message):
            PipelineOptions(**kwargs)
    with pytest.raises(ValueError, match='refine="sam" needs a SamRefiner'):
        segment(scene(), EXPRESSIONS, FakeModel(), PipelineOptions(refine="sam"))
    model = FakeModel()
    assert segment(scene(), [], model) == [] and model.calls == []
