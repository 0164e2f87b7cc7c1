"""Stores read lazily by the PyData stack (xarray, dask) without actstore, as promised in
docs/store-format.md: users on a cluster analyse them with their own tools."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from actstore.store import create_store

xr = pytest.importorskip("xarray")
da = pytest.importorskip("dask.array")


@pytest.fixture()
def store_and_values(tmp_path):
    rng = np.random.default_rng(7)
    n, L, d, R = 29, 4, 12, 8  # rows not a multiple of the chunk
    ent = pd.DataFrame({"name": [f"p{i}" for i in range(n)], "entity": [f"p{i}" for i in range(n)],
                        "latitude": rng.uniform(-90, 90, n), "longitude": rng.uniform(-180, 180, n),
                        "is_test": rng.random(n) < 0.25, "entity_type": "city"})
    st = create_store(tmp_path / "s.zarr", layers=[1, 3, 5, 7], n_rows=n, d_model=d, entities=ent,
                      targets=("latitude", "longitude"), group_columns=(), meta={},
                      rows_per_chunk=R)
    values = (rng.standard_normal((L, n, d)) * 3 + 1).astype(np.float16)
    for s in range(0, n, R):
        st.write_rows(s, values[:, s:s + R])
        st.mark_done(min(n, s + R))
    st.close()
    return tmp_path / "s.zarr", values


def test_xarray_open_zarr_layer_mean(store_and_values):
    path, values = store_and_values
    ds = xr.open_zarr(path, consolidated=False)
    assert ds["resid"].dims == ("layer", "row", "dim")
    assert ds["layer"].values.tolist() == [1, 3, 5, 7]
    mean = ds["resid"].sel(layer=5).astype("float64").mean("row").values
    np.testing.assert_allclose(mean, values[2].astype(np.float64).mean(0), rtol=1e-12)


def test_dask_from_zarr_layer_mean(store_and_values):
    path, values = store_and_values
    arr = da.from_zarr(str(path), component="resid")
    assert arr.shape == values.shape and arr.dtype == np.float16
    got = arr[1].astype("float64").mean(axis=0).compute()
    np.testing.assert_allclose(got, values[1].astype(np.float64).mean(0), rtol=1e-12)
