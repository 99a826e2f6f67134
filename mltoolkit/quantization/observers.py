"""Calibration observers of static int8 activation quantization: each watches the tensors flowing into a layer during
calibration (forward returns its input unchanged) and proposes one symmetric per-tensor scale, threshold / 127, where
the threshold T is the magnitude that maps to the code 127 (values beyond it clip).

    MinMaxObserver               T = max |x| seen (running min and max kept)
    MovingAverageMinMaxObserver  min and max as exponential moving averages of each batch's min and max
                                 (averaging_constant c: m <- m + c (batch_m - m); the first batch sets them)
    PercentileObserver           T = the `percentile` of |x| over everything seen, read from a histogram
    MSEObserver                  T minimising the expected quantization error (rounding inside [-T, T], clipping
                                 outside) of the histogram of |x|

The histogram observers keep `bins` counts of |x| over [0, upper]. The first batch sets upper to its max |x|; a
later, larger value doubles upper as many times as needed and merges the old counts pairwise, so no count is ever
smeared across bins (torch.ao's HistogramObserver interpolates instead; this is simpler and exact about what it
keeps, at the price of using as few as half the bins).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_TINY = torch.finfo(torch.float32).tiny


class Observer(nn.Module):
    """Base: forward(x) records x (detached, float32) and returns x unchanged; threshold() -> T; scale() -> the float32
    scale T / 127 as a 0-d tensor (at least FLT_MIN; 1 when everything seen was zero)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}: observed tensors must be floating point, got {x.dtype}")
        xf = x.detach().float()
        if xf.numel():
            if not bool(torch.isfinite(xf).all()):
                raise ValueError(f"{type(self).__name__}: a calibration batch has inf or nan values")
            self.observe(xf)
            self.batches += 1
        return x

    def observe(self, x: Tensor) -> None:
        raise NotImplementedError

    def threshold(self) -> float:
        raise NotImplementedError

    def scale(self) -> Tensor:
        if int(self.batches) == 0:
            raise RuntimeError(f"{type(self).__name__}: no calibration data seen; run calibration batches through the "
                               "prepared model (mltoolkit.quantization.calibrate) before convert")
        s = torch.tensor(self.threshold(), dtype=torch.float64) / 127
        s = s.float()
        return s if float(s) >= _TINY else torch.ones((), dtype=torch.float32)


class MinMaxObserver(Observer):
    def __init__(self):
        super().__init__()
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))

    def observe(self, x: Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, x.min().to(self.min_val.device))
        self.max_val = torch.maximum(self.max_val, x.max().to(self.max_val.device))

    def threshold(self) -> float:
        return max(abs(float(self.min_val)), abs(float(self.max_val)))

    def extra_repr(self) -> str:
        return f"min_val={float(self.min_val):.4g}, max_val={float(self.max_val):.4g}"


class MovingAverageMinMaxObserver(MinMaxObserver):
    def __init__(self, averaging_constant: float = 0.01):
        super().__init__()
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"MovingAverageMinMaxObserver: averaging_constant must be in (0, 1], got "
                             f"{averaging_constant!r}")
        self.averaging_constant = float(averaging_constant)

    def observe(self, x: Tensor) -> None:
        bmin, bmax = x.min().to(self.min_val.device), x.max().to(self.max_val.device)
        if int(self.batches) == 0:
            self.min_val, self.max_val = bmin.clone(), bmax.clone()
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (bmin - self.min_val)
            self.max_val = self.max_val + c * (bmax - self.max_val)


class _HistogramObserver(Observer):
    def __init__(self, bins: int = 2048):
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 16:
            raise ValueError(f"{type(self).__name__}: bins must be an int >= 16, got {bins!r}")
        self.bins = bins
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("upper", torch.zeros((), dtype=torch.float64))

    def observe(self, x: Tensor) -> None:
        a = x.abs().flatten()
        amax = float(a.max())
        upper = float(self.upper)
        if upper == 0.0:
            if amax == 0.0:  # all zeros so far: count them in bin 0 once a range exists
                self.histogram[0] += a.numel()
                return
            upper = amax
        elif amax > upper:
            # Double the range until it covers amax; merging 2^j neighbouring bins keeps every count in its place.
            j = math.ceil(math.log2(amax / upper))
            while upper * 2 ** j < amax:
                j += 1
            factor = 2 ** j
            idx = torch.arange(self.bins, device=self.histogram.device) // factor
            merged = torch.zeros_like(self.histogram).index_add_(0, idx, self.histogram)
            self.histogram = merged
            upper = upper * factor
        self.upper = torch.tensor(upper, dtype=torch.float64)
        self.histogram += torch.histc(a.double(), bins=self.bins, min=0.0, max=upper).to(self.histogram.device)

    def _edges(self) -> Tensor:
        return torch.linspace(0.0, float(self.upper), self.bins + 1, dtype=torch.float64)


class PercentileObserver(_HistogramObserver):
    def __init__(self, percentile: float = 99.99, bins: int = 2048):
        super().__init__(bins)
        if not 0 < percentile <= 100:
            raise ValueError(f"PercentileObserver: percentile must be in (0, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def threshold(self) -> float:
        counts = self.histogram
        total = float(counts.sum())
        if total == 0 or float(self.upper) == 0:
            return 0.0
        target = self.percentile / 100 * total
        cum = counts.cumsum(0)
        i = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))[0].clamp(max=self.bins - 1))
        before = float(cum[i - 1]) if i > 0 else 0.0
        frac = (target - before) / float(counts[i]) if float(counts[i]) > 0 else 1.0
        width = float(self.upper) / self.bins
        return (i + min(max(frac, 0.0), 1.0)) * width


class MSEObserver(_HistogramObserver):
    """T among `candidates` evenly spaced bin edges, minimising sum over bins of count * E[error^2], with |x|
    uniform inside each bin: s^2 / 12 (rounding noise, s = T / 127) for the part of a bin below T, and the mean of
    (v - T)^2 over the part above it (clipping)."""

    def __init__(self, bins: int = 2048, candidates: int = 512):
        super().__init__(bins)
        self.candidates = max(1, min(int(candidates), bins))

    def expected_error(self, thresholds: Tensor) -> Tensor:
        """Expected squared error (summed over everything seen) for each clipping threshold in `thresholds`."""
        edges = self._edges()
        a, b, c = edges[:-1], edges[1:], self.histogram
        t = thresholds.double().reshape(-1, 1)
        width = (b - a).clamp_min(1e-300)
        inside = ((t - a) / width).clamp(0, 1)
        lo = torch.maximum(a, t)
        clip = torch.where(b > t, ((b - t) ** 3 - (lo - t) ** 3) / (3 * width), torch.zeros_like(lo))
        step = t / 127
        return (c * (inside * step ** 2 / 12 + clip)).sum(1)

    def threshold(self) -> float:
        if float(self.histogram.sum()) == 0 or float(self.upper) == 0:
            return 0.0
        edges = self._edges()[1:]
        stride = max(1, self.bins // self.candidates)
        cand = edges[stride - 1::stride]
        err = self.expected_error(cand)
        return float(cand[int(err.argmin())])


OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
             "percentile": PercentileObserver, "mse": MSEObserver}
