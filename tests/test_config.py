import json

import pytest

from easyquant import QuantConfig
from easyquant.config import preset_overrides


def test_defaults_follow_the_paper():
    c = QuantConfig()
    assert (c.bits, c.group_size, c.outlier_sigma, c.outlier_scope, c.method) == (
        4,
        None,
        3.0,
        "tensor",
        "easyquant",
    )
    assert c.steps == 500
    assert (c.qmin, c.qmax) == (-8, 7)
    assert QuantConfig.paper() == c


def test_json_round_trip():
    c = QuantConfig(
        bits=3,
        group_size=128,
        outlier_sigma=2.5,
        outlier_scope="channel",
        steps=7,
        lr=0.05,
        method="rtn",
        scale_dtype="float32",
    )
    assert QuantConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bits", 7),
        ("bits", True),
        ("group_size", 0),
        ("group_size", 2.5),
        ("outlier_sigma", 0),
        ("outlier_sigma", -1.0),
        ("outlier_sigma", float("inf")),
        ("outlier_scope", "row"),
        ("steps", -1),
        ("steps", 1.5),
        ("lr", 0),
        ("lr", float("nan")),
        ("method", "gptq"),
        ("scale_dtype", "int8"),
        ("outlier_dtype", "int4"),
        ("outlier_dtype", "float64"),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{field: value})


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown"):
        QuantConfig.from_dict({"bits": 4, "nbits": 4})


def test_new_fields_default_to_the_paper_and_validate():
    c = QuantConfig()
    assert (c.init_grid, c.refine_steps) == (0, 0)
    assert QuantConfig.preset("paper") == QuantConfig.paper() == c
    for field in ("init_grid", "refine_steps"):
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match=field):
                QuantConfig(**{field: bad})
    assert QuantConfig(outlier_scope="group", group_size=64).outlier_scope == "group"
    assert QuantConfig(outlier_dtype="int8").outlier_dtype == "int8"


def test_best_preset_is_a_different_valid_recipe_and_round_trips():
    best = QuantConfig.best()
    assert best != QuantConfig.paper()
    grouped = QuantConfig.preset("best", bits=4, group_size=64)
    assert grouped.group_size == 64 and grouped.outlier_scope == "group"
    assert grouped.steps == best.steps and grouped.outlier_scope != best.outlier_scope
    low_grouped = QuantConfig.best(bits=3, group_size=128)
    assert low_grouped.outlier_scope == "group" and low_grouped.outlier_sigma < 2.75
    # Below 4 bits the recipe changes (more outliers, a longer search), not just the bit width.
    low = QuantConfig.preset("best", bits=3)
    assert low.bits == 3 and low != best.replace(bits=3)
    assert low.outlier_scope != best.outlier_scope and low.steps > best.steps
    assert QuantConfig.from_dict(json.loads(json.dumps(best.to_dict()))) == best
    with pytest.raises(ValueError, match="preset"):
        QuantConfig.preset("fastest")


def test_quality_preset_is_best_with_finer_key_and_value_projections_at_4_bits_per_channel():
    best, quality = QuantConfig.best(), QuantConfig.preset("quality")
    assert quality == best.replace(outlier_sigma=2.6)
    assert QuantConfig.quality(outlier_sigma=3.0).outlier_sigma == 3.0  # a change wins
    overrides = preset_overrides("quality", quality)
    assert set(overrides) == {"*.k_proj", "*.v_proj"}
    for changes in overrides.values():
        finer = quality.replace(**changes)  # a valid config
        assert finer.bits == 6 and finer.outlier_scope == quality.outlier_scope
    overrides["*.k_proj"]["bits"] = 8  # a copy: the preset itself is unchanged
    assert preset_overrides("quality", quality)["*.k_proj"]["bits"] == 6
    # other widths and groups: the best preset, no per-module changes
    for changes in (dict(bits=3), dict(group_size=128), dict(bits=2, group_size=64)):
        assert QuantConfig.quality(**changes) == QuantConfig.best(**changes)
        assert preset_overrides("quality", QuantConfig.quality(**changes)) == {}
    assert preset_overrides("best", best) == preset_overrides("paper", QuantConfig.paper()) == {}
    with pytest.raises(ValueError, match="preset"):
        preset_overrides("fastest", best)
