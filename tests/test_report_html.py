"""The HTML report (kdjax/report.py) opened in a real browser: headless Chromium.

The shared tiny demo run (conftest ``demo_run``: synthetic LOCO-layout data,
``python -m kdjax.main --config=configs/demo.py``) writes ``report.html``;
Chromium's ``--dump-dom`` gives the DOM after the page's scripts ran and
``--screenshot`` a picture of it. Checked: the results table and the gallery
rendered (rows, one card per test image, thumbnails on disk), the sort and
filter controls change the visible cards (the controls are driven by a
script appended to a copy of the page, dispatching ``change`` events as a
click does; the URL hash that they write is loaded too), logical and
structural anomalies are apart, and the screenshot is not blank. The same for
``--mode=predict``'s gallery. Skipped, saying why, without a Chromium
(``apt-get install -y chromium``; ``.ci/run`` installs it).
"""

import csv
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from conftest import run_cli

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome",
                                           "google-chrome-stable") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium installed: apt-get install -y chromium "
    "(.ci/run installs it) to open the HTML report in a headless browser")


def _chromium(tmp_path, *args):
    profile = tmp_path / "chromium-profile"
    p = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars",
                        "--allow-file-access-from-files", f"--user-data-dir={profile}", *args],
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-3000:]
    return p.stdout.decode("utf-8", errors="replace")


def dump_dom(tmp_path, page, hash_=""):
    return _chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom",
                     f"file://{os.path.abspath(page)}" + (f"#{hash_}" if hash_ else ""))


def screenshot(tmp_path, page, out):
    _chromium(tmp_path, "--window-size=1200,1600", f"--screenshot={out}",
              f"file://{os.path.abspath(page)}")
    from PIL import Image

    return np.asarray(Image.open(out).convert("RGB"))


class _Dom(HTMLParser):
    """The cards (attributes, hidden or not, in DOM order), the result rows, selects."""

    def __init__(self, text):
        super().__init__()
        self.cards, self.rows, self.options, self.svgs, self.cards_attrs = [], [], {}, 0, {}
        self.body = {}
        self._select = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "div" and "card" in cls:
            self.cards.append(dict(a, hidden="hidden" in a))
        elif tag == "div" and a.get("id") == "cards":
            self.cards_attrs = a
        elif tag == "tr" and "result-row" in cls:
            self.rows.append(a)
        elif tag == "select":
            self._select = a.get("id")
            self.options[self._select] = []
        elif tag == "option" and self._select:
            self.options[self._select].append(a.get("value"))
        elif tag == "svg":
            self.svgs += 1
        elif tag == "body":
            self.body = a

    def handle_endtag(self, tag):
        if tag == "select":
            self._select = None

    def visible(self):
        return [c for c in self.cards if not c["hidden"]]


def _scores(cards):
    return [float(c["data-score"]) for c in cards]


def _not_blank(img):
    assert img.shape[0] > 200 and img.shape[1] > 200
    flat = img.reshape(-1, 3)
    assert len(np.unique(flat[::7], axis=0)) > 50, "the screenshot is (nearly) one colour"
    assert float(flat.std()) > 10.0


@needs_chromium
def test_report_in_a_browser(demo_run, tmp_path):
    wd, _ = demo_run
    page = os.path.join(wd, "report.html")
    results = json.load(open(os.path.join(wd, "results.json")))
    (cat,) = results["categories"]
    data = json.load(open(os.path.join(wd, "report_files", f"{cat}.json")))
    n = len(data["entries"])
    kinds = [e["kind"] for e in data["entries"]]
    assert n == 13 and set(kinds) == {"good", "logical", "structural"}  # the tiny set's test
    assert os.path.getsize(page) < 200_000  # light: thumbnails are files beside it

    dom = _Dom(dump_dom(tmp_path, page))
    assert len(dom.rows) == 2  # the category and the mean
    assert len(dom.cards) == n and len(dom.visible()) == n
    assert dom.cards_attrs["data-visible"] == str(n)
    assert sorted(c["data-name"] for c in dom.cards) == sorted(e["name"] for e in data["entries"])
    for e in data["entries"]:  # every thumbnail is beside the page
        assert os.path.exists(os.path.join(wd, e["img"])), e
    assert dom.svgs >= 2  # ROC and sPRO curves
    assert {"logical", "structural", "good"} <= set(dom.options["f-kind"])
    assert _scores(dom.visible()) == sorted(_scores(dom.visible()), reverse=True)

    # The state in the URL hash: sort, kind, defect type, misclassified.
    asc = _Dom(dump_dom(tmp_path, page, "sort=score-asc")).visible()
    assert _scores(asc) == sorted(_scores(asc)) and asc[0]["data-name"] != dom.visible()[0][
        "data-name"]
    logical = _Dom(dump_dom(tmp_path, page, "kind=logical")).visible()
    assert len(logical) == kinds.count("logical") and {c["data-kind"] for c in logical} == {
        "logical"}
    test = results["thresholds"][cat]["test"]
    mis = _Dom(dump_dom(tmp_path, page, "mis=1")).visible()
    assert len(mis) == test["fp"] + test["fn"]
    assert all(c["data-mis"] == "1" for c in mis)

    # The controls, used as a person does: change events on the selects and the checkbox.
    driven = os.path.join(wd, "report_controls_test.html")
    script = """<script>
      function set(id, v){var e=document.getElementById(id);
        if(e.type==='checkbox') e.checked=v; else e.value=v;
        e.dispatchEvent(new Event('change'));}
      set('f-kind', 'structural'); set('f-sort', 'score-asc');
      document.body.setAttribute('data-hash', location.hash);
    </script></body>"""
    try:
        with open(page) as f, open(driven, "w") as g:
            g.write(f.read().replace("</body>", script))
        d = _Dom(dump_dom(tmp_path, driven))
    finally:
        os.remove(driven)
    vis = d.visible()
    assert len(vis) == kinds.count("structural") and {c["data-kind"] for c in vis} == {
        "structural"}
    assert _scores(vis) == sorted(_scores(vis))
    assert "kind=structural" in d.body["data-hash"] and "sort=score-asc" in d.body["data-hash"]

    _not_blank(screenshot(tmp_path, page, str(tmp_path / "report.png")))


@needs_chromium
def test_predict_gallery_in_a_browser(demo_run, tiny_synthetic_root, tmp_path):
    wd, _ = demo_run
    out = tmp_path / "pred"
    test_dir = os.path.join(tiny_synthetic_root, "tray", "test")
    run_cli("--mode=predict", f"--workdir={wd}", f"--input={test_dir}", f"--output={out}",
            "--max_overlays=0")
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    page = out / "report.html"
    dom = _Dom(dump_dom(tmp_path, page))
    assert len(dom.cards) == len(rows) == 13 and len(dom.visible()) == 13
    assert len(os.listdir(out / "report_files")) == 13
    assert set(dom.options["f-type"]) >= {"good", "logical_anomalies", "structural_anomalies"}
    n_anom = sum(r["is_anomalous"] == "True" for r in rows)
    flagged = _Dom(dump_dom(tmp_path, page, "dec=1")).visible()
    assert len(flagged) == n_anom and all(c["data-dec"] == "1" for c in flagged)
    good_folder = _Dom(dump_dom(tmp_path, page, "type=good&sort=score-asc")).visible()
    assert len(good_folder) == 4 and _scores(good_folder) == sorted(_scores(good_folder))
    _not_blank(screenshot(tmp_path, page, str(tmp_path / "gallery.png")))


def _ad_category(wd, cat, n_good, defects, seed):
    """report_files for one MVTec AD-style category from random images and maps."""
    from kdjax import evaluate, report
    from kdjax.data.types import Record

    rng = np.random.default_rng(seed)
    records = [Record(f"/data/{cat}/test/good/{i:03d}.png", cat, "test", "good", 0)
               for i in range(n_good)]
    for d, k in defects:
        records += [Record(f"/data/{cat}/test/{d}/{i:03d}.png", cat, "test", d, 1)
                    for i in range(k)]
    n = len(records)
    images = (rng.random((n, 32, 32, 3)) * 255).astype(np.uint8)
    masks = np.zeros((n, 32, 32), np.uint8)
    maps = rng.random((n, 32, 32)).astype(np.float32)
    for i, r in enumerate(records):
        if r.label:
            masks[i, 8:20, 8:20] = 1
            maps[i, 8:20, 8:20] += 0.5 * (i % 3)
    curves = {}
    metrics = evaluate.category_metrics("mvtec_ad", maps, records, masks=masks, curves=curves)
    scores = maps.max(axis=(1, 2))
    labels = np.array([r.label for r in records])
    from kdjax.inference import confusion_at

    thr = {"value": float(np.median(scores)), "rule": "fixed", "source": "config"}
    thr["test"] = confusion_at(labels, scores, thr["value"])
    report.write_category(wd, cat, "mvtec_ad", images, maps, records, scores, thr,
                          masks=masks, curves=curves, root="/data", thumbnail_size=64)
    return metrics, thr


@needs_chromium
def test_report_of_several_categories_with_paper_numbers(tmp_path):
    """kdjax.report on two MVTec AD-style categories (no training): the paper column,
    the PRO curves, and the category filter in the browser."""
    from kdjax import evaluate, report
    from kdjax.jsonio import json_safe

    wd = str(tmp_path / "w")
    cats, thresholds = {}, {}
    cats["bottle"], thresholds["bottle"] = _ad_category(wd, "bottle", 3, [("crack", 4)], 0)
    cats["grid"], thresholds["grid"] = _ad_category(wd, "grid", 2, [("bent", 2), ("glue", 3)],
                                                    1)
    targets = {"mean": {"image_auroc": 98.5}, "bottle": {"au_pro": 96.6}}
    results = evaluate.write_results(wd, "rd4ad", "mvtec_ad", "wrn50", cats, targets=targets,
                                     extra={"thresholds": thresholds})
    page = report.write_report(wd, json_safe(results), targets)
    text = open(page).read()
    assert text.count("<td class=paper>98.5</td>") == 1 and "<td class=paper>96.6</td>" in text
    dom = _Dom(dump_dom(tmp_path, page))
    assert len(dom.rows) == 3 and len(dom.cards) == 14 and dom.svgs == 4  # ROC + PRO each
    assert "f-kind" not in dom.options  # MVTec AD: no logical / structural
    grid = _Dom(dump_dom(tmp_path, page, "cat=grid")).visible()
    assert len(grid) == 7 and {c["data-cat"] for c in grid} == {"grid"}
    glue = _Dom(dump_dom(tmp_path, page, "type=glue&sort=name")).visible()
    assert [c["data-name"] for c in glue] == [f"grid/test/glue/{i:03d}.png" for i in range(3)]
