"""The Python API of docs/python-api.md, as written there: actstore.extract(model, dataset,
config) -> actstore.open -> layer -> iter_batches (a torch training loop) -> to_xarray; and
``import actstore`` stays light."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import actstore


def test_extract_open_layer_batches_xarray(tmp_path, tiny_model, tiny_tokenizer, world_csv):
    config = actstore.ExtractConfig(prompt="coords", out=str(tmp_path / "w.zarr"),
                                    rows_per_chunk=16, progress=False)
    result = actstore.extract((tiny_model, tiny_tokenizer), world_csv, config)
    assert isinstance(result, actstore.ExtractResult)
    result.store.close()

    store = actstore.open(tmp_path / "w.zarr")
    x = store.layer(store.layers[-1], site="resid", as_="torch")
    assert x.shape == (store.n_rows, store.d_model) and x.dtype == torch.float16

    # a linear probe of latitude and longitude on the last layer, trained from batches
    torch.manual_seed(0)
    probe = torch.nn.Linear(store.d_model, 2, dtype=torch.float64)
    opt = torch.optim.SGD(probe.parameters(), lr=1e-3)
    seen = 0
    for epoch in range(2):
        for batch in store.iter_batches(8, layers=-1, targets="latitude,longitude",
                                        split="train", shuffle=True, seed=epoch,
                                        dtype=torch.float64):
            loss = torch.nn.functional.mse_loss(probe(batch["x"][:, 0]), batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(batch["rows"])
    assert seen == 2 * int((~store.is_test).sum())

    xr = pytest.importorskip("xarray")
    ds = store.to_xarray(site="resid")
    assert isinstance(ds, xr.Dataset)
    mean = ds["resid"].astype("float32").mean("row").sel(layer=store.layers[-1]).values
    np.testing.assert_allclose(mean, x.float().mean(0).numpy(), rtol=1e-5, atol=1e-6)
    store.close()


def test_extract_stays_the_package():
    import actstore.extract as ex

    assert ex is actstore.extract and callable(ex)
    assert ex.ExtractConfig is actstore.ExtractConfig and callable(ex.extract)


def test_import_actstore_is_light():
    heavy = ("torch", "pandas", "transformers", "actstore.extract")
    code = (f"import sys, actstore; actstore.open; "
            f"print(sorted(m for m in {heavy} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
