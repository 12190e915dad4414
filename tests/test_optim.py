"""The optimization vocabulary shared by `drift train` and `drift online`: one declaration, the
online preset, one validation, [train] reaching online arms, and one normalization."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from accelerate import Accelerator
from conftest import make_model
from transformers import TrainingArguments

from drift import DriftError
from drift.arms import make_arm
from drift.config import build
from drift.online.config import OnlineConfig
from drift.online.policy import Policy
from drift.pipeline import RunConfig
from drift.train.data import Example, collate
from drift.train.loss import row_share, token_weights
from drift.train.optim import ONLINE_PRESET, OPTIM_KEYS, OptimConfig
from drift.train.trainer import TrainConfig, WeightedTrainer


def test_one_declaration_with_the_offline_defaults_and_the_online_preset():
    offline, online = TrainConfig(), OnlineConfig(output="o")
    shared = {f.name: f for f in dataclasses.fields(OptimConfig)}
    for name in OPTIM_KEYS:
        expected = ONLINE_PRESET.get(name, getattr(OptimConfig(), name))
        assert getattr(online, name) == expected, name
        assert getattr(offline, name) == getattr(OptimConfig(), name), name
        if name != "dtype":  # the online arm's dtype is also its generation dtype: the rollout's key
            help_of = {f.name: f.metadata["help"] for f in dataclasses.fields(OnlineConfig)}
            assert help_of[name] == shared[name].metadata["help"], name
    # the defaults each had before the keys were shared
    assert (offline.lr, offline.weight_decay, offline.lora_dropout, offline.negative_nll_cap) == (1e-5, 0.1, 0.05, 5.0)
    assert (offline.lr_scheduler, offline.warmup_ratio) == ("constant_with_warmup", 0.1)
    assert (online.lr, online.weight_decay, online.lora_dropout, online.negative_nll_cap) == (1e-6, 0.01, 0.0, None)
    assert (online.lr_scheduler, online.warmup_ratio) == ("constant", 0.0)


@pytest.mark.parametrize("key,value,message", [
    ("lr", 0, "'lr' must be a finite number > 0"),
    ("weight_decay", -1, "'weight_decay' must be a finite number >= 0"),
    ("max_grad_norm", float("nan"), "'max_grad_norm' must be a finite number >= 0"),
    ("negative_nll_cap", -0.5, "'negative_nll_cap' must be a finite number >= 0"),
    ("max_length", 0, "'max_length' must be >= 1"),
    ("lora_alpha", 0, "'lora_alpha' must be >= 1"),
    ("warmup_ratio", 1.0, r"'warmup_ratio' must be in \[0, 1\)"),
    ("lr_scheduler", "sideways", "'lr_scheduler' must be one of"),
])
def test_both_stages_refuse_a_bad_optimization_key_with_the_same_line(tmp_path, key, value, message):
    from drift.train.trainer import _check

    with pytest.raises(DriftError, match=message):
        OnlineConfig(output="o", **{key: value})
    with pytest.raises(DriftError, match=message):
        _check(TrainConfig(data=str(tmp_path / "w.jsonl"), **{key: value}))


def _online_arm(run_data):
    run = build(RunConfig, run_data)
    return make_arm("online", run.arms["online"]).online_config(run)


def test_train_table_reaches_an_online_arm_and_its_own_table_wins(tmp_path):
    base = {"output": str(tmp_path / "run"), "rollout": {"tasks": "mc-arith", "n": 2}}
    plain = _online_arm({**base, "arms": {"online": {"method": "online"}}})
    assert (plain.lr, plain.weight_decay, plain.lora_dropout) == (1e-6, 0.01, 0.0)  # the preset, untouched
    shared = _online_arm({**base, "train": {"lr": 3e-5, "weight_decay": 0.2, "lora": True, "epochs": 3,
                                            "normalize": "mean"},
                          "arms": {"online": {"method": "online", "train": {"max_grad_norm": 0.5},
                                              "online": {"weight_decay": 0.05}}}})
    assert (shared.lr, shared.weight_decay, shared.max_grad_norm, shared.lora) == (3e-5, 0.05, 0.5, True)
    assert shared.normalize == "tokens"  # not an optimization key: offline's `mean` does not reach it


def _rows(seed=0, n=5):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.randint(6, 14)
        ids = [rng.randint(3, 200) for _ in range(length)]
        trained = rng.randint(1, length - 2)
        mask = [0] * (length - trained) + [1] * trained
        rows.append(Example(ids, mask, rng.uniform(-1.5, 2.0), i))
    return rows


def test_token_weights_and_row_shares_by_hand():
    assert token_weights(2.0, [0, 1, 1, 0, 1, 1], "mean") == [0.0, 0.5, 0.5, 0.0, 0.5, 0.5]
    assert token_weights(2.0, [0, 1, 1], "sequences") == [0.0, 1.0, 1.0]
    assert token_weights(2.0, [0, 1, 1], "tokens") == [0.0, 2.0, 2.0]
    assert [row_share(k, 0.3, [0, 1, 1]) for k in ("mean", "sequences", "weight_sum", "tokens")] == [1.0, 1.0, 0.3, 2.0]
    with pytest.raises(ValueError):
        row_share("constant", 0.3, [1])


def test_offline_mean_and_online_sequences_give_the_same_loss_on_the_same_rows(tmp_path, tiny_tokenizer):
    """The trainer's loss (normalize = mean) and the online policy's update loss (normalize =
    sequences, one on-policy step) on the same weighted rows and weights are one number; the
    online `tokens` normalization is another (the test can tell them apart)."""
    rows = _rows()
    pad = tiny_tokenizer.pad_token_id
    model = make_model(tiny_tokenizer, seed=1)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_train_batch_size=len(rows), use_cpu=True,
                             report_to="none")
    trainer = WeightedTrainer(model=model, args=args, train_dataset=rows, processing_class=tiny_tokenizer,
                              normalize="mean")
    batch = collate(rows, pad)
    with torch.no_grad():
        offline = float(trainer.compute_loss(model, batch, num_items_in_batch=trainer.normalizer([batch], "cpu")))

    def online(normalize):
        cfg = OnlineConfig(output=str(tmp_path / "o"), normalize=normalize, micro_batch_size=2, max_grad_norm=0.0,
                           dtype="float32")
        policy = Policy(cfg, make_model(tiny_tokenizer, seed=1), tiny_tokenizer, Accelerator(cpu=True), torch.float32)
        return policy.update(list(rows), None, None, seed=0).loss[0]  # the loss of the first (only) step

    assert math.isclose(online("sequences"), offline, rel_tol=1e-5)
    # tokens: sum_t w_i * NLL_t / trained tokens, by hand from the offline per-token NLLs
    with torch.no_grad():
        logits = make_model(tiny_tokenizer, seed=1)(input_ids=batch["input_ids"],
                                                    attention_mask=batch["attention_mask"]).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                            ignore_index=-100, reduction="none")
    weights = torch.tensor([r.weight for r in rows])[:, None] * (batch["labels"][:, 1:] != -100)
    by_hand = float((weights * nll).sum() / sum(sum(r.mask) for r in rows))
    assert math.isclose(online("tokens"), by_hand, rel_tol=1e-5)
    assert not math.isclose(by_hand, offline, rel_tol=1e-3)


def test_a_constant_online_rate_is_recorded_as_before_the_schedule_keys_were_shared():
    from drift.config import settings

    plain = settings(OnlineConfig(output="o"))
    assert "lr_scheduler" not in plain and "warmup_ratio" not in plain and plain["lr"] == 1e-6
    warm = settings(OnlineConfig(output="o", lr_scheduler="linear", warmup_ratio=0.25))
    assert (warm["lr_scheduler"], warm["warmup_ratio"]) == ("linear", 0.25)
    offline = settings(TrainConfig(lr_scheduler="constant", warmup_ratio=0.0))
    assert (offline["lr_scheduler"], offline["warmup_ratio"]) == ("constant", 0.0)  # offline records always had them
