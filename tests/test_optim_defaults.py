"""Optimiser defaults follow the optimiser, are resolved into the config (and its hash), and
every optimiser field has a named CLI flag."""

from __future__ import annotations

from typer.testing import CliRunner

from imlt.trainer.cli import app
from imlt.trainer.config import OPTIM_DEFAULTS, OptimizerName, load_config


def test_defaults_follow_the_optimiser() -> None:
    sgd = load_config({"output_dir": "/tmp/x"})
    adamw = load_config({"output_dir": "/tmp/x", "optim": {"optimizer": "AdamW"}})
    assert (sgd.optim.lr, sgd.optim.weight_decay, sgd.optim.warmup_epochs) == (0.1, 5e-4, 1) == OPTIM_DEFAULTS[OptimizerName.SGD]
    assert (adamw.optim.lr, adamw.optim.weight_decay, adamw.optim.warmup_epochs) == (1e-3, 1e-4, 0) == OPTIM_DEFAULTS[OptimizerName.ADAMW]


def test_explicit_values_win_and_resolved_config_round_trips_with_the_same_hash() -> None:
    cfg = load_config({"output_dir": "/tmp/x"}, {"optim.optimizer": "AdamW", "optim.weight_decay": 0.05})
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-3, 0.05)
    dumped = cfg.dump()
    assert dumped["optim"]["lr"] == 1e-3  # the saved config carries the number used, not None
    again = load_config({k: v for k, v in dumped.items() if k != "config_hash"})
    assert again.config_hash() == cfg.config_hash() == dumped["config_hash"]


def test_implicit_sgd_defaults_hash_like_the_numbers_written_out() -> None:
    """The hash is of the resolved numbers: a run that leaves the defaults implicit resumes one that wrote them out."""
    implicit = load_config({"output_dir": "/tmp/x"})
    explicit = load_config({"output_dir": "/tmp/x", "optim": {"lr": 0.1, "weight_decay": 5e-4, "warmup_epochs": 1}})
    assert implicit.config_hash() == explicit.config_hash()


def test_every_optimiser_field_has_a_named_cli_flag() -> None:
    out = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    for flag in ("--optimizer", "--lr", "--momentum", "--weight-decay", "--scheduler", "--warmup-epochs"):
        assert flag in out, flag
