"""The PyTorch reference training steps and inference, timed on THIS machine.

kdjax never imports torch; this tool runs in a separate torch environment so
that kdjax's throughput (tools/benchmark.py) is
compared with the reference code on the same machine, at the same moment:

    python3 -m venv torch-venv && torch-venv/bin/pip install torch torchvision
    torch-venv/bin/python tools/bench_torch_reference.py --models rd4ad,S,M

What is timed, following the reference code step by step (random weights; the
speed does not depend on their values), fp32, 256x256:

* ``rd4ad``: hq-deng/RD4AD ``main.py``: the teacher wide_resnet50_2 in eval
  mode (the reference's encoder also runs layer4, which no map uses;
  ``--rd_layer4=False`` drops it; its parameters keep requires_grad, so the
  backward pass also runs through the teacher, as in the reference;
  ``--rd_teacher_no_grad`` freezes it), OCBE + decoder in train mode, the
  flattened cosine loss over 3 scales, Adam(0.005, (0.5, 0.999)), batch 8.
  Inference: teacher, OCBE, decoder, per-pixel cosine maps, bilinear
  (align_corners=True) upsampling and sum, scipy's gaussian_filter(sigma=4)
  per image, as ``cal_anomaly_map`` + ``evaluation`` do.
* ``S`` / ``M``: nelson1425/EfficientAD ``efficientad.py``: one training
  step at batch 1 (teacher under no_grad on the image and the augmented
  image, student on both, autoencoder, hard loss with torch.quantile 0.999,
  AE and student-AE losses, Adam 1e-4 / wd 1e-5, StepLR), no penalty images
  (``--imagenet_train_path none``). Inference: ``predict`` on a batch of 8
  (teacher, student, autoencoder, both maps, padding and upsampling).

The networks are the ones of tools/make_golden.py (structure copied from the
reference code), at full width. Prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden import BNLayer, Decoder, pdn  # noqa: E402


def _timed(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _median_ms(fn, warmup: int, reps: int) -> float:
    """Median wall time of one call, in ms (latency: each call timed on its own)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _train_time(step, args) -> float:
    return float("nan") if args.no_train else _timed(step, args.warmup, args.steps)


def _latency(infer, args) -> dict:
    """``--latency_reps N``: the median of N batch-1 inference calls after 3 warm-ups."""
    if not args.latency_reps:
        return {}
    return {"latency_batch": 1, "latency_reps": args.latency_reps,
            "latency_ms_median": _median_ms(lambda: infer(1), 3, args.latency_reps)}


def bench_rd4ad(args) -> dict:
    from torchvision.models import wide_resnet50_2

    teacher = wide_resnet50_2().eval()
    ocbe, decoder = BNLayer(1), Decoder(1)
    ocbe.train(), decoder.train()
    opt = torch.optim.Adam(list(decoder.parameters()) + list(ocbe.parameters()),
                           lr=0.005, betas=(0.5, 0.999))
    b, s = args.rd_batch, args.image_size
    x = torch.randn(b, 3, s, s)

    def encode(img):
        t = teacher
        h = t.maxpool(t.relu(t.bn1(t.conv1(img))))
        f1 = t.layer1(h)
        f2 = t.layer2(f1)
        f3 = t.layer3(f2)
        if args.rd_layer4:
            t.layer4(f3)  # computed and discarded, as the reference's encoder does
        return [f1, f2, f3]

    def loss_fn(a, bb):
        cos = nn.CosineSimilarity()
        return sum(torch.mean(1 - cos(a[i].view(a[i].shape[0], -1), bb[i].view(bb[i].shape[0], -1)))
                   for i in range(len(a)))

    teacher.requires_grad_(not args.rd_teacher_no_grad)

    def step():
        # The reference leaves the teacher's requires_grad on: backward also runs
        # through the teacher (its gradients are never used). --rd_teacher_no_grad
        # times the cheaper, equivalent variant.
        inputs = encode(x)
        out = decoder(ocbe(inputs))
        outputs = [out["layer1"], out["layer2"], out["layer3"]]
        loss = loss_fn(inputs, outputs)
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_s = _train_time(step, args)

    from scipy.ndimage import gaussian_filter

    xe = torch.randn(args.infer_batch, 3, s, s)
    ocbe.eval(), decoder.eval()

    def infer(n=None):
        x = xe if n is None else xe[:n]
        with torch.no_grad():
            inputs = encode(x)
            out = decoder(ocbe(inputs))
            outputs = [out["layer1"], out["layer2"], out["layer3"]]
            amap = 0
            for fs, ft in zip(inputs, outputs):
                m = 1 - F.cosine_similarity(fs, ft)
                amap = amap + F.interpolate(m[:, None], size=s, mode="bilinear",
                                            align_corners=True)[:, 0]
            amap = amap.numpy()
        return [gaussian_filter(m, sigma=4) for m in amap]

    infer_s = _timed(infer, 1, args.infer_reps)
    return {**_latency(infer, args),
            "model": "RD4AD (reference PyTorch)", "train_images_per_s": b / train_s,
            "train_batch_size": b, "teacher_layer4": bool(args.rd_layer4),
            "teacher_backward": not args.rd_teacher_no_grad,
            "infer_images_per_s": args.infer_batch / infer_s, "infer_batch_size": args.infer_batch}


def autoencoder(out_channels=384):
    """The reference ``get_autoencoder`` (with Dropout 0.2)."""
    L = []
    for cin, cout in ((3, 32), (32, 32), (32, 64), (64, 64), (64, 64)):
        L += [nn.Conv2d(cin, cout, 4, 2, 1), nn.ReLU(inplace=True)]
    L += [nn.Conv2d(64, 64, 8)]
    for size in (3, 8, 15, 32, 63, 127):
        L += [nn.Upsample(size=size, mode="bilinear"), nn.Conv2d(64, 64, 4, 1, 2),
              nn.ReLU(inplace=True), nn.Dropout(0.2)]
    L += [nn.Upsample(size=56, mode="bilinear"), nn.Conv2d(64, 64, 3, 1, 1), nn.ReLU(inplace=True),
          nn.Conv2d(64, out_channels, 3, 1, 1)]
    return nn.Sequential(*L)


def bench_efficientad(size: str, args) -> dict:
    from torchvision import transforms

    c = 384
    teacher, student, ae = pdn(size, 1, c).eval(), pdn(size, 1, 2 * c).train(), autoencoder(c).train()
    t_mean, t_std = torch.zeros(1, c, 1, 1), torch.ones(1, c, 1, 1)
    steps = 70000
    opt = torch.optim.Adam(list(student.parameters()) + list(ae.parameters()), lr=1e-4,
                           weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(0.95 * steps), gamma=0.1)
    s = args.image_size
    jitter = transforms.RandomChoice([transforms.ColorJitter(brightness=0.2),
                                      transforms.ColorJitter(contrast=0.2),
                                      transforms.ColorJitter(saturation=0.2)])
    img = torch.rand(1, 3, s, s)

    def step():
        image_st = img
        image_ae = jitter(img)
        with torch.no_grad():
            t_st = (teacher(image_st) - t_mean) / t_std
        s_st = student(image_st)[:, :c]
        d_st = (t_st - s_st) ** 2
        d_hard = torch.quantile(d_st, q=0.999)
        loss_st = torch.mean(d_st[d_st >= d_hard])
        ae_out = ae(image_ae)
        with torch.no_grad():
            t_ae = (teacher(image_ae) - t_mean) / t_std
        s_ae = student(image_ae)[:, c:]
        loss = loss_st + torch.mean((t_ae - ae_out) ** 2) + torch.mean((ae_out - s_ae) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    train_s = _train_time(step, args)
    teacher.eval(), student.eval(), ae.eval()
    xe = torch.randn(args.infer_batch, 3, s, s)

    def infer(n=None):
        x = xe if n is None else xe[:n]
        with torch.no_grad():
            t = (teacher(x) - t_mean) / t_std
            so = student(x)
            ao = ae(x)
            m_st = torch.mean((t - so[:, :c]) ** 2, dim=1, keepdim=True)
            m_ae = torch.mean((ao - so[:, c:]) ** 2, dim=1, keepdim=True)
            m = F.pad(0.5 * m_st + 0.5 * m_ae, (4, 4, 4, 4))
            return F.interpolate(m, (s, s), mode="bilinear")

    infer_s = _timed(infer, 1, args.infer_reps)
    return {**_latency(infer, args), "model": f"EfficientAD-{size} (reference PyTorch)", "train_steps_per_s": 1 / train_s,
            "train_batch_size": 1, "infer_images_per_s": args.infer_batch / infer_s,
            "infer_batch_size": args.infer_batch}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="rd4ad,S,M", help="rd4ad, S, M (comma-separated)")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--rd_batch", type=int, default=8)
    p.add_argument("--rd_layer4", type=lambda v: v.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--rd_teacher_no_grad", action="store_true")
    p.add_argument("--infer_batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--infer_reps", type=int, default=2)
    p.add_argument("--latency_reps", type=int, default=0,
                   help="also the median latency of this many batch-1 inference calls")
    p.add_argument("--no_train", action="store_true", help="skip the training steps")
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.manual_seed(0)
    results = []
    for m in args.models.split(","):
        m = m.strip()
        load = os.getloadavg()
        r = bench_rd4ad(args) if m.lower() == "rd4ad" else bench_efficientad(m.upper(), args)
        r.update(torch=torch.__version__, threads=torch.get_num_threads(),
                 cpu_count=os.cpu_count(), host=platform.node(), image_size=args.image_size,
                 loadavg_before=load, loadavg_after=os.getloadavg())
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
