"""The latent browser's data, checked against dense brute-force computations on a tiny real run
(extract, a seeded random SAE, dump, aggregate), plus the page's escaping and the offline DVC
plots template. The page in a real browser: test_browser.py."""

from __future__ import annotations

import configparser
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import zarr
from torch import nn

from browse_run import NASTY, tiny_run, tiny_run_skip_first  # noqa: F401  (session fixtures)
from mlsae.browse import page
from mlsae.browse.data import collect, decoder_logit_lens, latent_columns, nearest_latents
from mlsae.browse.vega import plots_template
from mlsae.core.errors import MlsaeError
from mlsae.core.params import BrowseParams, parse_params
from mlsae.core.paths import LATENT_STATS, PLOTS_TEMPLATE
from mlsae.sae.model import MLSAE

ROOT = Path(__file__).resolve().parents[1]
P = BrowseParams(
    latents=40, contexts=3, before=5, after=2, bins=7, logit_tokens=4, neighbours=3, prompts=2, prompt_latents=4
)


class _Tok:
    """Decodes token t as 'T<t>' (enough for the payload's vocab)."""

    def decode(self, ids: list[int]) -> str:
        return f"T{ids[0]}"


@pytest.fixture(scope="module", params=["skip_first_auto", "skip_first_true"])
def run(request: pytest.FixtureRequest) -> dict:
    """The payload of the tiny run (skip_first auto: off for this model) and of the same run with
    position 0 left out (skip_first true), with dense copies of the latent store to check it by."""
    built = request.getfixturevalue("tiny_run" if request.param == "skip_first_auto" else "tiny_run_skip_first")
    sae = MLSAE.load(built["sae"])
    torch.manual_seed(1)
    norm = nn.LayerNorm(sae.cfg.d_model)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    w_u = torch.randn(50, sae.cfg.d_model)
    payload = collect(built["latents"], built["analysis"], sae, norm, w_u, lambda t: f"T{t}", 50, P, model="tiny")
    root = zarr.open_group(str(built["latents"]), mode="r")
    dense = {k: np.asarray(root[k][:]) for k in ("indices", "values", "tokens", "context", "special", "position")}
    # the analysed tokens: not special, and not position 0 of a context when the run skips it
    assert bool(root.attrs["skip_first"]) == (request.param == "skip_first_true")
    dense["kept"] = ~dense["special"].astype(bool) & ~((dense["position"] == 0) & bool(root.attrs["skip_first"]))
    stats = pl.read_parquet(Path(built["analysis"]) / LATENT_STATS.name)
    return {"payload": payload, "dense": dense, "stats": stats, "sae": sae, "norm": norm, "w_u": w_u}


def _activation(dense: dict, f: int) -> np.ndarray:
    """Dense a[t, l] of latent f (0 where it is not among the top k), tokens left out of the
    analysis (special ones, a skipped position 0) zeroed."""
    a = np.where(dense["indices"] == f, dense["values"].astype(np.float32), 0.0).max(axis=2)
    a[~dense["kept"]] = 0
    return a


def test_selection_and_columns(run: dict) -> None:
    stats = run["stats"].filter(pl.col("count") > 0).sort(["count", "latent"], descending=[True, False])
    ids = [r["id"] for r in run["payload"]["latents"]]
    assert ids == stats["latent"].head(P.latents).to_list()
    for r in run["payload"]["latents"][:5]:
        row = stats.filter(pl.col("latent") == r["id"]).row(0, named=True)
        assert r["count"] == row["count"]
        assert r["mu"] == pytest.approx(row["mean_layer"], rel=1e-3)
        # the aggregate stage's per-latent columns, shown as they are
        if row["within_share"] is not None:
            assert r["within"] == pytest.approx(row["within_share"], rel=1e-3)
        assert r["eff"] == pytest.approx(row["effective_layers"], rel=1e-3)


def test_latent_columns_prefers_the_analysis_columns() -> None:
    base = {
        "latent": [0, 1],
        "count": [3, 0],
        "mean_layer": [1.0, None],
        "std_layer": [0.5, None],
        "var_layer": [0.25, 0.0],
        "var_token_mean": [0.1, None],
        "entropy": [0.5, None],
        "layer_dist": [[0.5, 0.5], None],
    }
    old, notes = latent_columns(pl.DataFrame(base), n_layers=2)
    assert old["within_share"].to_list() == [pytest.approx(0.4), None]
    assert old["effective_layers"][0] == pytest.approx(2**0.5)
    assert "stand-in" in notes["within_share"] and "stand-in" in notes["effective_layers"]
    new, notes = latent_columns(pl.DataFrame({**base, "within_share": [0.9, None], "effective_layers": [1.5, None]}), 2)
    assert new["within_share"][0] == 0.9 and new["effective_layers"][0] == 1.5
    assert "stand-in" not in notes["within_share"] + notes["effective_layers"]


def test_contexts_heatmaps_and_histograms_match_dense(run: dict) -> None:
    dense = run["dense"]
    for r in run["payload"]["latents"]:
        a = _activation(dense, r["id"])
        peak = a.max(axis=1)
        # top contexts: best token of each context, ranked by peak then token index
        best: dict[int, tuple[float, int]] = {}
        for t in np.flatnonzero(peak > 0):
            c = int(dense["context"][t])
            if c not in best or peak[t] > best[c][0]:
                best[c] = (float(peak[t]), int(t))
        expected = sorted(best.values(), key=lambda x: (-x[0], x[1]))[: P.contexts]
        assert [c["value"] for c in r["ctx"]] == pytest.approx([v for v, _ in expected], rel=1e-3)
        for c, (_, t) in zip(r["ctx"], expected):
            first = t - c["peak"]
            assert dense["tokens"][t] == c["tokens"][c["peak"]]
            assert c["tokens"] == dense["tokens"][first : first + len(c["tokens"])].tolist()
            assert (dense["context"][first : first + len(c["tokens"])] == dense["context"][t]).all()
            assert c["peak"] <= P.before and len(c["tokens"]) - c["peak"] - 1 <= P.after
            window = _activation(dense, r["id"])[first : first + len(c["tokens"])]
            cells = {(p, l_): v for p, l_, v in c["heat"]}
            assert set(cells) == {(int(p), int(l_)) for p, l_ in zip(*np.nonzero(window))}
            for (p, l_), v in cells.items():
                assert v == pytest.approx(window[p, l_], rel=5e-3)  # 3 significant digits
        # histogram of the active entries over (0, max]
        vals = a[a > 0]
        assert r["hist"]["max"] == pytest.approx(vals.max(), rel=1e-3)
        bins = np.minimum(P.bins - 1, np.floor(vals / vals.max() * P.bins).astype(int))
        assert r["hist"]["counts"] == np.bincount(bins, minlength=P.bins).tolist()


def test_decoder_logit_lens_ranks_the_norms_response(run: dict) -> None:
    """Independent check: the logit change norm(d) - norm(0) through W_U, for the real norm
    modules, ranks tokens as W_U (gamma * c(d)) does (LayerNorm centres, RMS-style norms do not)."""

    class RMS(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.rand(d) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight * x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()

    sae, w_u = run["sae"], run["w_u"]
    selected = np.array([r["id"] for r in run["payload"]["latents"]])
    w_dec = sae.W_dec.detach()
    for norm in (run["norm"], RMS(sae.cfg.d_model)):
        top, topv, bot, _ = decoder_logit_lens(w_dec, norm, w_u, selected, 5, vocab=40, batch=7)
        with torch.no_grad():
            d = w_dec[:, torch.as_tensor(selected)].T  # (S, d)
            delta = norm(d) - norm(torch.zeros_like(d))
            logits = (delta @ w_u[:40].T).numpy()
        np.testing.assert_array_equal(top, np.argsort(-logits, axis=1, kind="stable")[:, :5])
        np.testing.assert_array_equal(bot, np.argsort(logits, axis=1, kind="stable")[:, :5])
        assert (np.diff(topv, axis=1) <= 0).all()


def test_nearest_latents_brute_force(run: dict) -> None:
    w = run["sae"].W_dec.detach().numpy().astype(np.float64)
    cand = np.arange(0, w.shape[1], 2)
    sel = np.array([0, 3, 10])
    ids, cos = nearest_latents(torch.as_tensor(w, dtype=torch.float32), sel, cand, 4, batch=2)
    unit = w / np.linalg.norm(w, axis=0)
    for i, f in enumerate(sel):
        c = unit[:, f] @ unit
        pool = [g for g in cand if g != f]
        want = sorted(pool, key=lambda g: -c[g])[:4]
        assert ids[i].tolist() == want
        np.testing.assert_allclose(cos[i], c[want], rtol=1e-5)
    links = run["payload"]["latents"][0]["nn"]
    assert len(links) == P.neighbours and run["payload"]["latents"][0]["id"] not in [g for g, _ in links]


def test_prompt_tokens_list_their_strongest_latents(run: dict) -> None:
    dense = run["dense"]
    pr = run["payload"]["prompts"][0]
    n = len(pr["tokens"])
    assert pr["tokens"] == dense["tokens"][:n].tolist()
    assert not dense["kept"][0] and pr["latents"][0] == []  # the stream's separator: no latents listed
    for i in (0, 1, n // 2, n - 1):
        idx, val = dense["indices"][i].reshape(-1), dense["values"][i].astype(np.float32).reshape(-1)
        val = val * dense["kept"][i]
        peaks: dict[int, float] = {}
        for f, v in zip(idx.tolist(), val.tolist()):
            if v > 0:
                peaks[f] = max(peaks.get(f, 0.0), v)
        want = sorted(peaks, key=lambda f: (-peaks[f], f))[: P.prompt_latents]
        assert [f for f, _, _ in pr["latents"][i]] == want
        for f, _, entries in pr["latents"][i]:
            layers = np.nonzero((dense["indices"][i] == f).any(axis=1))[0].tolist()
            assert [l_ for l_, _ in entries] == layers
    # every prompt: the tokens the analysis leaves out (separators; position 0 when skipped) list none
    starts = np.flatnonzero(dense["position"] == 0)[: P.prompts]
    assert len(run["payload"]["prompts"]) == len(starts) == P.prompts
    left_out_starts = 0
    for pr, a in zip(run["payload"]["prompts"], starts):
        assert pr["tokens"] == dense["tokens"][a : a + len(pr["tokens"])].tolist()
        for i, listed in enumerate(pr["latents"]):
            assert (listed == []) == (not dense["kept"][a + i] or not (dense["values"][a + i] > 0).any()), (a, i)
        left_out_starts += int(not dense["kept"][a] and not dense["special"][a])
    assert left_out_starts == (0 if dense["kept"][dense["position"] == 0].any() else P.prompts - 1)


def test_page_escapes_corpus_text(run: dict) -> None:
    payload = json.loads(json.dumps(run["payload"]))
    payload["vocab"]["0"] = NASTY
    payload["meta"]["model"] = "<i>m</i>"
    text = page.render(payload)
    body = text.split('<script type="application/json" id="data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in body and ">" not in body and "&" not in body
    assert json.loads(body)["vocab"]["0"] == NASTY
    assert "<title>mlsae latents: &lt;i&gt;m&lt;/i&gt;</title>" in text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text


def test_csp_allows_only_the_pages_own_inline_script_and_style_by_hash(run: dict) -> None:
    """Issue 28 (14): the CSP allowed 'unsafe-inline' scripts, so escaping was the only wall
    against an injected handler. Now exactly the page's own script and style are allowed, by the
    sha256 of their content (the browser test checks that an injected handler does not run)."""
    import base64
    import hashlib
    import re

    text = page.render(run["payload"])
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', text).group(1)
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    scripts = re.findall(r"<script>(.*?)</script>", text, re.S)  # executable: no type attribute
    styles = re.findall(r"<style>(.*?)</style>", text, re.S)
    assert len(scripts) == len(styles) == 1

    def source(body: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    assert directives["script-src"] == source(scripts[0]) and directives["style-src"] == source(styles[0])
    assert directives["default-src"] == "'none'"


def test_browse_params_are_validated() -> None:
    with pytest.raises(MlsaeError, match=r"^browse\.latents: input should be greater than or equal to 1 \(got 0\)$"):
        parse_params({"browse": {"latents": 0}})
    with pytest.raises(MlsaeError, match=r"^browse\.before: input should be greater than or equal to 0 \(got -1\)$"):
        parse_params({"browse": {"before": -1}})
    with pytest.raises(MlsaeError, match=r"^browse\.colour: unknown param"):
        parse_params({"browse": {"colour": 1}})


def test_dvc_plots_template_is_the_vendored_builds() -> None:
    """The committed template is what the generator makes from vendor/vega, and .dvc/config uses it."""
    assert (ROOT / PLOTS_TEMPLATE).read_text(encoding="utf8") == plots_template(ROOT)
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc" / "config")
    assert (ROOT / ".dvc" / cfg["plots"]["html_template"].strip()).resolve() == (ROOT / PLOTS_TEMPLATE).resolve()
    text = (ROOT / PLOTS_TEMPLATE).read_text(encoding="utf8")
    assert "{plot_divs}" in text and "{scripts}" not in text and "<script src" not in text


def test_missing_inputs_fail_in_one_line(run: dict, tiny_run: dict, tmp_path: Path) -> None:  # noqa: F811
    args = (run["sae"], run["norm"], run["w_u"], str, 50, P)
    with pytest.raises(MlsaeError, match="latents.parquet: not found"):
        collect(tiny_run["latents"], tmp_path, *args)
    with pytest.raises(MlsaeError, match=r"none\.zarr: latent store not found \(run the dump stage first\)"):
        collect(tmp_path / "none.zarr", tiny_run["analysis"], *args)
