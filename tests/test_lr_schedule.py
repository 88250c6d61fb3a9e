"""train.lr_schedule: constant / cosine / linear after a linear warmup, and a resume that continues the same
learning-rate sequence as an uninterrupted run (the tokenizer's two curves: test_trainer.test_resume_is_bit_exact)."""
import math

import pytest
from test_prior_trainer import fit as fit_prior
from test_prior_trainer import make_tokens, train_records
from test_prior_trainer import tiny_cfg as prior_cfg
from test_trainer import stop_after

from movq.config import ConfigError
from movq.training.run import lr_lambda, warmup_lambda


def test_the_schedules_shapes():
    f = lr_lambda("cosine", warmup_steps=2, total_steps=12, min_ratio=0.1)
    assert [f(k) for k in range(2)] == [0.5, 1.0]  # warmup: (k + 1) / warmup
    assert f(2) == 1.0  # the first step after the warmup is at the peak
    assert f(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert f(12) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)  # min_lr_ratio from total_steps on
    g = lr_lambda("linear", warmup_steps=0, total_steps=10)
    assert [g(k) for k in (0, 5, 10, 11)] == [1.0, 0.5, 0.0, 0.0]
    values = [f(k) for k in range(2, 13)]
    assert values == sorted(values, reverse=True)  # decays monotonically
    # constant is today's warmup-then-flat curve
    assert [lr_lambda("constant", 3, 10)(k) for k in range(6)] == [warmup_lambda(3)(k) for k in range(6)]
    assert [warmup_lambda(3)(k) for k in range(5)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert warmup_lambda(0)(0) == 1.0
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        lr_lambda("step", 0, 10)
    with pytest.raises(ValueError, match="min_lr_ratio must lie in"):
        lr_lambda("cosine", 0, 10, min_ratio=1.5)


def test_an_unknown_schedule_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="lr_schedule.*not one of"):
        prior_cfg(tmp_path / "run", tmp_path, lr_schedule="exponential")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_tokens(tmp_path_factory.mktemp("tokens") / "tokens")


def test_prior_resume_gives_the_uninterrupted_lr_sequence(tmp_path, tokens, monkeypatch):
    kw = dict(lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    straight, _ = fit_prior(prior_cfg(tmp_path / "a", tokens, **kw))
    with monkeypatch.context() as m:
        stop_after(m, 3)
        assert fit_prior(prior_cfg(tmp_path / "b", tokens, **kw))[1]["steps"] == 3
    resumed, _ = fit_prior(prior_cfg(tmp_path / "b", tokens, resume="latest", **kw))
    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    assert [a[s]["lr"] for s in range(1, 7)] == [b[s]["lr"] for s in range(1, 7)]
    # the logged lr is the one of the next step: lr · f(step)
    f = lr_lambda("cosine", 2, 6, 0.1)
    assert [a[s]["lr"] for s in range(1, 7)] == pytest.approx([1e-3 * f(s) for s in range(1, 7)])
    assert straight.sched.state_dict()["last_epoch"] == resumed.sched.state_dict()["last_epoch"] == 6
    state = (tmp_path / "b" / "checkpoints" / "0000006" / "trainer_state.json").read_text()
    assert '"lr_schedule": "cosine"' in state


def test_prior_resume_with_another_schedule_says_so(tmp_path, tokens, capsys):
    fit_prior(prior_cfg(tmp_path / "b", tokens, max_steps=3))
    capsys.readouterr()
    fit_prior(prior_cfg(tmp_path / "b", tokens, max_steps=4, resume="latest", lr_schedule="linear"))
    assert "warning: resuming with another LR schedule" in capsys.readouterr().out
