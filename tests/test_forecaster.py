"""The forecaster plugin through the batch engine: sample paths equal the module sampled directly
with the reference sampler, seeded forecasts do not depend on the batch, bad inputs name the input."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pyserve.demo.data import seasonal_series
from pyserve.engine import load_engine, run_engine
from pyserve.engine.batch import TensorRequest
from pyserve.errors import InvalidParameter

from tiny_models import make_forecaster


@pytest.fixture(scope="module")
def forecaster_dir(tmp_path_factory):
    return make_forecaster(tmp_path_factory.mktemp("forecaster"))



def test_forecasts_match_the_module_and_do_not_depend_on_the_batch(forecaster_dir):
    from plugins.forecaster.model import Binning, CausalForecaster, forecast
    cfg = json.loads((forecaster_dir / "config.json").read_text())
    history = seasonal_series(3, cfg["context_length"], seed=1)
    history[1, :5] = np.nan  # left padding
    seeds = np.array([5, 6, 7], dtype=np.int64)
    engine = load_engine(forecaster_dir, device="cpu")
    together = run_engine(engine, {f"r{i}": TensorRequest({"history": history[i:i + 1], "seed": seeds[i:i + 1]})
                            for i in range(3)})
    alone = run_engine(engine, {"r1": TensorRequest({"history": history[1:2], "seed": seeds[1:2]})})["r1"]

    module = CausalForecaster(cfg["num_bins"], cfg["context_length"], cfg["d_model"], cfg["num_layers"],
                              cfg["num_heads"])
    module.load_state_dict(load_file(forecaster_dir / "model.safetensors"))
    with torch.no_grad():
        want = forecast(module.eval(), Binning(cfg["num_bins"], cfg["bin_range"]), torch.from_numpy(history),
                        torch.from_numpy(seeds), cfg["horizon"], cfg["num_samples"], backend="reference").numpy()
    got = np.concatenate([together[f"r{i}"].outputs["samples"] for i in range(3)])
    assert got.shape == (3, cfg["num_samples"], cfg["horizon"])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(alone.outputs["samples"], together["r1"].outputs["samples"])
    out = together["r0"].outputs
    np.testing.assert_allclose(out["mean"][0], want[0].mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(out["quantiles"][0], np.quantile(want[0], [0.1, 0.5, 0.9], axis=0), rtol=1e-5)


@pytest.mark.parametrize("history,field", [
    (np.zeros((1, 31), np.float32), "history"), (np.zeros((1, 32), np.float64), "history"),
    (np.full((1, 32), np.nan, np.float32), "history"), (np.full((1, 32), np.inf, np.float32), "history"),
])
def test_bad_histories_name_the_input(forecaster_dir, history, field):
    with pytest.raises(InvalidParameter, match=field):
        load_engine(forecaster_dir, device="cpu").add("r", TensorRequest({"history": history,
                                                                          "seed": np.array([1])}))
