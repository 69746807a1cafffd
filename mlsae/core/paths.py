"""Every file name and store key in one place (stages and tests import these, never literals)."""

from pathlib import Path

DATA = Path("data")
REPORTS = Path("reports")

ACTIVATIONS = DATA / "activations.zarr"
LATENTS = DATA / "latents.zarr"
SAE_DIR = DATA / "sae"
LENS_DIR = DATA / "lens"
ANALYSIS_DIR = DATA / "analysis"
BASELINE_DIR = DATA / "baseline"  # the baseline stage's per-document splice sums
CHECKPOINTS_DIR = DATA / "checkpoints"  # untracked working state of resumable stages
CORPUS_MANIFEST = DATA / "corpus.json"  # written by the check stage; extract depends on it

METRICS_DIR = REPORTS / "metrics"
PLOTS_DIR = REPORTS / "plots"
TABLES_DIR = REPORTS / "tables"
FIGURES_DIR = REPORTS / "figures"
BROWSER_DIR = REPORTS / "browser"  # the static latent browser (index.html)
BROWSER_INDEX = "index.html"

EXTRACT_METRICS = METRICS_DIR / "extract.json"
LENS_METRICS = METRICS_DIR / "lens.json"
TRAIN_METRICS = METRICS_DIR / "train.json"
EVAL_METRICS = METRICS_DIR / "eval.json"
BASELINE_METRICS = METRICS_DIR / "baseline.json"
ANALYSIS_METRICS = METRICS_DIR / "analysis.json"

TRAIN_PLOT = PLOTS_DIR / "train.csv"
EVAL_PLOT = PLOTS_DIR / "eval_by_layer.csv"
LENS_PLOT = PLOTS_DIR / "lens_by_layer.csv"
ADJ_COS_PLOT = PLOTS_DIR / "adjacent_cos.csv"
MEAN_HIST_PLOT = PLOTS_DIR / "latent_mean_layer_hist.csv"
STD_HIST_PLOT = PLOTS_DIR / "latent_std_hist.csv"
LAYER_ACTIVITY_PLOT = PLOTS_DIR / "layer_activity.csv"

# baseline directory contents
BASELINE_SUMS = "sums.npz"

PIPELINE_OUTPUTS = (
    CORPUS_MANIFEST,
    ACTIVATIONS,
    LATENTS,
    SAE_DIR,
    LENS_DIR,
    BASELINE_DIR,
    ANALYSIS_DIR,
    CHECKPOINTS_DIR,
    METRICS_DIR,
    PLOTS_DIR,
    TABLES_DIR,
    FIGURES_DIR,
    BROWSER_DIR,
)
"""What the stages write (and their working state): tools outside the pipeline (`mlsae export`,
`mlsae compare`) never write into, over or around these."""


def inside_outputs(path: str | Path, root: str | Path = ".") -> Path | None:
    """The pipeline output (of the project at `root`) that `path` is, lies inside or contains;
    None when it touches none."""
    target = Path(path).absolute().resolve()
    for out in PIPELINE_OUTPUTS:
        full = (Path(root) / out).absolute().resolve()
        if target == full or full in target.parents or target in full.parents:
            return out
    return None


# SAE directory contents
SAE_WEIGHTS = "sae.safetensors"
SAE_CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
RUN_RECORD = "run.json"  # in CHECKPOINTS_DIR: the params `check` validated for the run in progress

# tuned-lens directory contents (the tuned-lens package's own names)
LENS_CONFIG = "config.json"
LENS_PARAMS = "params.pt"

# Activation store arrays and attrs
STORE_SCHEMA = 4  # 2: CRC32C on the large arrays; 3: on every array, a completion record, the corpus content
# hash; 4: document ids and the document split
HOOK_NAME = "blocks.{i}.hook_resid_post"
RESID = "resid"
TOKENS = "tokens"
CONTEXT = "context"
POSITION = "position"
SPECIAL = "special"
DOCUMENT = "document"
SPLITS = ("train", "eval")

# Latent store arrays
INDICES = "indices"
VALUES = "values"

# analysis parquet files
TOKEN_STATS = ANALYSIS_DIR / "token_latent.parquet"
LATENT_STATS = ANALYSIS_DIR / "latents.parquet"
LAYER_STATS = ANALYSIS_DIR / "layers.parquet"
LATENT_LAYER = ANALYSIS_DIR / "latent_layer.parquet"
TOP_TOKENS = ANALYSIS_DIR / "top_tokens.parquet"

# vendored Vega builds (npm) and the offline DVC plots template made from them
VEGA_DIR = Path("vendor") / "vega"
VEGA_SCRIPTS = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")
PLOTS_TEMPLATE = VEGA_DIR / "dvc-plots-template.html"
