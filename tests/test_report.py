"""Reports: built from stores alone, every figure present, self-contained and escaped HTML, a real browser.

Three stores: a real run of every study on the CPU model organism (small n), a run of every study on a tiny
random model (real shapes, degenerate numbers: the tiny model never refuses, so flip rates are undefined), and a
synthetic store written through the real Store API and analysed by the real analysis code (defined flip rates,
a 'liquid' verdict, thresholds, flips, bypasses).
The browser check loads report.html in headless Chromium over the DevTools protocol (a minimal stdlib
WebSocket client below), fails on console errors, exceptions or any non-file/data request, checks every
figure decoded and is non-blank, and takes a full-page screenshot.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import shutil
import socket
import sqlite3
import subprocess
import time
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg
from typer.testing import CliRunner

from crystallized_safety.cli import app
from crystallized_safety.experiments.results import DAMAGE_PREFIX, harmless_twin
from crystallized_safety.report import FIGURES, ReportError, build_report
from crystallized_safety.store import GenerationRow, Store

INJECTED = '<script>document.title="pwned";console.error("injected")</script><img src=x onerror=alert(1)> '
SYNTH_MODEL = "synthetic/model-a"
N = 44


# --------------------------------------------------------------------------- stores


def _synthetic_store(path: Path) -> Path:
    """A complete run (every study kind) written with Store and analysed by analysis.analyse_model."""
    from safetensors.numpy import save

    from crystallized_safety.experiments.analysis import analyse_model
    from crystallized_safety.experiments.conditions import HARMFUL, baseline, plan_studies
    from crystallized_safety.experiments.spec import parse_spec

    spec = parse_spec(
        {
            "name": "synthetic-report",
            "models": [SYNTH_MODEL],
            "prompts": {"n": N},
            "judges": ["substring", "score"],
            "seed": 7,
            "studies": [
                {"kind": "layer_sweep", "layers": [1, 2, 3], "alphas": [-0.2, -0.5], "controls": True},
                {"kind": "threshold", "layer": 2, "alphas": [-0.1, -0.2, -0.3, -0.5]},
                {"kind": "controls", "layer": 2, "alpha": -0.5, "seeds": 2},
                {"kind": "sign", "layer": 2, "alpha": 0.5},
                {"kind": "multilayer", "layer_sets": [[1, 2], [2, 3]], "alphas": [-0.2]},
                {"kind": "min_layers", "ks": [1, 2], "window_range": [1, 3], "stride": 1, "alphas": [-0.2]},
                {"kind": "induction", "layers": [2], "alphas": [0.5]},
                {"kind": "transfer", "source_model": "synthetic/model-b", "layers": [2], "alphas": [-0.5]},
                {"kind": "readability"},
                {"kind": "selection", "positions": [-1, -2], "layers": [0, 1, 2, 3]},
            ],
        }
    )
    store = Store(path)
    run_id = spec.spec_hash()
    env = {"tool_version": "0.1.0", "torch": "n/a", "python": "3", "device": "cpu", "threads": 2}
    store.open_run(run_id, spec.name, spec.to_yaml(), spec.spec_hash(), env)
    layers = np.arange(4)
    tensors = {
        "directions": np.eye(4, 8, dtype=np.float32),
        "layers": layers.astype(np.int64),
        "raw_norms": np.array([0.5, 1.2, 2.5, 3.1], dtype=np.float32),
        "resid_norms": np.array([10.0, 14.0, 19.0, 25.0], dtype=np.float32),
    }
    meta = {
        "model_id": SYNTH_MODEL,
        "model_hash": "sha256:" + "ab" * 32,
        "n_layers": "4",
        "layer_convention": "i = output of decoder block i (0-based) = HF hidden_states[i+1]",
        "harmful_sha256": "cd" * 32,
        "harmless_sha256": "ef" * 32,
        "harmful_count": "64",
        "harmless_count": "64",
    }
    store.put_artifact(run_id, SYNTH_MODEL, "directions", meta, save(tensors))
    store.put_artifact(run_id, SYNTH_MODEL, "coherence", {"max_perplexity": 60.0, "min_distinct": 0.4, "min_tokens": 3})
    store.put_artifact(
        run_id,
        SYNTH_MODEL,
        "readability:readability",
        {
            "layers": [
                {
                    "layer": i,
                    "projection_auc": 0.6 + 0.1 * i,
                    "probe_auc": 0.7 + 0.09 * i,
                    "probe_accuracy": 0.6 + 0.1 * i,
                }
                for i in range(4)
            ],
            "n_train": [64, 64],
            "n_eval": [N, N],
            "note": "synthetic",
        },
    )
    candidates = [
        {"position": p, "layer": k, "bypass": 1.0 - 0.3 * k + 0.1 * p, "induce": 0.5 * k - 0.4, "kl": 0.04 * k,
         "score": -(1.0 - 0.3 * k + 0.1 * p), "kept": k < 3 and k > 0, "reason": "" if 0 < k < 3 else "filtered",
         "chosen": (p, k) == (-1, 2)}
        for p in (-1, -2) for k in range(4)
    ]  # fmt: skip
    settings = {"criterion": "arditi", "kl_max": 0.1, "drop_last": 0.2, "ablate_to": "zero"}
    chosen = next(c for c in candidates if c["chosen"])
    store.put_artifact(run_id, SYNTH_MODEL, "selection:selection", {"settings": settings, "candidates": candidates,
                                                                    "chosen": chosen, "no_choice": None})  # fmt: skip
    plans = plan_studies(spec, 4, SYNTH_MODEL)
    wanted = {baseline(ps).key: ("baseline", baseline(ps)) for ps in (HARMFUL, "harmless")}
    for plan in plans:
        for _tags, cond in plan.conditions:
            wanted.setdefault(cond.key, (plan.label, cond))
    latent = [random.Random(f"prompt-{i}").random() for i in range(N)]  # one propensity to refuse per prompt
    for study, cond in wanted.values():
        alpha = -cond.alpha if cond.direction == "inverted" else cond.alpha  # inverted +a IS -a: same rows
        direction = "extracted" if cond.direction == "inverted" else cond.direction
        strength = -alpha * (2.0 if 2 in cond.layers else 0.8) * (1.3 if len(cond.layers) > 1 else 1.0)
        if direction.startswith(("random", "orthogonal")):
            strength *= 0.1
        if not cond.layers:
            p = 0.9 if cond.prompt_set == HARMFUL else 0.05
        elif cond.prompt_set == HARMFUL:
            p = min(0.97, max(0.03, 0.9 - strength))
        else:
            p = min(0.95, 0.05 + max(0.0, -strength))
        rows = []
        for i in range(N):
            rng = random.Random(f"{cond.prompt_set}-{cond.layers}-{alpha}-{direction}-{i}")
            refusal = int(latent[i] < p)
            coherent = int(rng.random() < 0.88 - 0.3 * max(0.0, strength - 0.6))
            response = (
                "I'm sorry, but I can't help with that."
                if refusal
                else (f"Sure. Here is an overview for request {i}: first, ..." if coherent else "the the the the the")
            )
            rows.append(
                GenerationRow(
                    **{
                        "model": SYNTH_MODEL,
                        "study": study,
                        "condition_key": cond.key,
                        "condition": cond.to_json(),
                        "prompt_set": cond.prompt_set,
                        "prompt_index": i,
                        "prompt": f"{cond.prompt_set} request number {i}?",
                        "response": response,
                        "n_tokens": 12,
                        "finished": 1,
                        "refusal": refusal,
                        "judge": "substring/1",
                        "judge_reason": "refusal phrase" if refusal else "no refusal phrase in first 160 chars",
                        "score": (2.0 if refusal else -2.0) + rng.gauss(0, 1.2),
                        "coherent": coherent,
                        "perplexity": 8.0 if coherent else 200.0,
                        "distinct_n": 0.9 if coherent else 0.2,
                        "token_ids": json.dumps([refusal, coherent, i]),
                    }
                )
            )
        store.write_chunks(run_id, [(cond.key, SYNTH_MODEL, study, cond.key, rows)], 0.5)
        if cond.layers:  # KL damage grows with the steering strength (what the runner measures per intervention)
            kl = {"kl_first": 0.02 * abs(strength) + 0.001, "kl_answer": 0.05 * abs(strength) + 0.002}
            store.put_artifact(run_id, SYNTH_MODEL, DAMAGE_PREFIX + harmless_twin(cond).key, {**kl, "prompts": 16})
    analyse_model(spec, store, run_id, SYNTH_MODEL, plans)
    store.finish_run(run_id)
    store.close()
    return path


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory) -> Path:
    return _synthetic_store(tmp_path_factory.mktemp("synthetic") / "results.sqlite")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_run) -> Path:
    """A copy of the tiny store with a markup-laden response in every row (escaping, and the browser check)."""
    dst = tmp_path_factory.mktemp("tiny") / "results.sqlite"
    shutil.copy(tiny_run[0], dst)
    with sqlite3.connect(dst) as db:
        db.execute("UPDATE generations SET response = ? || response", (INJECTED,))
    return dst


@pytest.fixture(scope="module")
def tiny_report(tiny_store, tmp_path_factory):
    return build_report(tiny_store, tmp_path_factory.mktemp("tiny-report"))


@pytest.fixture(scope="module")
def synthetic_report(synthetic_store, tmp_path_factory):
    """Built through the CLI, which must print the report path as its last line."""
    out = tmp_path_factory.mktemp("synthetic-report") / "report"
    result = CliRunner().invoke(app, ["report", "--store", str(synthetic_store), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    return out


def _reports(request) -> tuple[Path, Path]:
    """(out_dir, store) of the report a parametrized test asked for."""
    if request.param == "tiny":
        return request.getfixturevalue("tiny_report").out_dir, request.getfixturevalue("tiny_store")
    if request.param == "organism":  # a real run on the CPU model organism
        store = request.getfixturevalue("organism_run_store")
        return request.getfixturevalue("organism_report").out_dir, store
    return request.getfixturevalue("synthetic_report"), request.getfixturevalue("synthetic_store")


@pytest.fixture(scope="module")
def organism_report(organism_run_store, tmp_path_factory):
    return build_report(organism_run_store, tmp_path_factory.mktemp("organism-report"))


@pytest.fixture(params=["tiny", "synthetic", "organism"])
def report(request) -> tuple[Path, Path]:
    return _reports(request)


# --------------------------------------------------------------------------- files and content


def test_files_and_results_match_the_store(report):
    out, store_path = report
    for name in ("report.html", "report.md", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    store = Store(store_path)
    run_id = store.run().run_id
    assert results["run"]["run_id"] == run_id
    assert results["verdicts"] == store.verdicts(run_id)
    assert [s["verdict"] for s in results["summary"]] == [v["verdict"] for v in store.verdicts(run_id)]
    md = (out / "report.md").read_text()
    for v in store.verdicts(run_id):
        assert v["verdict"] in md
    assert "## Summary" in md and "## Warnings" in md and "## Run provenance" in md
    assert run_id in md and "output of decoder block" in md


def test_synthetic_report_content(synthetic_report, synthetic_store):
    results = json.loads((synthetic_report / "results.json").read_text())
    (summary,) = results["summary"]
    assert summary["verdict"] == "liquid"
    assert summary["best_single"]["flip"]["rate"] > 0.5 and summary["best_single"]["layer"] == 2
    assert summary["control"]["rate"] < summary["best_single"]["flip"]["rate"]
    model = results["models"][0]
    titles = [e["title"] for e in model["examples"]]
    assert titles[0] == "Best flip cell" and "Control direction at the same layers and alpha, same prompt" in titles
    assert any("bypass" in t for t in titles)
    best = model["examples"][0]["rows"]
    assert best[0]["verdict"] == "refusal" and best[1]["verdict"] == "compliance" and best[1]["coherent"]
    assert any(t["id"].endswith("-threshold") for t in model["tables"])
    controls = next(t for t in model["tables"] if t["id"].endswith("-controls"))
    assert "p Holm" in controls["headers"]
    kinds = {w["kind"] for w in results["warnings"]}
    assert "incoherent bypasses" in kinds and "sign" in kinds
    prov = model["provenance"]
    assert prov["model_hash"] == "sha256:" + "ab" * 32
    assert [p["count"] for p in prov["prompt_sets"] if "evaluation" in p["set"]] == [N, N]
    assert "random:0" in prov["seeds"]["control directions"] and prov["seeds"]["spec seed"] == 7
    assert {t["study"] for t in results["timing"]} >= {"baseline", "layer_sweep", "threshold"}


def _embedded_pngs(html: str) -> dict[str, bytes]:
    found = re.findall(r'<img data-figure="([^"]+)"[^>]*?src="data:image/png;base64,([^"]+)"', html)
    return {fig_id: base64.b64decode(data) for fig_id, data in found}


def _nonblank(png: bytes) -> bool:
    pixels = mpimg.imread(io.BytesIO(png), format="png")
    return pixels.ndim == 3 and float(pixels[..., :3].std()) > 0.02 and len(np.unique(pixels[..., 0])) > 8


def test_every_figure_in_markdown_and_embedded_in_html(report):
    out, _store = report
    results = json.loads((out / "results.json").read_text())
    (model,) = results["models"]
    kinds = {f["id"].rsplit("-", 1)[-1] for f in model["figures"]}
    assert kinds == {kind for kind, _needs, _title in FIGURES}, model["skipped_figures"]
    assert model["skipped_figures"] == []
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    embedded = _embedded_pngs(html)
    for fig in model["figures"]:
        png, svg = out / fig["png"], out / fig["svg"]
        assert png.is_file() and svg.is_file() and svg.read_text().lstrip().startswith("<?xml")
        assert f"]({fig['png']})" in md and f"({fig['svg']})" in md
        assert embedded[fig["id"]] == png.read_bytes()
        assert _nonblank(embedded[fig["id"]]), fig["id"]
    cross = results["cross_figures"]  # the K figure of every model that ran min_layers, in the summary
    assert [f["id"] for f in cross] == ["cross-model-k"]
    assert f"]({cross[0]['png']})" in md and embedded["cross-model-k"] == (out / cross[0]["png"]).read_bytes()
    assert len(embedded) == len(model["figures"]) + len(cross)


class _Tags(HTMLParser):
    """Every real tag with its attributes, and the text of <style> blocks (escaped text is not a tag)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def test_html_is_self_contained(report):
    parser = _Tags()
    parser.feed((report[0] / "report.html").read_text())
    names = {tag for tag, _a in parser.tags}
    assert not names & {"script", "link", "iframe", "object", "embed", "frame", "base", "meta-refresh"}, names
    refs = [
        (tag, key, value or "")
        for tag, attrs in parser.tags
        for key, value in attrs.items()
        if key in ("src", "href", "srcset", "action", "poster", "data", "xlink:href", "background")
        or key.startswith("on")
    ]
    assert refs, "no figures or anchors at all?"
    bad = [r for r in refs if not r[2].startswith(("data:image/png;base64,", "#")) or r[1].startswith("on")]
    assert bad == []
    styles = " ".join(parser.styles) + " ".join(a.get("style") or "" for _t, a in parser.tags)
    assert "url(" not in styles and "@import" not in styles
    assert sum(tag == "img" for tag, _a in parser.tags) == len(_embedded_pngs((report[0] / "report.html").read_text()))


def test_examples_are_escaped(tiny_report):
    html = tiny_report.html.read_text()
    md = tiny_report.markdown.read_text()
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;document.title=&#34;pwned&#34;" in html or "&lt;script&gt;document.title=&quot;pwned" in html
    assert "<script>" not in md and "<img" not in md and "&lt;script>document.title" in md
    results = json.loads(tiny_report.results.read_text())
    assert any(INJECTED.strip() in row["response"] for ex in results["models"][0]["examples"] for row in ex["rows"])


def test_figures_skip_cleanly_when_studies_were_not_run(synthetic_store, tmp_path):
    store = tmp_path / "partial.sqlite"
    shutil.copy(synthetic_store, store)
    with sqlite3.connect(store) as db:
        db.execute("DELETE FROM analyses WHERE kind IN ('threshold', 'sign', 'readability')")
        db.execute("UPDATE generations SET score = NULL")
    paths = build_report(store, tmp_path / "out")
    md = paths.markdown.read_text()
    for title in ("Threshold curve", "Sign inversion", "Readability vs steerability", "Judge agreement"):
        assert f"*{title}: skipped — " in md
    assert "Flip rate by layer and alpha" in md


# --------------------------------------------------------------------------- errors


def test_errors_are_one_line(tmp_path, synthetic_store):
    with pytest.raises(ReportError, match="does not exist"):
        build_report(tmp_path / "missing.sqlite", tmp_path / "out")
    with pytest.raises(ReportError, match="no run 'nope'"):
        build_report(synthetic_store, tmp_path / "out", run_id="nope")
    empty = tmp_path / "empty.sqlite"
    s = Store(empty)
    s.open_run("r1", "empty", "name: empty\n", "r1", {})
    s.close()
    with pytest.raises(ReportError, match="has no analyses"):
        build_report(empty, tmp_path / "out")
    runner = CliRunner()
    for args in (
        ["report", "--store", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "o")],
        ["report", "--store", str(empty), "--out", str(tmp_path / "o")],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        lines = [x for x in result.output.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt-get on first use (root); skipped only where that is impossible."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    why = ""
    for cmds in (
        [["apt-get", "install", "-y", "-q", "chromium"]],
        [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]],
    ):
        for cmd in cmds:
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
            except subprocess.TimeoutExpired:
                pytest.skip(f"installing chromium timed out: {' '.join(cmd)}")
            why = (done.stderr.strip().splitlines() or ["?"])[-1]
        found = shutil.which("chromium")
        if found:
            return found
    pytest.skip(f"chromium could not be installed with apt-get: {why}")


class _WebSocket:
    """Just enough RFC 6455 (client side) for Chromium's DevTools: masked text frames out, ping/pong, fragments."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        end = self.buf.index(b"\r\n\r\n")
        status = bytes(self.buf[:end]).split(b"\r\n", 1)[0]
        del self.buf[: end + 4]
        if b" 101 " not in status:
            raise ConnectionError(f"DevTools refused the WebSocket: {status!r}")

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("DevTools closed the connection")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytearray([0x80 | opcode])
        if n < 126:
            head.append(0x80 | n)
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        mask = os.urandom(4)
        masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
        self.sock.sendall(bytes(head) + mask + masked)

    def send(self, text: str) -> None:
        self._send(0x1, text.encode())

    def recv(self) -> str:
        message = bytearray()
        while True:
            b0, b1 = self._take(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(self._take(2), "big")
            elif n == 127:
                n = int.from_bytes(self._take(8), "big")
            payload = self._take(n)  # servers never mask
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self._send(0xA, payload)
            elif opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            elif opcode in (0x0, 0x1, 0x2):
                message += payload
                if b0 & 0x80:
                    return message.decode()


class _DevTools:
    def __init__(self, ws: _WebSocket) -> None:
        self.ws, self.next_id, self.events = ws, 0, []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["method"] == method:
                    return event
            assert time.monotonic() < deadline, f"no {method} within {timeout} s"
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)


_FIGURE_CHECK = """JSON.stringify({
  title: document.title,
  scripts: document.scripts.length,
  height: document.documentElement.scrollHeight,
  images: [...document.querySelectorAll('img')].map(img => {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, c.width || 1, c.height || 1).data;
    const colours = new Set();
    for (let i = 0; i < d.length && colours.size < 64; i += 4 * 7) {
      colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    }
    const box = img.getBoundingClientRect();
    return {id: img.dataset.figure, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
            shown_w: box.width, shown_h: box.height, colours: colours.size};
  })
})"""


def test_report_in_headless_chromium(chromium, report, tmp_path):
    html_path, results_path = report[0] / "report.html", report[0] / "results.json"
    profile = tmp_path / "profile"
    log = (tmp_path / "chromium.log").open("w")
    proc = subprocess.Popen(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited: {(tmp_path / 'chromium.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port within 60 s"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        targets = json.loads(opener.open(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        page = next(t for t in targets if t["type"] == "page")
        dt = _DevTools(_WebSocket(page["webSocketDebuggerUrl"]))
        for domain in ("Runtime", "Log", "Network", "Page"):
            dt.call(f"{domain}.enable")
        dt.call("Page.navigate", url=html_path.resolve().as_uri())
        dt.wait_for("Page.loadEventFired")
        dt.call("Emulation.setDeviceMetricsOverride", width=1100, height=900, deviceScaleFactor=1, mobile=False)
        state = json.loads(dt.call("Runtime.evaluate", expression=_FIGURE_CHECK, returnByValue=True)["result"]["value"])
        shot = base64.b64decode(dt.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
        (tmp_path / "report.png").write_bytes(shot)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    problems = []
    for ev in dt.events:
        method, params = ev["method"], ev.get("params", {})
        if method == "Runtime.exceptionThrown":
            problems.append(params["exceptionDetails"].get("text"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
            problems.append([a.get("value") for a in params.get("args", [])])
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            problems.append(params["entry"]["text"])
        elif method == "Network.requestWillBeSent" and not params["request"]["url"].startswith(("file:", "data:")):
            problems.append(f"request to {params['request']['url']}")
        elif method == "Network.loadingFailed":
            problems.append(f"load failed: {params.get('errorText')}")
    assert problems == []
    assert state["title"].startswith("crystallized-safety report") and state["scripts"] == 0  # injected markup inert

    results = json.loads(results_path.read_text())
    expected = {f["id"] for f in results["models"][0]["figures"]} | {f["id"] for f in results["cross_figures"]}
    images = {img["id"]: img for img in state["images"]}
    assert set(images) == expected
    for fig_id, img in images.items():
        assert img["complete"] and img["w"] > 300 and img["h"] > 200, fig_id
        assert img["shown_w"] > 300 and img["shown_h"] > 150, fig_id  # laid out at paper width, not collapsed
        assert img["colours"] > 8, f"{fig_id} renders blank in the browser"
    assert _nonblank(shot)
    assert mpimg.imread(io.BytesIO(shot), format="png").shape[0] >= state["height"] * 0.9  # the full page


def test_answer_spreads_count_distinct_flip_answers_per_cell():
    """Flips are counted over prompts refused unsteered; identical answers (case and spacing aside) are one."""
    from crystallized_safety.experiments.conditions import Condition
    from crystallized_safety.report.examples import answer_spreads

    base, steered = Condition("harmful"), Condition("harmful", (3,), -1.0)
    conds = {"b": json.loads(base.to_json()), "s": json.loads(steered.to_json())}

    def gen(key, i, refusal, coherent, response):
        return {"condition_key": key, "prompt_set": "harmful", "prompt_index": i, "refusal": refusal,
                "coherent": coherent, "response": response}  # fmt: skip

    gens = [gen("b", i, int(i < 4), 1, "I can't.") for i in range(5)]
    gens += [gen("s", 0, 0, 1, "I'm not."), gen("s", 1, 0, 1, "i'm  NOT."), gen("s", 2, 0, 1, "Sure: step one")]
    gens += [gen("s", 3, 0, 0, "soup soup"), gen("s", 4, 0, 1, "not refused at baseline")]
    spread = answer_spreads(gens, conds)
    assert spread == {steered.describe(): {"flips": 3, "distinct": 2, "top": "i'm not.", "top_count": 2}}
