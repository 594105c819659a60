"""Training pieces (LR schedule, EMA, precision, labels), the training loop (loss falls on digits,
checkpoint callbacks, resume), checkpoints."""

import json

import numpy as np
import pytest
import torch

from raycollapse.diffusion.checkpoint import load_checkpoint, model_meta, read_meta, save_checkpoint
from raycollapse.diffusion.sampling import (
    diffusion_loss,
    images_to_tensor,
    make_scheduler,
    sample_images,
)
from raycollapse.diffusion.train_parts import (
    EMA,
    IndexStream,
    autocast_dtype,
    check_labels,
    make_lr_schedule,
    make_optimizer,
    resolve_device,
)
from raycollapse.diffusion.trainer import state_file, train_loop
from raycollapse.diffusion.unet import build_unet
from raycollapse.errors import UserInputError

torch.set_num_threads(1)  # 2 threads on 2 shared cores oversubscribe: up to 40x slower


def _digits(n=None):
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = np.round(d.images * 255 / 16).astype(np.uint8)[:, :, :, None]
    return (
        (imgs, d.target.astype(np.int64))
        if n is None
        else (imgs[:n], d.target[:n].astype(np.int64))
    )


def test_warmup_then_cosine():
    opt = make_optimizer(torch.nn.Linear(2, 2), lr=1.0)
    sched = make_lr_schedule(opt, warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lrs[9] == pytest.approx(0.5)  # half way through the cosine
    assert lrs[4:] == sorted(lrs[4:], reverse=True)


def test_ema_ramp_and_average():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the ramp
    with torch.no_grad():
        model.weight.fill_(10.0)
    ema.update(model)  # 0.1 * 0 + 0.9 * 10
    assert ema.shadow[0].item() == pytest.approx(9.0)
    target = torch.nn.Linear(1, 1, bias=False)
    ema.copy_to(target)
    assert target.weight.item() == pytest.approx(9.0)
    with pytest.raises(UserInputError):
        EMA(model, decay=1.0)


def test_precision_and_device_rules():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("no", cpu) is None
    with pytest.raises(UserInputError, match="needs CUDA"):
        autocast_dtype("bf16", cpu)
    assert resolve_device(False) == cpu


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal of use_gpu on a machine without CUDA"
)
def test_gpu_refused_without_cuda():
    with pytest.raises(UserInputError, match="CUDA is not available"):
        resolve_device(True)


def test_label_checks():
    check_labels(None, class_conditional=False, num_classes=10)
    with pytest.raises(UserInputError, match="have no label"):
        check_labels(np.array([0, -1]), class_conditional=True, num_classes=10)
    with pytest.raises(UserInputError, match="labels go up to 12"):
        check_labels(np.array([0, 12]), class_conditional=True, num_classes=10)


def test_index_stream_spans_epochs():
    s = IndexStream(3, seed=0)
    batch = s.next(7)
    assert len(batch) == 7 and sorted(batch[:3]) == [0, 1, 2] and sorted(batch[3:6]) == [0, 1, 2]


def _eval_loss(model, sched, images):
    """The loss on fixed (image, noise, timestep) triples: the same draws for every model."""
    x = images_to_tensor(images)
    model.eval()
    with torch.no_grad():
        return float(
            np.mean(
                [
                    diffusion_loss(model, sched, x, generator=torch.Generator().manual_seed(s))
                    for s in range(4)
                ]
            )
        )


def test_loss_falls_on_digits():
    """120 steps cut the loss on 4 x 512 fixed draws ~7x (0.94 -> 0.14); asked: more than 3x."""
    imgs, _ = _digits()
    sched = make_scheduler()
    model = build_unet("tiny", resolution=8, channels=1, seed=0)
    before = _eval_loss(model, sched, imgs[:512])
    ema, res = train_loop(
        model, imgs, None, noise_scheduler=sched, steps=120, batch_size=16, lr=2e-3,
        warmup_steps=10, seed=0,
    )  # fmt: skip
    assert res.steps == 120 and len(res.losses) == 120 and res.start_step == 0
    assert res.images_per_second > 0
    ema.copy_to(model)
    after = _eval_loss(model, sched, imgs[:512])
    assert after < before / 3, (before, after)


def _tiny_run(**over):
    imgs, labels = _digits(40)
    kw = dict(
        noise_scheduler=make_scheduler(), steps=6, batch_size=8, lr=1e-3, warmup_steps=2, seed=3,
        class_conditional=True, num_classes=10, label_dropout=0.2,
    )  # fmt: skip
    model = build_unet("tiny", resolution=8, channels=1, class_conditional=True, seed=0)
    ema, res = train_loop(model, imgs, labels, **{**kw, **over})
    return model, ema, res


def test_checkpoint_and_step_callbacks():
    seen, saved = [], []

    def on_step(state):
        seen.append((state.step, state.losses[-1]))

    def on_checkpoint(state, final):
        saved.append((state.step, final, len(state.losses)))

    _, _, res = _tiny_run(
        steps=5, checkpoint=on_checkpoint, checkpoint_every=2, callbacks=[on_step]
    )
    assert seen == list(enumerate(res.losses, start=1))
    assert saved == [(2, False, 2), (4, False, 4), (5, True, 5)]  # every 2 steps, and the end
    # the loss recorded (and checked for divergence) is the all-reduced one
    _, _, halved = _tiny_run(steps=5, all_reduce_loss=lambda loss: loss / 2)
    assert halved.losses == [x / 2 for x in res.losses]


def test_resume_gives_the_same_weights(tmp_path):
    straight, ema_a, res_a = _tiny_run()

    class Crash(Exception):
        pass

    def crash_at_5(state):
        if state.step == 5:
            raise Crash

    identity = {"steps": 6, "run": "a"}
    path = tmp_path / "state.pt"
    resume, save = state_file(path, identity)
    assert resume is None
    with pytest.raises(Crash):
        _tiny_run(resume=resume, checkpoint=save, checkpoint_every=3, callbacks=[crash_at_5])
    resume, save = state_file(path, identity)
    assert resume["step"] == 3
    resumed, ema_b, res_b = _tiny_run(resume=resume, checkpoint=save, checkpoint_every=3)
    assert res_b.start_step == 3 and res_b.losses == res_a.losses
    for pa, pb in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert all(torch.equal(a, b) for a, b in zip(ema_a.shadow, ema_b.shadow, strict=True))
    with pytest.raises(UserInputError, match="belongs to another run"):
        state_file(path, {**identity, "steps": 7})


def _meta(**over):
    from types import SimpleNamespace

    model = SimpleNamespace(preset="tiny", class_conditional=True, num_classes=10)
    data = SimpleNamespace(resolution=8, channels=1)
    return {**model_meta(model, data), **over}


def test_save_load_gives_identical_outputs(tmp_path):
    model = build_unet("tiny", resolution=8, channels=1, class_conditional=True, seed=5).eval()
    sched = make_scheduler(num_train_timesteps=50)
    path = save_checkpoint(
        tmp_path / "ckpt", model, sched, {**_meta(), "steps": 0}, config_yaml="seed: 0\n"
    )
    ckpt = load_checkpoint(path, expect=_meta())
    assert (tmp_path / "ckpt" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "ckpt" / "config.yaml").read_text() == "seed: 0\n"
    assert ckpt.null_label == 10 and ckpt.scheduler.config.num_train_timesteps == 50
    kw = dict(seed=2, steps=3, group_size=4, null_label=10, labels_for=lambda g: g % 10)
    a = sample_images(model, sched, range(5), guidance=1.5, **kw)
    b = sample_images(ckpt.unet, ckpt.scheduler, range(5), guidance=1.5, **kw)
    assert np.array_equal(a, b)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    with torch.no_grad():
        y = torch.tensor([1, 2])
        assert torch.equal(
            model(x, t, class_labels=y).sample, ckpt.unet(x, t, class_labels=y).sample
        )
    # saving again replaces the folder atomically, leaving no temporary folders behind
    save_checkpoint(tmp_path / "ckpt", model, sched, {**_meta(), "steps": 1})
    assert read_meta(tmp_path / "ckpt")["steps"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_refusals(tmp_path):
    model = build_unet("tiny", resolution=8, channels=1, class_conditional=True, seed=5)
    path = save_checkpoint(tmp_path / "ckpt", model, make_scheduler(), _meta())
    with pytest.raises(UserInputError) as err:
        load_checkpoint(path, expect=_meta(preset="unet32", resolution=32))
    msg = str(err.value)
    assert (
        "preset is 'tiny' (requested 'unet32')" in msg and "resolution is 8 (requested 32)" in msg
    )
    with pytest.raises(UserInputError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(UserInputError, match="not a raycollapse checkpoint"):
        load_checkpoint(tmp_path)
    meta_file = tmp_path / "ckpt" / "raycollapse.json"
    meta_file.write_text(json.dumps({**_meta(), "preset": "unet32"}))
    with pytest.raises(UserInputError, match="does not match its raycollapse.json"):
        load_checkpoint(path)
    meta_file.write_text("{")
    with pytest.raises(UserInputError, match="not valid JSON"):
        load_checkpoint(path)


def test_adam_betas_and_raw_weights():
    """train.adam_beta1/2 reach AdamW; sample_from=raw keeps no EMA and copy_to leaves the trained
    weights, while ema averages them (a bug ignoring either setting fails here)."""
    imgs, _ = _digits(16)
    sched = make_scheduler(10)
    seen = {}

    def capture(state):
        seen["betas"] = state.optimizer.param_groups[0]["betas"]
        seen["shadow"] = len(state.ema.shadow)

    raw_model = build_unet("tiny", resolution=8, channels=1, seed=0)
    ema, _ = train_loop(
        raw_model, imgs, None, noise_scheduler=sched, steps=3, batch_size=4, lr=1e-3,
        adam_beta1=0.95, adam_beta2=0.99, sample_from="raw", callbacks=[capture],
    )  # fmt: skip
    assert seen == {"betas": (0.95, 0.99), "shadow": 0}
    trained = {k: v.clone() for k, v in raw_model.state_dict().items()}
    ema.copy_to(raw_model)
    assert all(torch.equal(trained[k], v) for k, v in raw_model.state_dict().items())

    ema_model = build_unet("tiny", resolution=8, channels=1, seed=0)
    ema2, _ = train_loop(ema_model, imgs, None, noise_scheduler=sched, steps=3, batch_size=4,
                         lr=1e-3, adam_beta1=0.95, adam_beta2=0.99)  # fmt: skip
    # same seeds and settings: the raw weights are identical; the EMA differs from them
    assert all(torch.equal(trained[k], v) for k, v in ema_model.state_dict().items())
    ema2.copy_to(ema_model)
    assert not all(torch.equal(trained[k], v) for k, v in ema_model.state_dict().items())
    with pytest.raises(UserInputError, match="adam_beta1"):
        make_optimizer(ema_model, 1e-3, 0.0, (1.0, 0.999))
    with pytest.raises(UserInputError, match="sample_from"):
        train_loop(ema_model, imgs, None, noise_scheduler=sched, steps=1, batch_size=4, lr=1e-3,
                   sample_from="last")  # fmt: skip
