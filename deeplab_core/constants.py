"""Numbers the whole project shares, defined once. Imports nothing heavy (no torch, no cv2), so
Ray CPU workers that only decode or write can use them without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from collections.abc import Callable
from typing import Any, Literal

IGNORE_INDEX = 255  # mask value that losses, metrics and padding treat as "no label"

# torchvision's ImageNet statistics, for RGB inputs scaled to [0, 1].
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# The DeepLab v3/v3+ papers' multi-scale evaluation scales.
DEFAULT_SCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _same(x: Any) -> Any:
    return x


def _mirrored(x: Any) -> Any:
    return x.flip(-1)  # a tensor method: no torch import here


@dataclass(frozen=True)
class TTASettings:
    """Test-time augmentation: the one setting segmentation, evaluation and the CRF search share
    (`deeplab_core.tta.predict` runs it). A new variant is a field here (or a subclass) whose
    `views` adds its transforms; configs, flags, the plan and the model stage pass it on whole.
    """

    scales: tuple[float, ...] = field(default=DEFAULT_SCALES, metadata={"help": "test-time scales"})
    flip: bool = field(default=True, metadata={"help": "horizontal-flip averaging"})
    fusion: Literal["mean", "max"] = field(
        default="mean", metadata={"help": "how scales are fused: mean (v3/v3+) or max (v2 MSC)"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive numbers, got {self.scales}")
        if self.fusion not in ("mean", "max"):
            raise ValueError(f"fusion must be 'mean' or 'max', got {self.fusion!r}")

    def views(self) -> tuple[Callable[[Any], Any], ...]:
        """The views averaged at every scale: each maps an N x C x H x W tensor to its view and,
        applied to that view's logits, back (an involution: identity, mirror, ...)."""
        return (_same, _mirrored) if self.flip else (_same,)

    def plain(self) -> TTASettings:
        """Single scale, no extra view: the evaluation table's "plain" row."""
        return TTASettings(scales=(1.0,), flip=False, fusion=self.fusion)

    @property
    def is_plain(self) -> bool:
        return self.scales == (1.0,) and len(self.views()) == 1


MIN_PROB = 1e-8  # CRF unary: -log(1e-8) ~ 18.4, a finite energy for probabilities that underflowed to 0


def _crf_field(default: float, help: str, *, minimum: float, strict: bool = False,
               search: tuple[float, float] | None = None, grid: tuple[float, ...] = ()) -> Any:
    """A CRFParams field with what every other place derives from it: the flag's help, the lower
    bound (`strict`: the bound itself is refused), and for a tuned kernel field the random-search
    range (log-uniform) and the grid-search axis (the default is always added to the axis)."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "strict": strict,
                                            "search": search, "grid": grid})


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF parameters; the defaults are DeepLab v2's (ResNet-101, VOC).

    The one place the CRF's field names, defaults, bounds and search ranges are written: both CRF
    backends take a CRFParams, and segment.py's `--crf-*` flags, the `crf.*` model-version tags,
    tune_crf.py's search space and every serialisation are derived from these fields.
    The search ranges: the papers searched bi_w 3-6, bi_xy_std 30-100 and bi_rgb_std 3-6 on VOC's
    500x375 photographs; smaller or noisier images need wider ranges.
    """

    iterations: int = _crf_field(10, "mean-field iterations", minimum=1)
    bi_w: float = _crf_field(4.0, "bilateral weight", minimum=0, search=(1.0, 10.0), grid=(3.0, 5.0))
    bi_xy_std: float = _crf_field(67.0, "bilateral xy width", minimum=0, strict=True, search=(5.0, 100.0),
                                  grid=(10.0, 30.0))
    bi_rgb_std: float = _crf_field(3.0, "bilateral RGB width", minimum=0, strict=True, search=(2.0, 40.0),
                                   grid=(5.0, 13.0))
    pos_w: float = _crf_field(3.0, "Gaussian weight", minimum=0, search=(0.5, 6.0), grid=(3.0,))
    pos_xy_std: float = _crf_field(1.0, "Gaussian xy width", minimum=0, strict=True, search=(0.5, 3.0),
                                   grid=(1.0,))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def tuned_fields(cls) -> tuple[str, ...]:
        """The kernel fields a tuning run searches and stores (iterations stay the run's choice)."""
        return tuple(f.name for f in fields(cls) if f.metadata["search"] is not None)
