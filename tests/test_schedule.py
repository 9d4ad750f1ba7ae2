from npu_cache_fx import CacheConfig, make_plan
from npu_cache_fx.schedule import Action, config_actions, forecast_coefficients

C, W, R = Action.COMPUTE, Action.WRITE, Action.READ


def dit(**kw):
    base = dict(method="dit_block_cache", blocks_count=7, steps_count=5)
    base.update(kw)
    return CacheConfig(**base).resolved()


def attn(**kw):
    base = dict(method="attention_cache", blocks_count=4, steps_count=10)
    base.update(kw)
    return CacheConfig(**base).resolved()


def test_reference_trace():
    # SPEC §2: steps 0,1,3 computed; 2 and 4 reuse what 1 and 3 recorded.
    assert config_actions(dit(step_start=1, step_interval=2, block_start=2, block_end=6)) == [C, W, R, W, R]


def test_dit_honours_step_end():
    # MindIE defect 1: step_end is ignored by its dit cache (it would reuse at 6 and 8).
    got = config_actions(dit(steps_count=10, step_start=2, step_interval=2, step_end=5))
    assert got == [C, C, W, R, W, R, C, C, C, C]


def test_refresh_whose_value_is_never_read_is_plain_compute():
    # step 4 is a refresh (interval 2 from 0) but step_end=4 means nothing reads it.
    assert config_actions(dit(step_start=0, step_interval=2, step_end=4)) == [W, R, W, R, C]


def test_attention_semantics_match_mindie():
    # reuse iff start < s <= end and (s-start) % I != 0; store iff computed and start <= s < end
    got = config_actions(attn(step_start=2, step_interval=3, step_end=7))
    assert got == [C, C, W, R, R, W, R, R, C, C]


def test_attention_store_at_end_is_dropped():
    # s=6 == step_end: MindIE does not store there; s=4 store feeds 5 and 6.
    got = config_actions(attn(steps_count=8, step_start=0, step_interval=2, step_end=6))
    assert got == [W, R, W, R, W, R, C, C]


def test_bypass_plans_are_all_compute():
    for cfg in (dit(step_start=5), dit(step_start=1, step_end=1), dit(block_start=7, block_end=7),
                dit(step_interval=1), attn(step_interval=1)):
        assert set(config_actions(cfg)) == {C}
        assert make_plan([cfg]).bypass


def test_combined_plan_variants_and_table():
    plan = make_plan([dit(step_start=1, step_interval=2, blocks="a"),
                      dit(step_start=2, step_interval=2, blocks="b")])
    assert plan.decisions == ((C, C), (W, C), (R, W), (W, R), (R, C))
    assert plan.variants() == [(C, C), (W, C), (R, W), (W, R), (R, C)]
    assert plan.reuse_steps() == [2, 3, 4]
    text = plan.table()
    assert text.splitlines()[0].split(" | ")[0].strip() == "step"
    assert "5 variant(s); 3 of 5 steps reuse" in text


def test_steps_count_must_agree():
    import pytest
    from npu_cache_fx import ConfigError
    with pytest.raises(ConfigError, match="steps_count must be the same"):
        make_plan([dit(), dit(steps_count=6)])


def test_explicit_refresh_steps():
    got = config_actions(dit(steps_count=10, refresh_steps=[2, 3, 7]))
    assert got == [C, C, C, W, R, R, R, W, R, R]  # 2 is overwritten at 3 before any read
    # attention: reads never at the listed steps; stores on computed steps before step_end
    got = config_actions(attn(refresh_steps=[0, 4], step_end=6))
    assert got == [W, R, R, R, W, R, R, C, C, C]
    assert make_plan([dit(refresh_steps=[])]).bypass


def test_refresh_steps_validation():
    import pytest
    from npu_cache_fx import ConfigError
    with pytest.raises(ConfigError, match=r"refresh_steps must be < steps_count \(5\), got 7"):
        CacheConfig(steps_count=5, refresh_steps=[1, 7])
    with pytest.raises(ConfigError, match="duplicates"):
        CacheConfig(steps_count=5, refresh_steps=[1, 1])
    with pytest.raises(ConfigError, match="replaces step_interval"):
        CacheConfig(steps_count=5, refresh_steps=[1], step_interval=2)
    with pytest.raises(ConfigError, match="ints >= 0"):
        CacheConfig(steps_count=5, refresh_steps=[-1])
    assert CacheConfig(steps_count=5, refresh_steps=[3, 1]).refresh_steps == (1, 3)


# ----------------------------------------------------------------------------- exact tables
# CacheAgent-by-hand tests share config_actions and forecast_coefficients with the runtime, so a bug in
# either passes through them: these tables pin both independently of any reference implementation.

def test_refresh_steps_first_entry_counts():
    # refresh at 2 and 5 only; step_start=0: steps 0-1 have nothing to read (compute), 3-4 read step 2's
    # value, 6-7 read step 5's. Ignoring the first entry would give [C, C, C, C, C, W, R, R].
    assert config_actions(dit(steps_count=8, step_start=0, refresh_steps=(2, 5))) == [C, C, W, R, R, W, R, R]
    assert config_actions(attn(steps_count=8, step_start=0, refresh_steps=(2, 5))) == [W, R, W, R, R, W, R, R]


def test_config_actions_table():
    table = {
        (5, 1, 2, None): [C, W, R, W, R],
        (10, 0, 3, None): [W, R, R, W, R, R, W, R, R, C],  # the refresh at 9 is never read
        (10, 4, 3, 8): [C, C, C, C, W, R, R, W, R, C],
        (6, 2, 4, None): [C, C, W, R, R, R],
    }
    for (steps, start, interval, end), want in table.items():
        assert config_actions(dit(steps_count=steps, step_start=start, step_interval=interval,
                                  step_end=end)) == want, (steps, start, interval, end)


def test_forecast_coefficients_table():
    # Lagrange weights through the newest nodes (newest first), extrapolating to t.
    assert forecast_coefficients(600.0, [700.0], 1) == [1.0]
    assert forecast_coefficients(600.0, [700.0, 800.0], 2) == [2.0, -1.0]
    assert forecast_coefficients(500.0, [700.0, 800.0], 2) == [3.0, -2.0]
    assert forecast_coefficients(600.0, [700.0, 800.0, 900.0], 3) == [3.0, -3.0, 1.0]
    assert forecast_coefficients(600.0, [700.0, 700.0, 800.0], 3) == [2.0, -1.0, 0.0]  # repeated node dropped
    assert forecast_coefficients(650.0, [700.0, 800.0, 900.0, 1000.0], 2) == [1.5, -0.5]  # only the newest two


def test_scaled_configs_table():
    base = dit(steps_count=28, blocks_count=8, step_start=4, step_interval=3, step_end=24)
    table = {28: (4, 3, 24), 14: (2, 2, 12), 50: (7, 5, 43), 20: (3, 2, 17), 56: (8, 6, 48)}
    for steps, want in table.items():
        s = base.scaled(steps)
        assert (s.step_start, s.step_interval, s.step_end) == want, steps
        assert s.steps_count == steps
    to_end = dit(steps_count=28, blocks_count=8, step_start=4, step_interval=3).scaled(50)
    assert to_end.step_end == 49
    refresh = dit(steps_count=10, blocks_count=8, step_start=1, refresh_steps=(1, 4, 8)).scaled(20)
    assert refresh.refresh_steps == (2, 8, 16) and refresh.step_start == 2 and refresh.step_end == 19
    assert dit(steps_count=10, step_start=12).scaled(20).bypass


def test_segment_actions_follow_a_denoiser_that_joins_without_a_cache():
    """Wan 2.2's second expert takes over at step 3 with no cache of its own: its reads before its first
    write compute; the write before the switch stays (the runtime makes it, and nothing reads it)."""
    from npu_cache_fx.schedule import segment_actions
    acts = config_actions(dit(steps_count=8, step_start=0, step_interval=3))  # W R R W R R W R
    assert acts == [W, R, R, W, R, R, W, R]
    assert segment_actions(acts, (3,)) == acts  # the switch falls on a write
    assert segment_actions(acts, (2,)) == [W, R, C, W, R, R, W, R]
    assert segment_actions(acts, (1, 5)) == [W, C, C, W, R, C, W, R]
    assert segment_actions(acts, ()) == acts and segment_actions(acts, (0,)) == acts
