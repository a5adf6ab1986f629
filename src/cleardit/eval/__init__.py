"""Evaluation: image metrics between a reference and a test folder (``cleardit eval images``), and
teacher-vs-CLEAR evaluation of a model on a prompt list (``cleardit eval model``).

Heavy imports (torchmetrics, transformers, PIL, matplotlib) happen inside the functions that
need them, so importing this package is cheap.
"""

from .cli import add_eval_parser
from .images import EvalResult, ImagePair, evaluate_folders, evaluate_pairs, load_image, pair_folders
from .metrics import METRIC_NAMES, LPIPSNet, build_metric, ms_ssim, psnr, resize_bilinear_tf1
from .model import ModelEvalResult, evaluate_model
from .prompts import bundled_prompts_path, load_prompts
from .report import load_result, plot_metrics_vs_radius, write_report, write_results
from .weights import ENV_WEIGHTS_DIR, MissingWeightsError, WeightsResolver

__all__ = [
    "ENV_WEIGHTS_DIR",
    "METRIC_NAMES",
    "EvalResult",
    "ImagePair",
    "LPIPSNet",
    "MissingWeightsError",
    "ModelEvalResult",
    "WeightsResolver",
    "add_eval_parser",
    "build_metric",
    "bundled_prompts_path",
    "evaluate_folders",
    "evaluate_model",
    "evaluate_pairs",
    "load_image",
    "load_prompts",
    "load_result",
    "ms_ssim",
    "pair_folders",
    "plot_metrics_vs_radius",
    "psnr",
    "resize_bilinear_tf1",
    "write_report",
    "write_results",
]
