"""open_clip's own trainer, unmodified, with our objectives (python -m amorlip.open_clip_train): it runs, logs and
checkpoints in open_clip's layout, and its loss at step 0 equals ours on the same batch."""
import copy
import logging
import re

import pytest
import torch

import amorlip
from amorlip.data.writers import write_synthetic_csv
from amorlip.loss import ContrastiveLoss
from amorlip.open_clip_train import main

pytest.importorskip("open_clip_train")
BATCH, PAIRS = 16, 32  # two steps


@pytest.fixture
def csv_dir(tmp_path, monkeypatch):
    write_synthetic_csv(tmp_path, PAIRS)
    monkeypatch.chdir(tmp_path)  # the CSV's image paths are relative to it
    yield tmp_path
    for handler in logging.root.handlers[:]:  # open_clip's setup_logging configures the root logger
        logging.root.removeHandler(handler)


def open_clip_flags(name, epochs=1):
    return ["--model", "tiny-vit", "--train-data", "train.csv", "--dataset-type", "csv", "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--csv-separator", ",", "--batch-size", str(BATCH), "--epochs", str(epochs),
            "--workers", "0", "--lr", "1e-3", "--warmup", "1", "--logs", "logs", "--name", name,
            "--log-every-n-steps", "1", "--save-frequency", "1", "--device", "cpu", "--seed", "0", "--precision", "fp32"]


@pytest.mark.parametrize("objective, ours", [
    ("amorlip", ["--amor.t-online", "1", "--temperature-scheme", "rescaled", "--rho", "2.0"]),
    ("clip", []),
    ("siglip", []),
    ("neuclip", ["--neuclip.num-prototypes", "8"]),
])
def test_open_clip_trainer_with_our_objective(objective, ours, csv_dir, monkeypatch):
    calls = []
    forward = ContrastiveLoss.forward

    def recording(self, *args, **kwargs):
        before = copy.deepcopy(self.state_dict())
        out = forward(self, *args, **kwargs)
        if kwargs.get("output_dict"):  # a call of open_clip's trainer
            calls.append({"state": before, "args": args,
                          "kwargs": {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()},
                          "loss": out["contrastive_loss"].detach()})
        return out

    monkeypatch.setattr(ContrastiveLoss, "forward", recording)
    main(["--objective", objective, *ours, *open_clip_flags(objective)])

    run = csv_dir / "logs" / objective
    log = (run / "out.log").read_text()
    logged = [float(v) for v in re.findall(r" Loss: (\S+) ", log)]
    assert len(calls) == len(logged) == PAIRS // BATCH, log[-2000:]
    checkpoint = torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=False)
    assert {"epoch", "name", "state_dict", "optimizer"} <= set(checkpoint) and checkpoint["epoch"] == 1
    if objective == "siglip":
        assert "logit_bias" in checkpoint["state_dict"], "--siglip was added for the model's bias"

    # step 0: our loss, fresh from the factory with the same state, on the same batch
    first = calls[0]
    kwargs = {k: v for k, v in first["kwargs"].items() if k != "output_dict"}
    options = {"amorlip": {"t_online": 1}, "neuclip": {"num_prototypes": 8}}.get(objective)
    scheme = {"temperature": "rescaled", "rho": 2.0} if objective == "amorlip" else {}
    fresh = amorlip.make_loss(objective, dataset_size=PAIRS, steps_per_epoch=PAIRS // BATCH,
                              total_steps=PAIRS // BATCH, embed_dim=kwargs["image_features"].shape[1],
                              local_batch_size=BATCH, options=options, **scheme)
    fresh.load_state_dict(first["state"])
    reference = fresh(**kwargs)
    torch.testing.assert_close(first["loss"], reference, rtol=0, atol=0)
    assert logged[0] == pytest.approx(float(reference), rel=1e-4)  # open_clip logs 5 significant digits

    objective_state = torch.load(run / "objective" / "epoch_1.pt", weights_only=False)
    fresh.load_state_dict(objective_state)
    assert fresh.step == PAIRS // BATCH, "the objective's state (and step) is saved beside open_clip's checkpoint"


@pytest.mark.parametrize("words, match", [
    (["--objective", "fastclip"], "needs each sample's dataset index"),
    (["--objective", "sogclr"], "amorlip train --objective sogclr"),
    (["--objective", "amorlip", "--accum-freq", "2"], "--train.accum-steps"),
    (["--objective", "amorlip", "--clip.tile-size", "0"], "amorlip's options are --amor.KEY"),
    (["--model", "tiny-vit"], "--objective NAME is required"),
    (["--objective", "infonce"], "unknown objective 'infonce'"),
])
def test_refused_up_front(words, match):
    with pytest.raises(amorlip.ConfigError, match=match):
        main(words)


@pytest.mark.slow
def test_open_clip_resume_latest_continues_the_objective_state(csv_dir, monkeypatch):
    """`--resume latest` after epoch 1: the objective's first call in the resumed run starts from the state saved
    beside open_clip's epoch-1 checkpoint (lambda nets, step), and its step then counts on to epoch 2's end."""
    seen = []
    forward = ContrastiveLoss.forward

    def recording(self, *args, **kwargs):
        if kwargs.get("output_dict"):
            seen.append(copy.deepcopy(self.state_dict()))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ContrastiveLoss, "forward", recording)
    flags = ["--objective", "amorlip", "--amor.t-online", "1"]
    main([*flags, *open_clip_flags("cut", epochs=1)])
    saved = torch.load(csv_dir / "logs" / "cut" / "objective" / "epoch_1.pt", weights_only=False)
    seen.clear()
    main([*flags, *open_clip_flags("cut", epochs=2), "--resume", "latest"])
    assert len(seen) == PAIRS // BATCH  # only epoch 2 was trained
    first = seen[0]
    assert first.keys() == saved.keys()
    for key, value in saved.items():
        if torch.is_tensor(value):
            assert torch.equal(first[key], value), key
    final = torch.load(csv_dir / "logs" / "cut" / "objective" / "epoch_2.pt", weights_only=False)
    fresh = amorlip.make_loss("amorlip", dataset_size=PAIRS, steps_per_epoch=PAIRS // BATCH,
                              total_steps=2 * PAIRS // BATCH, embed_dim=64, local_batch_size=BATCH,
                              options={"t_online": 1})
    fresh.load_state_dict(final)
    assert fresh.step == 2 * PAIRS // BATCH


@pytest.mark.slow
def test_open_clip_mixed_precision_amp(csv_dir):
    """`--precision amp` (autocast; bfloat16 on the CPU): the objective runs inside it and its loss, logged by
    open_clip, and state stay finite."""
    main(["--objective", "amorlip", "--amor.t-online", "1", *open_clip_flags("amp")[:-2], "--precision", "amp"])
    run = csv_dir / "logs" / "amp"
    logged = [float(v) for v in re.findall(r" Loss: (\S+) ", (run / "out.log").read_text())]
    assert len(logged) == PAIRS // BATCH and all(torch.isfinite(torch.tensor(logged)))
    state = torch.load(run / "objective" / "epoch_1.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
