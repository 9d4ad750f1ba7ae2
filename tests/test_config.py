import pytest

from npu_cache_fx import CacheConfig, ConfigError
from npu_cache_fx.config import MINDIE_UNBOUNDED


@pytest.mark.parametrize("field, value, words", [
    ("method", "taylor_cache", "method"),
    ("blocks_count", 0, "blocks_count"),
    ("steps_count", -1, "steps_count"),
    ("step_start", -1, "step_start"),
    ("step_interval", 0, "step_interval"),
    ("block_start", -2, "block_start"),
    ("step_end", -1, "step_end"),
    ("block_end", -1, "block_end"),
    ("steps_count", 2.5, "steps_count"),
    ("step_interval", True, "step_interval"),
    ("blocks", "", "blocks"),
])
def test_invalid_field_names_field_and_value(field, value, words):
    with pytest.raises(ConfigError) as err:
        CacheConfig(**{"steps_count": 10, field: value})
    assert words in str(err.value) and repr(value).strip("'") in str(err.value)
    assert isinstance(err.value, ValueError)


def test_end_before_start():
    with pytest.raises(ConfigError, match=r"step_end must be >= step_start \(5\), got 3"):
        CacheConfig(steps_count=10, step_start=5, step_end=3)
    with pytest.raises(ConfigError, match=r"block_end must be >= block_start \(4\), got 2"):
        CacheConfig(steps_count=10, block_start=4, block_end=2)


def test_range_past_block_count():
    with pytest.raises(ConfigError, match=r"block_end must be <= blocks_count \(8\), got 9"):
        CacheConfig(steps_count=10, blocks_count=8, block_end=9)
    with pytest.raises(ConfigError, match=r"block_end must be <= blocks_count \(8\), got 9"):
        CacheConfig(steps_count=10, block_end=9).resolved(blocks_count=8)


def test_blocks_count_mismatch_with_model():
    with pytest.raises(ConfigError, match="blocks_count is 7 but the block list"):
        CacheConfig(steps_count=10, blocks_count=7).resolved(blocks_count=8)


def test_defaults_resolve_to_the_whole_range():
    cfg = CacheConfig(steps_count=28).resolved(blocks_count=19)
    assert (cfg.block_start, cfg.block_end, cfg.step_start, cfg.step_end) == (0, 19, 0, 27)


def test_mindie_default_block_end_accepted_for_dit_cache():
    # MindIE defect 3: its default block_end=10000 raises ConfigError for dit cache.
    cfg = CacheConfig(method="dit_block_cache", blocks_count=7, steps_count=5,
                      block_end=MINDIE_UNBOUNDED, step_end=MINDIE_UNBOUNDED).resolved()
    assert cfg.block_end == 7 and cfg.step_end == 4


def test_steps_count_required_to_resolve():
    with pytest.raises(ConfigError, match="steps_count is required"):
        CacheConfig(blocks_count=3).resolved()
    with pytest.raises(ConfigError, match="blocks_count is required"):
        CacheConfig(steps_count=3).resolved()


@pytest.mark.parametrize("kwargs", [
    dict(step_start=10),                 # step_start >= steps_count
    dict(step_start=3, step_end=3),      # step_end == step_start
    dict(block_start=8, block_end=8),    # block_end == block_start
    dict(step_interval=1),               # interval 1 = cache off
])
def test_bypass(kwargs):
    base = dict(steps_count=10, blocks_count=8, step_interval=2)
    base.update(kwargs)
    assert CacheConfig(**base).resolved().bypass


def test_frozen_and_label():
    cfg = CacheConfig(steps_count=10, blocks="single_transformer_blocks", block_start=1, block_end=5)
    with pytest.raises(Exception):
        cfg.step_start = 3
    assert cfg.label == "dit[single_transformer_blocks:1:5]"
    assert CacheConfig(steps_count=1, name="x").label == "x"


def test_json_round_trip():
    from npu_cache_fx.config import configs_from_json, configs_to_json
    cfgs = [CacheConfig(steps_count=28, step_start=4, step_interval=3, blocks="transformer_blocks", forecast="linear"),
            CacheConfig(steps_count=28, refresh_steps=(2, 5, 9), blocks="single_transformer_blocks")]
    data = configs_to_json(cfgs)
    assert data[1] == {"steps_count": 28, "refresh_steps": [2, 5, 9], "blocks": "single_transformer_blocks"}
    assert configs_from_json(data) == cfgs
    assert configs_from_json({"best": {"config": data}}) == cfgs
    with pytest.raises(ConfigError, match=r"unknown CacheConfig field\(s\) \['interval'\]"):
        configs_from_json({"interval": 2})
