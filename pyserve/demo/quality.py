"""How good the demo models are, measured: a digit classifier for generated images, and MASE for
forecasts. Training scripts report these figures; the tests check them against their targets."""

import numpy as np

from .data import digits


class DigitClassifier:
    """An SVM on scikit-learn's 8x8 digits (about 99% accurate on held-out real digits). Images of
    any size that is a multiple of 8 are block-averaged down to 8x8 first; it is trained on the
    real digits and on their upsampled-then-averaged copies, which is what a 32x32 model's
    output looks like after the same reduction."""

    def __init__(self, seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.svm import SVC

        data = load_digits()
        up, _ = digits(32)
        x = np.concatenate([data.images.reshape(len(data.images), -1) / 16.0, self.features(up)])
        y = np.concatenate([data.target, data.target])
        self.model = SVC(gamma="scale", C=10.0, random_state=seed).fit(x, y)

    @staticmethod
    def features(images: np.ndarray) -> np.ndarray:
        """[N, H, W] or [N, H, W, C] images (uint8, or floats in [0, 1]) as 64 values in [0, 1]."""
        x = np.asarray(images, dtype=np.float32)
        if x.ndim == 4:
            x = x.mean(axis=-1)
        if images.dtype == np.uint8:
            x = x / 255.0
        n, h, w = x.shape
        return x.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4)).reshape(n, 64)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict(self.features(images))

    def accuracy(self, images: np.ndarray, labels) -> float:
        return float((self.predict(images) == np.asarray(labels)).mean())


def mase(forecast: np.ndarray, actual: np.ndarray, history: np.ndarray, period: int) -> float:
    """Mean absolute scaled error over many series: each series' forecast error divided by the
    in-sample error of its seasonal-naive forecast (the value one period earlier); < 1 beats it."""
    scale = np.abs(history[:, period:] - history[:, :-period]).mean(axis=1)
    return float((np.abs(forecast - actual).mean(axis=1) / scale).mean())


def seasonal_naive(history: np.ndarray, horizon: int, period: int) -> np.ndarray:
    """Repeat each series' last full period over the horizon."""
    last = history[:, -period:]
    return np.tile(last, (1, horizon // period + 1))[:, :horizon]
