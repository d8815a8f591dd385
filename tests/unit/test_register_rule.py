"""tracking.register: which training runs add a version of the registered model."""

from __future__ import annotations

import pytest

from pipelines.common.config import ConfigError
from pipelines.training.config import TRIAL_MAX_ITERS, load_train_config
from pipelines.training.job import registered_name


@pytest.mark.parametrize(("overrides", "expected"), [
    ([], "deeplab"),  # the demo's 1500 iterations
    ([f"optim.max_iters={TRIAL_MAX_ITERS - 1}"], None),  # a trial
    ([f"optim.max_iters={TRIAL_MAX_ITERS}"], "deeplab"),
    (["optim.max_iters=20", "tracking.register=always"], "deeplab"),
    (["tracking.register=never"], None),
    (["tracking.register=always", "tracking.registered_model=null"], None),
])
def test_auto_registers_unless_a_trial(overrides, expected, capsys):
    assert registered_name(load_train_config(None, overrides)) == expected
    said = capsys.readouterr().out
    assert ("a trial run" in said) == (overrides == [f"optim.max_iters={TRIAL_MAX_ITERS - 1}"])


def test_an_unknown_rule_is_refused():
    with pytest.raises(ConfigError, match="register"):
        load_train_config(None, ["tracking.register=sometimes"])
