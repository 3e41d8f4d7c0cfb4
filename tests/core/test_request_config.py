import pytest

from kvsched.core.config import CacheConfig, SchedulerConfig
from kvsched.core.errors import ConfigError, InvalidRequestError, UnsupportedFeatureError
from kvsched.core.request import Request, RequestState, SamplingParams


def test_states_are_ordered():
    assert (
        RequestState.CONTEXT_INIT
        < RequestState.GENERATION_IN_PROGRESS
        < RequestState.GENERATION_TO_COMPLETE
        < RequestState.GENERATION_COMPLETE
    )


def test_request_views_follow_positions():
    req = Request(1, [5, 6, 7, 8, 9], 4)
    assert req.context_remaining_length == 5 and req.is_first_context_chunk
    req.context_chunk_size = 3
    assert not req.is_last_context_chunk
    req.context_current_position = 3
    assert not req.is_first_context_chunk and req.context_remaining_length == 2
    req.context_chunk_size = 2
    assert req.is_last_context_chunk
    req.output_token_ids += [10, 11]
    assert req.token_slice(3, 7) == [8, 9, 10, 11]
    assert req.token_slice(5, 7) == [10, 11] and req.token_at(6) == 11


def test_recompute_reset_makes_outputs_part_of_context():
    req = Request(1, [1, 2, 3], 8)
    req.context_current_position = 3
    req.state = RequestState.GENERATION_IN_PROGRESS
    req.output_token_ids = [4, 5]
    req.reset_for_recompute()
    assert req.state == RequestState.CONTEXT_INIT
    assert req.num_context_tokens == 5 and req.context_current_position == 0
    assert req.num_recomputed_tokens == 4 and req.num_preemptions == 1


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"prompt_token_ids": [], "max_new_tokens": 3}, InvalidRequestError),
        ({"prompt_token_ids": [1], "max_new_tokens": 0}, InvalidRequestError),
        ({"prompt_token_ids": [1], "max_new_tokens": 3, "beam_width": 2}, UnsupportedFeatureError),
    ],
)
def test_bad_requests_are_rejected(kwargs, exc):
    with pytest.raises(exc):
        Request(7, **kwargs)


def test_sampling_params_validate():
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(UnsupportedFeatureError):
        SamplingParams(use_beam_search=True)
    assert SamplingParams(stop="x").stop == ["x"]


@pytest.mark.parametrize("field", ["tokens_per_block", "num_device_blocks"])
def test_cache_config_rejects_non_positive(field):
    with pytest.raises(ConfigError, match=field):
        CacheConfig(**{field: 0})


def test_scheduler_config_rejects_unknown_kind():
    with pytest.raises(ConfigError, match="scheduler"):
        SchedulerConfig(scheduler="fifo")
