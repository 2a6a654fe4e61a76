"""The drawing of kdjax's synthetic "tray" dataset: the scene rules, the defects and
their regions, rendered with numpy signed-distance fields (antialiased by coverage),
deterministically from (seed, split, index). ``kdjax.data.synthetic`` writes the
images in the MVTec LOCO AD layout; docs/DATA.md, "Synthetic logical-anomaly
dataset", describes the rules and the defects."""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

GENERATOR_VERSION = 1

ROUND_COLOURS = {"red": (0.82, 0.18, 0.14), "green": (0.20, 0.66, 0.24),
                 "blue": (0.18, 0.34, 0.84)}
CAPSULE_COLOURS = {"yellow": (0.92, 0.80, 0.16), "purple": (0.58, 0.26, 0.70),
                   "cyan": (0.16, 0.76, 0.80)}
PAIRING = {"red": "yellow", "green": "purple", "blue": "cyan"}

LOGICAL_KINDS = ("missing_item", "extra_item", "wrong_compartment", "wrong_colour_pairing",
                 "wrong_count")
STRUCTURAL_KINDS = ("scratch", "stain", "dent", "broken_item")

# Geometry, in units of the image side.
DISK_R = 0.072
CAP_HALF_LEN = 0.10   # half the capsule's axis length
CAP_W = 0.034         # capsule radius (half thickness)
MISSING_MARGIN = 0.012  # the "where it should be" region is the footprint grown by this

SPLITS = (("train", "good"), ("validation", "good"), ("test", "good"),
          ("test", "logical_anomalies"), ("test", "structural_anomalies"))


def defects_config(image_size: int) -> List[dict]:
    """The defects_config.json entries (LOCO format) for images of side ``image_size``.

    Absolute thresholds are ints (pixel counts at this resolution), relative ones
    floats in (0, 1], as the official evaluator asserts.
    """
    s2 = float(image_size) ** 2
    disk_area = max(1, int(round(np.pi * DISK_R ** 2 * s2)))
    cap_area = max(1, int(round((4 * CAP_HALF_LEN * CAP_W + np.pi * CAP_W ** 2) * s2)))
    rows = [
        ("missing_round_item", 255, disk_area, False),
        ("missing_elongated_item", 245, cap_area, False),
        ("extra_item", 235, 0.3, True),
        ("wrong_compartment", 225, 1.0, True),
        ("wrong_colour_pairing", 215, 0.35, True),
        ("wrong_count", 205, 0.25, True),
        ("scratch", 195, 1.0, True),
        ("stain", 185, 1.0, True),
        ("dent", 175, 1.0, True),
        ("broken_item", 165, max(1, cap_area // 4), False),
    ]
    return [dict(defect_name=n, pixel_value=v, saturation_threshold=t, relative_saturation=r)
            for n, v, t, r in rows]


# ---------------------------------------------------------------------------
# Signed distance fields on the pixel-centre grid (units: image side).

class _Canvas:
    """Pixel-centre coordinates of an S x S image, or of a window of it (``sub``)."""

    def __init__(self, size: int, x=None, y=None, sl=None):
        self.size = size
        if x is None:
            c = (np.arange(size, dtype=np.float32) + 0.5) / size
            y, x = np.meshgrid(c, c, indexing="ij")
            sl = (slice(0, size), slice(0, size))
        self.x, self.y, self.sl = x, y, sl

    def sub(self, x0, y0, x1, y1) -> "_Canvas":
        """The window of pixels whose centres may lie in [x0, x1] x [y0, y1]."""
        s = self.size
        c0, c1 = max(0, int(np.floor(x0 * s)) - 1), min(s, int(np.ceil(x1 * s)) + 1)
        r0, r1 = max(0, int(np.floor(y0 * s)) - 1), min(s, int(np.ceil(y1 * s)) + 1)
        c1, r1 = max(c1, c0 + 1), max(r1, r0 + 1)
        sl = (slice(r0, r1), slice(c0, c1))
        return _Canvas(s, self.x[sl], self.y[sl], sl)

    def full(self, sub_mask: np.ndarray) -> np.ndarray:
        """A full-size bool mask holding ``sub_mask`` in this window."""
        m = np.zeros((self.size, self.size), bool)
        m[self.sl] = sub_mask
        return m

    def cover(self, sdf: np.ndarray) -> np.ndarray:
        """Antialiased coverage in [0, 1] of the region sdf <= 0."""
        return np.clip(0.5 - sdf * self.size, 0.0, 1.0)


def _sd_disk(cv, cx, cy, r):
    return np.hypot(cv.x - cx, cv.y - cy) - r


def _sd_segment(cv, ax, ay, bx, by):
    """Distance to segment AB and the vector from its closest point."""
    px, py = cv.x - ax, cv.y - ay
    dx, dy = bx - ax, by - ay
    t = np.clip((px * dx + py * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
    vx, vy = px - t * dx, py - t * dy
    return np.hypot(vx, vy), vx, vy


def _sd_box(cv, x0, y0, x1, y1, radius=0.0):
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hx, hy = (x1 - x0) / 2 - radius, (y1 - y0) / 2 - radius
    qx, qy = np.abs(cv.x - cx) - hx, np.abs(cv.y - cy) - hy
    out = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return out + np.minimum(np.maximum(qx, qy), 0) - radius


def _paint(img, cover, colour):
    a = cover[..., None]
    img *= 1.0 - a
    img += a * colour


# ---------------------------------------------------------------------------
# Scene description and drawing.

def _smooth_noise(rng, size, cells):
    """Smooth random field in [0, 1]: a cells x cells grid upsampled bicubically."""
    g = (rng.random((cells, cells)) * 255).astype(np.uint8)
    im = Image.fromarray(g, "L").resize((size, size), Image.BICUBIC)
    return np.asarray(im, np.float32) / 255.0


def _background(rng, cv):
    s = cv.size
    base = np.array([0.25, 0.22, 0.2], np.float32) + rng.uniform(-0.08, 0.12, 3).astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:  # blotches
        t = 0.7 * _smooth_noise(rng, s, int(rng.integers(4, 10))) + 0.3 * _smooth_noise(rng, s, 24)
        tex = 0.75 + 0.5 * t
    elif kind == 1:  # wood grain
        f = rng.uniform(10, 25)
        warp = _smooth_noise(rng, s, 6)
        ang = rng.uniform(0, np.pi)
        u = cv.x * np.cos(ang) + cv.y * np.sin(ang)
        tex = 0.85 + 0.15 * np.sin(2 * np.pi * f * (u + 0.08 * warp))
    else:  # fabric
        f = rng.uniform(30, 60)
        tex = 0.85 + 0.08 * np.sin(2 * np.pi * f * cv.x) * np.sin(2 * np.pi * f * cv.y) \
            + 0.1 * _smooth_noise(rng, s, 12)
    grain = 0.03 * rng.standard_normal((s, s), dtype=np.float32)
    return np.clip(base[None, None, :] * (tex + grain)[..., None], 0, 1)


def _layout(rng):
    """Tray box, divider and slot centres (normalized), jittered."""
    j = [float(v) for v in rng.uniform(-0.015, 0.015, 4)]
    x0, y0, x1, y1 = 0.07 + j[0], 0.08 + j[1], 0.93 + j[2], 0.92 + j[3]
    rim = 0.02
    xd = x0 + 0.4 * (x1 - x0)
    half_div = 0.009
    lx0, lx1 = x0 + rim, xd - half_div
    rx0, rx1 = xd + half_div, x1 - rim
    iy0, iy1 = y0 + rim, y1 - rim
    left = [((lx0 + lx1) / 2, iy0 + (k + 0.5) * (iy1 - iy0) / 3) for k in range(3)]
    right = [((rx0 + rx1) / 2, iy0 + (k + 0.5) * (iy1 - iy0) / 4) for k in range(4)]
    return dict(tray=(x0, y0, x1, y1), rim=rim, xd=xd, half_div=half_div, left=left,
                right=right)


def _disk_item(rng, slot, colour_name):
    cx, cy = slot
    return dict(kind="disk", cx=cx + rng.uniform(-0.025, 0.025), cy=cy + rng.uniform(-0.03, 0.03),
                r=DISK_R * rng.uniform(0.95, 1.05), colour=colour_name,
                shade=rng.uniform(-0.04, 0.04, 3))


def _capsule_item(rng, slot, colour_name, max_rot=20.0, dx=0.05):
    cx, cy = slot
    return dict(kind="capsule", cx=cx + rng.uniform(-dx, dx), cy=cy + rng.uniform(-0.015, 0.015),
                ang=np.deg2rad(rng.uniform(-max_rot, max_rot)),
                half=CAP_HALF_LEN * rng.uniform(0.95, 1.05), w=CAP_W, colour=colour_name,
                shade=rng.uniform(-0.04, 0.04, 3))


def _capsule_ends(it):
    c, s = np.cos(it["ang"]), np.sin(it["ang"])
    return (it["cx"] - c * it["half"], it["cy"] - s * it["half"],
            it["cx"] + c * it["half"], it["cy"] + s * it["half"])


def _item_bbox(it, margin):
    if it["kind"] == "disk":
        e = it["r"] + margin
        return it["cx"] - e, it["cy"] - e, it["cx"] + e, it["cy"] + e
    segs = list(it.get("pieces", ())) + [_capsule_ends(it)]
    xs = [v for p in segs for v in (p[0], p[2])]
    ys = [v for p in segs for v in (p[1], p[3])]
    e = it["w"] + margin
    return min(xs) - e, min(ys) - e, max(xs) + e, max(ys) + e


def _item_mask(cv, it, margin=0.0):
    """Full-size bool mask of the item's footprint grown by ``margin``."""
    sub = cv.sub(*_item_bbox(it, margin + 2.0 / cv.size))
    return sub.full(_item_sdf(sub, it) <= margin)


def _item_sdf(cv, it):
    if it["kind"] == "disk":
        return _sd_disk(cv, it["cx"], it["cy"], it["r"])
    d, _, _ = _sd_segment(cv, *_capsule_ends(it))
    return d - it["w"]


def _draw_item(img, cv, it, light, dent=None):
    """Shaded item: a sphere-like disk or a cylinder-like capsule."""
    cv = cv.sub(*_item_bbox(it, 2.0 / cv.size))
    img = img[cv.sl]
    base = np.array(ROUND_COLOURS.get(it["colour"]) or CAPSULE_COLOURS[it["colour"]],
                    np.float32) + it["shade"].astype(np.float32)
    if it["kind"] == "disk":
        nx, ny = (cv.x - it["cx"]) / it["r"], (cv.y - it["cy"]) / it["r"]
    else:
        d, vx, vy = _sd_segment(cv, *_capsule_ends(it))
        nx, ny = vx / it["w"], vy / it["w"]
    sdf = _item_sdf(cv, it)
    pieces = it.get("pieces")
    if pieces is not None:  # a broken capsule: draw only its two pieces
        (d0, vx0, vy0), (d1, vx1, vy1) = [_sd_segment(cv, *p) for p in pieces]
        sel = d1 < d0
        sdf = np.minimum(d0, d1) - it["w"]
        nx = np.where(sel, vx1, vx0) / it["w"]
        ny = np.where(sel, vy1, vy0) / it["w"]
    rr = np.minimum(nx * nx + ny * ny, 1.0)
    nz = np.sqrt(1.0 - rr)
    if dent is not None:  # a dimple: the normal points the other way inside it
        ddx, ddy, dr = dent
        q = np.hypot(cv.x - ddx, cv.y - ddy) / dr
        inside = q < 1.0
        nx = np.where(inside, -(cv.x - ddx) / dr, nx)
        ny = np.where(inside, -(cv.y - ddy) / dr, ny)
        nz = np.where(inside, np.sqrt(np.maximum(1.0 - np.minimum(q * q, 1.0), 0.05)), nz)
    lx, ly, lz = light
    diffuse = np.maximum(nx * lx + ny * ly + nz * lz, 0.0)
    hx, hy, hz = lx, ly, lz + 1.0
    hn = np.sqrt(hx * hx + hy * hy + hz * hz)
    spec = np.maximum((nx * hx + ny * hy + nz * hz) / hn, 0.0) ** 24
    col = base[None, None, :] * (0.45 + 0.6 * diffuse)[..., None] + 0.35 * spec[..., None]
    a = cv.cover(sdf)[..., None]
    img *= 1.0 - a
    img += a * np.clip(col, 0, 1)
    return sdf


def _draw_shadow(img, cv, it, light):
    ox, oy = -light[0] * 0.012, -light[1] * 0.012
    cv = cv.sub(*_item_bbox(it, 0.03))
    img = img[cv.sl]
    moved = dict(it, cx=it["cx"] + ox, cy=it["cy"] + oy)
    if "pieces" in it:
        sdf = np.minimum(*[_sd_segment(cv, p[0] + ox, p[1] + oy, p[2] + ox, p[3] + oy)[0]
                           - it["w"] for p in it["pieces"]])
    else:
        sdf = _item_sdf(cv, moved)
    soft = np.clip(0.5 - sdf / 0.012, 0.0, 1.0) * 0.35
    img *= (1.0 - soft)[..., None]


def _draw_tray(img, cv, lay, rng):
    x0, y0, x1, y1 = lay["tray"]
    tone = (rng.uniform(0.72, 0.84) + rng.uniform(-0.03, 0.03, 3)).astype(np.float32)
    sdf = _sd_box(cv, x0, y0, x1, y1, radius=0.03)
    # outer drop shadow, tray body, darker rim band, divider
    img *= (1.0 - 0.35 * np.clip(0.5 - (sdf - 0.01) / 0.02, 0, 1))[..., None]
    texture = 1.0 + 0.03 * (_smooth_noise(rng, cv.size, 16) - 0.5)
    _paint(img, cv.cover(sdf), (tone[None, None, :] * texture[..., None]).astype(np.float32))
    inner = _sd_box(cv, x0 + lay["rim"], y0 + lay["rim"], x1 - lay["rim"], y1 - lay["rim"],
                    radius=0.02)
    rim_band = cv.cover(sdf) * (1.0 - cv.cover(inner))
    img *= (1.0 - 0.22 * rim_band)[..., None]
    div = _sd_box(cv, lay["xd"] - lay["half_div"], y0 + lay["rim"], lay["xd"] + lay["half_div"],
                  y1 - lay["rim"])
    img *= (1.0 - 0.3 * cv.cover(div))[..., None]


def _normal_scene(rng, lay):
    colour = list(ROUND_COLOURS)[int(rng.integers(3))]
    left_slots = sorted(rng.choice(3, 2, replace=False).tolist())
    right_slots = sorted(rng.choice(4, 3, replace=False).tolist())
    disks = [_disk_item(rng, lay["left"][k], colour) for k in left_slots]
    caps = [_capsule_item(rng, lay["right"][k], PAIRING[colour]) for k in right_slots]
    return dict(colour=colour, left_slots=left_slots, right_slots=right_slots, disks=disks,
                caps=caps)


def _grow(sdf, margin):
    return sdf <= margin


def _logical(rng, cv, lay, sc, kind):
    """Modify a normal scene to break one rule; return [(defect_name, mask)]."""
    disks, caps = sc["disks"], sc["caps"]
    if kind == "missing_item":
        if rng.random() < 0.5:
            gone = disks.pop(int(rng.integers(len(disks))))
            return [("missing_round_item", _item_mask(cv, gone, MISSING_MARGIN))]
        gone = caps.pop(int(rng.integers(len(caps))))
        return [("missing_elongated_item", _item_mask(cv, gone, MISSING_MARGIN))]
    if kind == "extra_item":
        free = [k for k in range(3) if k not in sc["left_slots"]][0]
        disks.append(_disk_item(rng, lay["left"][free], sc["colour"]))
        return [("extra_item", None)]  # all round items, filled in after drawing
    if kind == "wrong_compartment":
        if rng.random() < 0.5:  # a capsule in the left compartment's free slot
            free = [k for k in range(3) if k not in sc["left_slots"]][0]
            old = caps.pop(int(rng.integers(len(caps))))
            moved = _capsule_item(rng, lay["left"][free], old["colour"], max_rot=6.0, dx=0.008)
            caps.append(moved)
        else:  # a round item in the right compartment's free slot
            free = [k for k in range(4) if k not in sc["right_slots"]][0]
            old = disks.pop(int(rng.integers(len(disks))))
            moved = _disk_item(rng, lay["right"][free], old["colour"])
            disks.append(moved)
        return [("wrong_compartment", _item_mask(cv, moved))]
    if kind == "wrong_colour_pairing":
        wrong = [c for c in CAPSULE_COLOURS if c != PAIRING[sc["colour"]]]
        new = wrong[int(rng.integers(2))]
        for c in caps:
            c["colour"] = new
        return [("wrong_colour_pairing", None)]
    if kind == "wrong_count":
        free = [k for k in range(4) if k not in sc["right_slots"]][0]
        caps.append(_capsule_item(rng, lay["right"][free], PAIRING[sc["colour"]]))
        return [("wrong_count", None)]
    raise ValueError(kind)


def _polyline_sdf(cv, pts):
    d = None
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:]):
        s, _, _ = _sd_segment(cv, ax, ay, bx, by)
        d = s if d is None else np.minimum(d, s)
    return d


def _render(rng, size, kind: Optional[str], logical: bool):
    """Draw one image; return (uint8 image, [(defect_name, bool mask)])."""
    cv = _Canvas(size)
    lay = _layout(rng)
    img = _background(rng, cv)
    _draw_tray(img, cv, lay, rng)
    sc = _normal_scene(rng, lay)
    la = rng.uniform(0, 2 * np.pi)
    light = np.array([0.6 * np.cos(la), 0.6 * np.sin(la), 0.8], np.float32)
    light /= np.linalg.norm(light)
    regions: List[Tuple[str, Optional[np.ndarray]]] = []
    structural = []
    if kind is not None and logical:
        regions = _logical(rng, cv, lay, sc, kind)
    elif kind is not None:
        structural = [kind]
        if rng.random() < 0.2:
            structural.append(STRUCTURAL_KINDS[int(rng.integers(len(STRUCTURAL_KINDS)))])
    items = sc["disks"] + sc["caps"]
    dents = {}
    for s_kind in structural:  # defects that change an item's shape or shading
        if s_kind == "dent":
            cand = [i for i, it in enumerate(items) if it["kind"] == "disk" and i not in dents]
            if not cand:
                s_kind = "scratch"
            else:
                i = cand[int(rng.integers(len(cand)))]
                it = items[i]
                a, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.45) * it["r"]
                dr = it["r"] * rng.uniform(0.3, 0.42)
                dents[i] = (it["cx"] + rr * np.cos(a), it["cy"] + rr * np.sin(a), dr)
                sub = cv.sub(*_item_bbox(it, 0.01))
                regions.append(("dent", sub.full(
                    (np.hypot(sub.x - dents[i][0], sub.y - dents[i][1]) <= dr)
                    & (_item_sdf(sub, it) <= 0))))
                continue
        if s_kind == "broken_item":
            cand = [i for i, it in enumerate(items) if it["kind"] == "capsule"
                    and "pieces" not in it]
            if cand:
                it = items[cand[int(rng.integers(len(cand)))]]
                ax, ay, bx, by = _capsule_ends(it)
                t = rng.uniform(0.35, 0.65)
                gap = rng.uniform(0.015, 0.03)
                L = 2 * it["half"]
                ux, uy = (bx - ax) / L, (by - ay) / L
                px, py = ax + t * (bx - ax), ay + t * (by - ay)
                # second piece rotated a little about its outer end
                rot = np.deg2rad(rng.uniform(8, 20) * (1 if rng.random() < 0.5 else -1))
                qx, qy = px + gap * ux, py + gap * uy
                vx, vy = qx - bx, qy - by
                c, s = np.cos(rot), np.sin(rot)
                qx, qy = bx + c * vx - s * vy, by + s * vx + c * vy
                it["pieces"] = ((ax, ay, px - gap * ux, py - gap * uy), (qx, qy, bx, by))
                whole = dict(it)
                del whole["pieces"]
                sub = cv.sub(*_item_bbox(it, 0.01))
                full = _item_sdf(sub, whole) <= 0
                near = np.hypot(sub.x - px, sub.y - py) <= gap + 2.2 * it["w"]
                bridge = _polyline_sdf(sub, [(px - gap * ux, py - gap * uy), (qx, qy)]) <= it["w"]
                regions.append(("broken_item", sub.full((full | bridge) & near)))
                continue
            s_kind = "stain"
        regions.append((s_kind, None))  # surface defects drawn after the items
    for it in items:
        _draw_shadow(img, cv, it, light)
    for i, it in enumerate(items):
        _draw_item(img, cv, it, light, dent=dents.get(i))
    # round items / capsules regions that depend on the final scene
    final = []
    for name, mask in regions:
        if name == "extra_item":
            mask = np.any([_item_mask(cv, d) for d in sc["disks"]], axis=0)
        elif name in ("wrong_colour_pairing", "wrong_count"):
            mask = np.any([_item_mask(cv, c) for c in sc["caps"]], axis=0)
        elif name == "scratch":
            cx, cy = rng.uniform(0.2, 0.8, 2)
            n = int(rng.integers(2, 4))
            length = rng.uniform(0.18, 0.35)
            a0 = rng.uniform(0, 2 * np.pi)
            pts, x, y = [(cx, cy)], cx, cy
            for _ in range(n):
                a0 += rng.uniform(-0.5, 0.5)
                x, y = x + np.cos(a0) * length / n, y + np.sin(a0) * length / n
                pts.append((x, y))
            width = max(0.6 / size, 0.004)
            e = width + 3.0 / size
            sub = cv.sub(min(p[0] for p in pts) - e, min(p[1] for p in pts) - e,
                         max(p[0] for p in pts) + e, max(p[1] for p in pts) + e)
            sdf = _polyline_sdf(sub, pts) - width
            tone = 0.95 if rng.random() < 0.5 else 0.12
            _paint(img[sub.sl], sub.cover(sdf) * 0.85, np.float32(tone))
            mask = sub.full(sdf <= 1.0 / size)
        elif name == "stain":
            cx, cy = rng.uniform(0.18, 0.82, 2)
            r = rng.uniform(0.035, 0.07)
            offs = np.clip(rng.normal(0, r * 0.5, (4, 2)), -r, r)
            sub = cv.sub(cx - 3 * r, cy - 3 * r, cx + 3 * r, cy + 3 * r)
            blob = np.zeros_like(sub.x)
            for ox, oy in offs:
                blob += np.exp(-((sub.x - cx - ox) ** 2 + (sub.y - cy - oy) ** 2)
                               / (2 * (r * 0.6) ** 2))
            sdf = (0.9 - blob) * r
            colour = (np.array([0.42, 0.28, 0.12], np.float32)
                      + rng.uniform(-0.06, 0.06, 3).astype(np.float32))
            alpha = rng.uniform(0.55, 0.8)
            _paint(img[sub.sl], sub.cover(sdf) * alpha, colour)
            mask = sub.full(sdf <= 0)
        final.append((name, np.asarray(mask, bool)))
    # global lighting and sensor noise
    gang = rng.uniform(0, 2 * np.pi)
    grad = 1.0 + rng.uniform(0.0, 0.12) * ((cv.x - 0.5) * np.cos(gang) + (cv.y - 0.5) * np.sin(gang))
    img *= (np.float32(rng.uniform(0.88, 1.1)) * grad.astype(np.float32))[..., None]
    img += 0.008 * rng.standard_normal(img.shape, dtype=np.float32)
    out = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return out, [(n, m) for n, m in final if m.any()]


def render_image(seed: int, split: str, folder: str, index: int, size: int):
    """One image, deterministic from (seed, split, folder, index)."""
    codes = {("train", "good"): 0, ("validation", "good"): 1, ("test", "good"): 2,
             ("test", "logical_anomalies"): 3, ("test", "structural_anomalies"): 4}
    rng = np.random.default_rng([int(seed), codes[(split, folder)], int(index), GENERATOR_VERSION])
    if folder == "logical_anomalies":
        return _render(rng, size, LOGICAL_KINDS[index % len(LOGICAL_KINDS)], True)
    if folder == "structural_anomalies":
        return _render(rng, size, STRUCTURAL_KINDS[index % len(STRUCTURAL_KINDS)], False)
    return _render(rng, size, None, False)
