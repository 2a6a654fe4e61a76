"""Generates the golden files of tests/test_weights.py and tests/test_models_rd.py.

Run with the torch venv (torch is never needed by kdjax itself):

    <torch-venv>/bin/python tools/make_golden.py [--out tests/golden]

Writes, for tiny reduced-width networks with the REAL torchvision block
classes and state-dict key names, random weights and non-trivial BatchNorm
statistics, in eval mode:

* ``<name>.pth`` (torch.save zip format; ``resnet18_d16_legacy.pth`` in the
  pre-1.6 format) and ``<name>.npz`` with the NHWC input ``x`` and torch's
  outputs (``layer1``..``layer3``, ``layer4``, ``logits``), for a resnet18-,
  resnet50- and wide_resnet50_2-style net;
* ``rd4ad_d32.pth`` / ``mrkd_d32.pth``: {"bn": OCBE, "decoder": decoder}
  state dicts of the reference RD4AD / MRKD student (structure copied from
  hq-deng/RD4AD ``resnet.BN_layer`` / ``de_resnet`` and yuxin-jiang/MRKD,
  see docs/reference_checkpoints.md), and ``rd_d32.npz`` with random teacher
  features, FLM masks and the student outputs;
* ``pdn_s_d8.pth`` (state dict), ``pdn_s_d8_whole.pth`` (a whole pickled
  nn.Sequential, as torch.save(model) writes it), ``pdn_m_d16.pth`` and
  ``pdn.npz`` with inputs and outputs;
* ``misc.pth`` / ``misc.npz``: float16, bfloat16, 0-d, non-contiguous and
  storage-offset tensors in a nested dict, with their expected values;
* ``efficientad_ref_s_d8/{teacher,student,autoencoder}.pth``: state dicts of
  the reference EfficientAD-S teacher (``get_pdn_small(c)``), student
  (``get_pdn_small(2 c)``) and autoencoder (``get_autoencoder(c)``) of
  nelson1425/EfficientAD ``common.py`` with every width divided by 8 and
  c = 48 / 8 = 6 output channels (He-normal weights, the last layer's / 5, N(0, 0.1) biases, eval mode);
  ``efficientad_ref_s_d8_autoencoder_whole.pth`` the same autoencoder as a
  whole pickled nn.Sequential (``torch.save(autoencoder)``, as the
  reference's efficientad.py saves it); ``efficientad_ref_s_d8.npz`` their
  NHWC outputs on :func:`efficientad_inputs` (numpy RandomState inputs, not
  stored: the test draws them again; ``x_pdn_head`` / ``x_ae_head`` hold their
  first values as a check).

``--only efficientad`` writes only the EfficientAD files (the others stay
byte for byte as they are).

(``tests/golden/reference_keys_*.txt`` are not generated here: they are
copies of the reference key lists (docs/reference_checkpoints.md), the full-width key names
and shapes of the published RD4AD/MRKD code.)
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


def small_resnet(block, layers, d, width_per_group=64, num_classes=10):
    """torchvision ResNet with every width divided by ``d`` (same classes and key names)."""
    net = ResNet(block, layers, num_classes=num_classes, width_per_group=width_per_group)
    # rebuild the trunk with reduced widths using torchvision's own _make_layer
    net.inplanes = 64 // d
    net.conv1 = nn.Conv2d(3, net.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(net.inplanes)
    net.layer1 = net._make_layer(block, 64 // d, layers[0])
    net.layer2 = net._make_layer(block, 128 // d, layers[1], stride=2)
    net.layer3 = net._make_layer(block, 256 // d, layers[2], stride=2)
    net.layer4 = net._make_layer(block, 512 // d, layers[3], stride=2)
    net.fc = nn.Linear(512 // d * block.expansion, num_classes)
    return net


def randomize_bn(model, gen):
    """Non-trivial BatchNorm affine parameters and running statistics."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) + 0.5
            m.bias.data = torch.randn(c, generator=gen) * 0.1
            m.running_mean = torch.randn(c, generator=gen) * 0.1
            m.running_var = torch.rand(c, generator=gen) + 0.5
            m.num_batches_tracked = torch.tensor(7)


def resnet_taps(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = {}
    for i in range(1, 5):
        x = getattr(net, f"layer{i}")(x)
        out[f"layer{i}"] = x
    out["logits"] = net.fc(torch.flatten(net.avgpool(x), 1))
    return out


def nhwc(t):
    t = t.detach().numpy()
    return np.transpose(t, (0, 2, 3, 1)) if t.ndim == 4 else t


# ---------------------------------------------------------------- RD4AD / MRKD reference


def conv3x3(i, o, stride=1):
    return nn.Conv2d(i, o, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(i, o, stride=1):
    return nn.Conv2d(i, o, kernel_size=1, stride=stride, bias=False)


def deconv2x2(i, o, stride=1):
    return nn.ConvTranspose2d(i, o, kernel_size=2, stride=stride, bias=False)


class BNLayer(nn.Module):
    """Reference RD4AD ``BN_layer`` (OCBE) with widths divided by ``d``."""

    def __init__(self, d, layers=3):
        super().__init__()
        e = 4
        self.inplanes = 256 * e // d
        self.base_width = 128
        self.bn_layer = self._make_layer(512 // d, layers, stride=2)
        self.conv1 = conv3x3(64 * e // d, 128 * e // d, 2)
        self.bn1 = nn.BatchNorm2d(128 * e // d)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(128 * e // d, 256 * e // d, 2)
        self.bn2 = nn.BatchNorm2d(256 * e // d)
        self.conv3 = conv3x3(128 * e // d, 256 * e // d, 2)
        self.bn3 = nn.BatchNorm2d(256 * e // d)
        self.conv4 = conv1x1(1024 * e // d, 512 * e // d, 1)  # unused, as in the reference
        self.bn4 = nn.BatchNorm2d(512 * e // d)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = nn.Sequential(conv1x1(self.inplanes * 3, planes * 4, stride), nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes * 3, planes, stride, downsample, 1, self.base_width)]
        self.inplanes = planes * 4
        for _ in range(1, blocks):
            layers.append(Bottleneck(self.inplanes, planes, base_width=self.base_width))
        return nn.Sequential(*layers)

    def forward(self, x):
        l1 = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x[0]))))))
        l2 = self.relu(self.bn3(self.conv3(x[1])))
        feature = torch.cat([l1, l2, x[2]], 1)
        return self.bn_layer(feature).contiguous()


class DeBottleneck(nn.Module):
    """Reference ``de_resnet.Bottleneck`` (conv2 is a 2x2 s2 ConvTranspose when upsampling)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, upsample=None, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = deconv2x2(width, width, stride) if stride == 2 else conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = upsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.upsample is not None:
            identity = self.upsample(x)
        return self.relu(out + identity)


class Decoder(nn.Module):
    """Reference ``de_wide_resnet50_2`` (layers [3, 4, 6]); MRKD adds conv1 (unused) and generation1..3."""

    def __init__(self, d, layers=(3, 4, 6), generation=False):
        super().__init__()
        self.inplanes = 2048 // d
        self.base_width = 128
        if generation:
            self.conv1 = conv1x1(2048 // d, 512 // d)  # defined but unused in MRKD
        self.layer1 = self._make_layer(256 // d, layers[0], stride=2)
        self.layer2 = self._make_layer(128 // d, layers[1], stride=2)
        self.layer3 = self._make_layer(64 // d, layers[2], stride=2)
        self.generation = generation
        if generation:
            for k, c in ((1, 1024 // d), (2, 512 // d), (3, 256 // d)):
                setattr(self, f"generation{k}", nn.Sequential(
                    nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, 1, 1)))

    def _make_layer(self, planes, blocks, stride=1):
        upsample = nn.Sequential(deconv2x2(self.inplanes, planes * 4, stride), nn.BatchNorm2d(planes * 4))
        layers = [DeBottleneck(self.inplanes, planes, stride, upsample, self.base_width)]
        self.inplanes = planes * 4
        for _ in range(1, blocks):
            layers.append(DeBottleneck(self.inplanes, planes, base_width=self.base_width))
        return nn.Sequential(*layers)

    def forward(self, x, masks=None):
        a = self.layer1(x)
        b = self.layer2(a)
        c = self.layer3(b)
        if self.generation:
            m = masks or {}
            a = self.generation1(a * m["layer3"] if "layer3" in m else a)
            b = self.generation2(b * m["layer2"] if "layer2" in m else b)
            c = self.generation3(c * m["layer1"] if "layer1" in m else c)
        return {"layer1": c, "layer2": b, "layer3": a}


def pdn(size, d, out_channels):
    """Reference EfficientAD PDN (padding=False) with hidden widths divided by ``d``."""
    if size == "S":
        c1, c2 = 128 // d, 256 // d
        return nn.Sequential(
            nn.Conv2d(3, c1, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
            nn.Conv2d(c1, c2, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
            nn.Conv2d(c2, c2, 3), nn.ReLU(inplace=True), nn.Conv2d(c2, out_channels, 4))
    c1, c2 = 256 // d, 512 // d
    return nn.Sequential(
        nn.Conv2d(3, c1, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
        nn.Conv2d(c1, c2, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
        nn.Conv2d(c2, c2, 1), nn.ReLU(inplace=True), nn.Conv2d(c2, c2, 3), nn.ReLU(inplace=True),
        nn.Conv2d(c2, out_channels, 4), nn.ReLU(inplace=True), nn.Conv2d(out_channels, out_channels, 1))


def autoencoder(d, out_channels):
    """Reference EfficientAD ``get_autoencoder(out_channels)`` with the widths 32/64 divided by ``d``.

    Same nn.Sequential indices as common.py (convolutions at 0, 2, ..., 10, 12, 16, ..., 36, 38);
    the code convolution keeps its 8x8 kernel (256x256 inputs).
    """
    c32, c64 = 32 // d, 64 // d
    layers = []
    for i, o in ((3, c32), (c32, c32), (c32, c64), (c64, c64), (c64, c64)):
        layers += [nn.Conv2d(i, o, kernel_size=4, stride=2, padding=1), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(c64, c64, kernel_size=8))
    for size in (3, 8, 15, 32, 63, 127):
        layers += [nn.Upsample(size=size, mode="bilinear"),
                   nn.Conv2d(c64, c64, kernel_size=4, stride=1, padding=2), nn.ReLU(inplace=True),
                   nn.Dropout(0.2)]
    layers += [nn.Upsample(size=56, mode="bilinear"),
               nn.Conv2d(c64, c64, kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=True),
               nn.Conv2d(c64, out_channels, kernel_size=3, stride=1, padding=1)]
    return nn.Sequential(*layers)


EFFICIENTAD_D, EFFICIENTAD_OUT_CHANNELS = 8, 48


def efficientad_inputs():
    """NHWC float32 inputs of the EfficientAD golden files (drawn again by tests/test_weights.py)."""
    x_pdn = np.random.RandomState(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    x_ae = np.random.RandomState(1).standard_normal((1, 256, 256, 3)).astype(np.float32)
    return x_pdn, x_ae


def write_efficientad(out):
    """The reference EfficientAD-S teacher / student / autoencoder files (see the module doc)."""
    d, c = EFFICIENTAD_D, EFFICIENTAD_OUT_CHANNELS // EFFICIENTAD_D
    torch.manual_seed(1425)
    nets = {"teacher": pdn("S", d, c), "student": pdn("S", d, 2 * c), "autoencoder": autoencoder(d, c)}
    for net in nets.values():  # He-normal weights, random biases: every layer moves the output
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.normal_(m.bias, std=0.1)
        last = [m for m in net.modules() if isinstance(m, nn.Conv2d)][-1]
        last.weight.data *= 0.2  # outputs of about 0.5: float32 rounding stays well under 1e-5
    x_pdn, x_ae = efficientad_inputs()
    res = {"x_pdn_head": x_pdn.ravel()[:16], "x_ae_head": x_ae.ravel()[:16]}
    folder = out("efficientad_ref_s_d8")
    os.makedirs(folder, exist_ok=True)
    for name, net in nets.items():
        net.eval()
        x = x_ae if name == "autoencoder" else x_pdn
        with torch.no_grad():
            res[name] = nhwc(net(torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))))
        torch.save(net.state_dict(), os.path.join(folder, f"{name}.pth"))
    torch.save(nets["autoencoder"], out("efficientad_ref_s_d8_autoencoder_whole.pth"))
    np.savez(out("efficientad_ref_s_d8.npz"), **res)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "golden"))
    ap.add_argument("--only", choices=("all", "efficientad"), default="all",
                    help="'efficientad': write only the reference EfficientAD files")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    out = lambda name: os.path.join(args.out, name)  # noqa: E731
    if args.only == "efficientad":
        write_efficientad(out)
        print(f"wrote the EfficientAD files to {os.path.abspath(args.out)}")
        return
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=gen)

    nets = {
        "resnet18_d16": small_resnet(BasicBlock, [2, 2, 2, 2], 16),
        "resnet50_d16": small_resnet(Bottleneck, [2, 1, 1, 1], 16),
        "wide_resnet50_2_d16": small_resnet(Bottleneck, [1, 2, 1, 1], 16, width_per_group=128),
    }
    for name, net in nets.items():
        randomize_bn(net, gen)
        net.eval()
        with torch.no_grad():
            taps = resnet_taps(net, x)
        torch.save(net.state_dict(), out(f"{name}.pth"))
        np.savez(out(f"{name}.npz"), x=nhwc(x), **{k: nhwc(v) for k, v in taps.items()})
    torch.save(nets["resnet18_d16"].state_dict(), out("resnet18_d16_legacy.pth"),
               _use_new_zipfile_serialization=False)

    # RD4AD / MRKD student
    d = 32
    feats = [torch.relu(torch.randn(2, c // d, s, s, generator=gen))
             for c, s in ((256, 16), (512, 8), (1024, 4))]
    masks = {tap: (torch.rand(2, 1, s, s, generator=gen) > 0.2).float()
             for tap, s in (("layer1", 16), ("layer2", 8), ("layer3", 4))}
    rd = {"l1": nhwc(feats[0]), "l2": nhwc(feats[1]), "l3": nhwc(feats[2])}
    rd.update({f"mask_{k}": nhwc(v) for k, v in masks.items()})
    for name, generation in (("rd4ad", False), ("mrkd", True)):
        bn, dec = BNLayer(d), Decoder(d, generation=generation)
        randomize_bn(bn, gen)
        randomize_bn(dec, gen)
        bn.eval()
        dec.eval()
        with torch.no_grad():
            z = bn(feats)
            o = dec(z)
            rd.update({f"{name}_{k}": nhwc(v) for k, v in o.items()})
            if generation:
                o = dec(z, masks)
                rd.update({f"{name}_masked_{k}": nhwc(v) for k, v in o.items()})
        torch.save({"bn": bn.state_dict(), "decoder": dec.state_dict()}, out(f"{name}_d32.pth"))
    np.savez(out("rd_d32.npz"), **rd)

    # EfficientAD PDN teachers
    xp = torch.randn(2, 3, 64, 64, generator=gen)
    res = {"x": nhwc(xp)}
    for name, size, dd in (("pdn_s_d8", "S", 8), ("pdn_m_d16", "M", 16)):
        net = pdn(size, dd, 24).eval()
        with torch.no_grad():
            res[name] = nhwc(net(xp))
        torch.save(net.state_dict(), out(f"{name}.pth"))
        if size == "S":
            torch.save(net, out(f"{name}_whole.pth"))
    np.savez(out("pdn.npz"), **res)

    # dtypes, 0-d, strides, storage offsets, nesting
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    misc = {
        "state_dict": {
            "half": (base / 7).half(),
            "bf16": (base / 3).bfloat16(),
            "scalar": torch.tensor(3.5),
            "transposed": base.t(),
            "offset": base[1:, 2:],
            "long": torch.arange(5),
            "nested": {"a": base[2]},
        },
        "epoch": 3,
    }
    torch.save(misc, out("misc.pth"))
    sd = misc["state_dict"]
    np.savez(out("misc.npz"), half=sd["half"].float().numpy(), bf16=sd["bf16"].float().numpy(),
             scalar=sd["scalar"].numpy(), transposed=sd["transposed"].numpy(),
             offset=sd["offset"].numpy(), long=sd["long"].numpy(), nested_a=sd["nested"]["a"].numpy())
    write_efficientad(out)
    total = sum(os.path.getsize(out(f)) for f in os.listdir(args.out))
    print(f"wrote {len(os.listdir(args.out))} files, {total / 1e6:.2f} MB, to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
