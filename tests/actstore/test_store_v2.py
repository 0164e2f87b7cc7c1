"""Store format version 2 (issue 14): several site arrays, positions, target kinds, ragged
(token-row) stores with tokens/offsets + tokens/ids, the entity code arrays, version-1 stores
still opening with their defaults, and verify / --overwrite knowing every new array."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numcodecs import Zstd  # zarr's default codec for numeric arrays

from actstore.store import (
    FORMAT_VERSION,
    SITES,
    StoreError,
    check_store,
    create_store,
    open_store,
    remove_store,
)
from actstore.store.layout import store_files

V1 = Path(__file__).resolve().parents[1] / "fixtures" / "v1"
L, D, DM, R = 3, 8, 12, 4
WIDTHS = {"resid": D, "attn_out": D, "mlp_out": D, "neurons": DM}


def _table(n, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "name": [f"t{i}" for i in range(n)],
        "entity": [["Paris", "Tokyo", "Lima", "Oslo"][i % 4] for i in range(n)],
        "label": [["pos", "neg", "ünï"][i % 3] for i in range(n)],
        "score": rng.normal(size=n),
        "is_test": np.arange(n) % 4 == 0,
        "year": np.arange(n, dtype=np.int64) + 1900,
    })


def _blocks(n, sites=WIDTHS, seed=0, dtype=np.float16):
    rng = np.random.default_rng(seed)
    return {s: rng.standard_normal((L, n, d)).astype(dtype) for s, d in sites.items()}


def _make(path, n=18, fmt=None, sites=WIDTHS, position="last", tokens=None, n_texts=None,
          write=True):
    """A complete store with every site; returns (path, {site: (L, n, d)})."""
    st = create_store(path, layers=[1, 2, 3], n_rows=n, d_model=D,
                      entities=_table(n if n_texts is None else n_texts),
                      targets=("score", "label"), group_columns=("entity",),
                      meta={"model": {"id": "tiny"}}, format=fmt, rows_per_chunk=R,
                      sites=dict(sites), position=position, tokens=tokens,
                      target_kinds={"score": "regression", "label": "class"})
    x = _blocks(n, sites)
    if write:
        for s in range(0, n, R):
            e = min(n, s + R)
            st.write_rows(s, {k: v[:, s:e] for k, v in x.items()})
            st.mark_done(e)
    st.close()
    return Path(path), x


def _ragged(n_texts=7, seed=3):
    lengths = np.random.default_rng(seed).integers(1, 6, n_texts)
    lengths[2] = 0                       # a text may have no row (it is still in the table)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.random.default_rng(seed).integers(0, 50000, int(offsets[-1])).astype(np.int32)
    return offsets, ids


# ----------------------------------------------------------------------------- sites

@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_every_site_round_trips(tmp_path, fmt):
    p, x = _make(tmp_path / ("s.zarr" if fmt == "zarr" else "s.h5"))
    s = open_store(p)
    assert s.header["format_version"] == FORMAT_VERSION == 2
    assert s.sites == SITES and s.arrays == SITES
    assert s.d_sites == WIDTHS and s.d_mlp == DM and s.d_model == D
    assert s.position == "last" and not s.ragged and s.n_texts == s.n_rows == 18
    assert s.target_kinds == {"score": "regression", "label": "class"}
    assert s.text_offsets is None and s.token_ids is None
    for site in SITES:
        for i, layer in enumerate(s.layers):
            np.testing.assert_array_equal(s.layer(layer, site=site), x[site][i])
        np.testing.assert_array_equal(s.read(slice(3, 11), site=site), x[site][:, 3:11])
        got = np.concatenate([b for _, b in s.iter_chunks(rows=8, layers=[2, 3], site=site)],
                             axis=1)
        np.testing.assert_array_equal(got, x[site][1:])
    # array= stays an alias of site= (older callers), positional site too
    np.testing.assert_array_equal(s.layer(2, array="mlp_out"), x["mlp_out"][1])
    np.testing.assert_array_equal(s.layer(2, "attn_out", as_="torch").numpy(), x["attn_out"][1])
    np.testing.assert_array_equal(s.read(slice(0, 4), array="neurons"), x["neurons"][:, :4])
    assert next(s.iter_chunks(array="attn_out"))[1].shape == (L, R, D)
    with pytest.raises(StoreError, match="disagree"):
        s.layer(2, site="attn_out", array="mlp_out")
    with pytest.raises(StoreError, match="unknown site 'mlp'"):
        s.layer(2, site="mlp")
    ent = s.entities
    assert list(ent["label"]) == list(_table(18)["label"]) and len(ent) == 18
    rep = check_store(p)
    assert rep.ok and rep.blocks_checked == 4 * 5, rep.problems
    s.close()


def test_a_store_without_resid_names_its_sites(tmp_path):
    p, x = _make(tmp_path / "s.zarr", sites={"mlp_out": D})
    s = open_store(p)
    assert s.sites == ("mlp_out",) and s.d_mlp is None
    np.testing.assert_array_equal(s.layer(3, site="mlp_out"), x["mlp_out"][2])
    with pytest.raises(StoreError, match=r"no resid activations; it holds mlp_out \(extract "
                                         r"with --sites resid\)"):
        s.layer(3)
    with pytest.raises(StoreError, match="no neuron activations.*--neurons"):
        s.read(slice(0, 4), site="neurons")
    with pytest.raises(StoreError, match="no attn_out"):
        next(s.iter_chunks(site="attn_out"))


def test_default_sites_and_the_old_write_rows_form(tmp_path):
    st = create_store(tmp_path / "s.zarr", layers=[1, 2, 3], n_rows=8, d_model=D,
                      entities=_table(8), targets=("score",), group_columns=(), meta={},
                      d_mlp=DM, rows_per_chunk=R)
    assert st.sites == ("resid", "neurons") and st.position == "last-entity"
    assert st.target_kinds == {"score": "regression"}
    x = _blocks(8, {"resid": D, "neurons": DM})
    st.write_rows(0, x["resid"][:, :4], x["neurons"][:, :4])       # positional, as before
    st.write_rows(4, x["resid"][:, 4:], neurons=x["neurons"][:, 4:])
    st.mark_done(8)
    np.testing.assert_array_equal(st.layer(1, site="neurons"), x["neurons"][0])
    with pytest.raises(StoreError, match=r"one block per site.*missing \['neurons'\]"):
        st.write_rows(0, {"resid": x["resid"][:, :4]})
    with pytest.raises(StoreError, match=r"not in the store: \['mlp_out'\]"):
        st.write_rows(0, {**{k: v[:, :4] for k, v in x.items()},
                          "mlp_out": x["resid"][:, :4]})
    with pytest.raises(StoreError, match=r"neurons block must be \(n_layers=3, 4, 12\)"):
        st.write_rows(0, {"resid": x["resid"][:, :4], "neurons": x["neurons"][:, :3]})
    with pytest.raises(StoreError, match="inside the dict"):
        st.write_rows(0, {"resid": x["resid"][:, :4]}, x["neurons"][:, :4])
    st.close()
    head = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())["attributes"]["actstore"]
    assert head["sites"] == ["resid", "neurons"] and head["d_sites"] == {"resid": D,
                                                                         "neurons": DM}
    z = __import__("zarr").open_group(str(tmp_path / "s.zarr"), mode="r")
    assert z["neurons"].metadata.dimension_names == ("layer", "row", "neuron")


@pytest.mark.parametrize("kw, msg", [
    (dict(sites={"resid": D, "mlp": D}), r"unknown site\(s\) \['mlp'\]"),
    (dict(sites={"attn_out": 5}), r"must have width d_model=8"),
    (dict(sites={"resid": D, "neurons": DM}, d_mlp=7), "d_mlp=7 differs"),
    (dict(sites={"resid": D}, d_mlp=7), "no neurons"),
    (dict(sites={"resid": D, "attn_out": D}, layers=[0, 1]), "layer 0 .* has no attn_out"),
    (dict(position="middle"), "unknown position 'middle'"),
    (dict(target_kinds={"score": "ordinal"}), "target kinds must be one of"),
    (dict(target_kinds={"other": "class"}), "must name every target"),
    (dict(position="all"), "position 'all' needs tokens"),
    (dict(tokens=(np.array([0, 8]), np.zeros(8, np.int32))), "only it takes them"),
])
def test_bad_requests_are_refused(tmp_path, kw, msg):
    args = dict(layers=[1, 2], n_rows=8, d_model=D, entities=_table(8), targets=("score",),
                group_columns=(), meta={})
    args.update(kw)
    with pytest.raises(StoreError, match=msg):
        create_store(tmp_path / "s.zarr", **args)
    assert not (tmp_path / "s.zarr").exists()


# ----------------------------------------------------------------------------- ragged

@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_ragged_store_round_trips(tmp_path, fmt):
    offsets, ids = _ragged()
    n = int(offsets[-1])
    p, x = _make(tmp_path / ("r.zarr" if fmt == "zarr" else "r.h5"), n=n, fmt=fmt,
                 sites={"resid": D, "mlp_out": D}, position="all", tokens=(offsets, ids),
                 n_texts=7)
    s = open_store(p)
    assert s.ragged and s.position == "all" and s.n_texts == 7 and s.n_rows == n
    assert s.text_offsets.dtype == np.int64 and s.token_ids.dtype == np.int32
    np.testing.assert_array_equal(s.text_offsets, offsets)
    np.testing.assert_array_equal(s.token_ids, ids)
    assert len(s.entities) == 7 and len(s.is_test) == 7 and s.target_array("score").shape == (7, 1)
    np.testing.assert_array_equal(s.layer(2, site="mlp_out"), x["mlp_out"][1])
    # the rows of text 3
    a, b = s.text_offsets[3], s.text_offsets[4]
    np.testing.assert_array_equal(s.read(slice(int(a), int(b)), layers=[1]),
                                  x["resid"][:1, a:b])
    assert check_store(p).ok
    s.close()
    if fmt == "zarr":
        z = __import__("zarr").open_group(str(p), mode="r")
        assert z["entities"]["label"].metadata.dimension_names == ("text",)
        assert z["tokens"]["ids"].metadata.dimension_names == ("row",)
        assert z["tokens"]["offsets"].shape == (8,)
        assert not store_files(p, json.loads((p / "zarr.json").read_text())["attributes"]
                               ["actstore"])[2]


@pytest.mark.parametrize("offsets, ids, texts, msg", [
    ([1, 3, 5], np.zeros(5), 2, "start at 0 and end at n_rows=5"),
    ([0, 3, 4], np.zeros(5), 2, "start at 0 and end at n_rows=5"),
    ([0, 4, 3, 5], np.zeros(5), 3, r"non-decreasing: offsets\[1\]=4 > offsets\[2\]=3"),
    ([0, 2, 5], np.zeros(4), 2, "n_rows=5 but 4 token ids"),
    ([0, 2, 5], np.zeros(5), 3, r"entity table has 3 rows, store has n_texts=2"),
    ([0.0, 5.0], np.zeros(5), 1, "1-D integer arrays"),
])
def test_ragged_index_is_validated(tmp_path, offsets, ids, texts, msg):
    with pytest.raises(StoreError, match=msg):
        create_store(tmp_path / "r.zarr", layers=[1], n_rows=5, d_model=D,
                     entities=_table(texts), targets=(), group_columns=(), meta={},
                     position="all", tokens=(np.asarray(offsets), np.asarray(ids, np.int64)))


# ----------------------------------------------------------------------------- entity codes

@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_entity_codes_read_back_to_the_strings(tmp_path, fmt):
    p, _ = _make(tmp_path / ("s.zarr" if fmt == "zarr" else "s.h5"), fmt=fmt)
    s = open_store(p)
    ent = s.entities
    strs = [c for c, k in s.entity_kinds.items() if k == "str"]
    assert strs == ["name", "entity", "label"]
    for c in strs:
        codes, cats = s.entity_codes(c)
        assert codes.dtype == np.int32 and cats == sorted(set(ent[c]))
        assert [cats[i] for i in codes] == list(ent[c])
    with pytest.raises(StoreError, match="'score' is not a str entity column"):
        s.entity_codes("score")
    s.close()
    if fmt == "zarr":
        # what a reader without zarr's string type needs: plain int32 chunks + a JSON table
        meta = json.loads((p / "entity_codes" / "label" / "zarr.json").read_text())
        assert meta["data_type"] == "int32" and meta["attributes"]["categories"] == [
            "neg", "pos", "ünï"]
        assert [c["name"] for c in meta["codecs"]] == ["bytes", "zstd"]
        raw = np.frombuffer(Zstd().decode((p / "entity_codes" / "label" / "c" / "0")
                                          .read_bytes()), "<i4")
        assert [meta["attributes"]["categories"][i] for i in raw] == list(ent["label"])


def test_version_1_stores_open_with_their_defaults():
    for name in ("store_zarr", "store_h5.h5"):
        s = open_store(V1 / name)
        assert s.header["format_version"] == 1
        assert s.position == "last-entity" and not s.ragged and s.n_texts == s.n_rows
        assert s.sites == (("resid", "neurons") if s.d_mlp else ("resid",))
        assert s.d_sites == {"resid": s.d_model, **({"neurons": s.d_mlp} if s.d_mlp else {})}
        assert s.target_kinds == {t: "regression" for t in s.targets}
        assert s.text_offsets is None and s.token_ids is None
        assert s.layer(s.layers[-1], site="resid").shape == (s.n_rows, s.d_model)
        with pytest.raises(StoreError, match="format version 1"):
            s.entity_codes("name")
        s.close()
        assert check_store(V1 / name).ok


@pytest.mark.parametrize("version", [3, 0, True])
def test_other_versions_are_refused(tmp_path, version):
    p = tmp_path / "s.zarr"
    shutil.copytree(V1 / "store_zarr", p)
    node = json.loads((p / "zarr.json").read_text())
    node["attributes"]["actstore"]["format_version"] = version
    (p / "zarr.json").write_text(json.dumps(node))
    with pytest.raises(StoreError, match=f"format version {version} is not supported .*reads "
                                         "versions 1, 2"):
        open_store(p)


def test_a_damaged_v2_header_is_named(tmp_path):
    p, _ = _make(tmp_path / "s.zarr")
    node = json.loads((p / "zarr.json").read_text())
    head = node["attributes"]["actstore"]
    head["d_sites"]["attn_out"] = 3
    head["ragged"] = True
    (p / "zarr.json").write_text(json.dumps(node))
    with pytest.raises(StoreError, match="invalid or missing d_sites, ragged"):
        open_store(p)


# ----------------------------------------------------------------------------- damage

def _flip(f: Path, offset: int) -> None:
    raw = bytearray(f.read_bytes())
    raw[offset] ^= 0x01
    f.write_bytes(bytes(raw))


def test_verify_names_damage_in_every_new_array(tmp_path):
    offsets, ids = _ragged()
    p, _ = _make(tmp_path / "r.zarr", n=int(offsets[-1]), sites=WIDTHS, position="all",
                 tokens=(offsets, ids), n_texts=7)
    _flip(p / "attn_out" / "c" / "0" / "1" / "0", 3)           # content of a site array
    (p / "mlp_out" / "c" / "0" / "2" / "0").unlink()           # a site's shard missing
    _flip(p / "tokens" / "ids" / "c" / "0", 0)                 # (zarr's default zstd frame)
    (p / "entity_codes" / "label" / "c" / "0").unlink()         # a code array
    rep = check_store(p)
    by_array = {}
    for prob in rep.problems:
        by_array.setdefault(prob.array, []).append(prob)
    assert set(by_array) == {"attn_out", "mlp_out", "tokens", "entity_codes"}, rep.problems
    att, = by_array["attn_out"]
    assert att.file == str(p / "attn_out" / "c" / "0" / "1" / "0") and att.rows == (4, 8)
    assert "checksum mismatch" in att.message
    mlp, = by_array["mlp_out"]
    assert "shard file missing" in mlp.message and mlp.rows == (8, 12)
    tok, = by_array["tokens"]
    assert tok.file.startswith(str(p / "tokens" / "ids")) and "'ids'" in tok.message
    code, = by_array["entity_codes"]
    assert code.file == str(p / "entity_codes" / "label" / "c" / "0")
    assert "missing" in code.message
    # the token index and code arrays are not rows: --repair cannot fix them
    assert not rep.repairable
    with pytest.raises(StoreError, match="entity_codes/label/c/0"):
        open_store(p)


def test_verify_of_a_damaged_hdf5_token_index(tmp_path):
    import h5py
    offsets, ids = _ragged()
    p, _ = _make(tmp_path / "r.h5", n=int(offsets[-1]), fmt="hdf5", sites={"resid": D},
                 position="all", tokens=(offsets, ids), n_texts=7)
    with h5py.File(p, "r+") as f:
        f["tokens"]["ids"][0] += 1
        f["entity_codes"]["entity"][1] = 0
    rep = check_store(p)
    names = sorted((q.array, q.file) for q in rep.problems)
    assert names == [("entity_codes", f"{p} (dataset entity_codes/entity)"),
                     ("tokens", f"{p} (dataset tokens/ids)")], rep.problems
    s = open_store(p)                       # the open-time checks read no content
    with pytest.raises(StoreError, match=r"token array 'ids': checksum mismatch"):
        s.token_ids
    s.close()


def test_verify_finds_bad_offsets_in_a_store_without_checksums(tmp_path):
    offsets, ids = _ragged()
    p, _ = _make(tmp_path / "r.zarr", n=int(offsets[-1]), sites={"resid": D},
                 position="all", tokens=(offsets, ids), n_texts=7)
    shutil.rmtree(p / "integrity")
    z = __import__("zarr").open_group(str(p), mode="r+")
    bad = offsets.copy()
    bad[3], bad[4] = bad[4], bad[3] + 100
    z["tokens"]["offsets"][:] = bad
    rep = check_store(p)
    assert [q.array for q in rep.problems] == ["tokens"]
    assert "token offsets" in rep.problems[0].message


def test_actstore_verify_names_a_site_file(tmp_path, capsys):
    from actstore.cli import main
    p, _ = _make(tmp_path / "s.zarr")
    assert main(["verify", str(p)]) == 0
    _flip(p / "neurons" / "c" / "0" / "3" / "0", 2 * R * DM * 2 + 1)      # layer 3
    _flip(p / "attn_out" / "c" / "0" / "0" / "0", 1)                      # layer 1
    assert main(["verify", str(p)]) == 1
    out = capsys.readouterr().out
    assert f"{p / 'neurons' / 'c' / '0' / '3' / '0'}: checksum mismatch" in out
    assert "[neurons, layer 3, rows 12-15]" in out and "[attn_out, layer 1, rows 0-3]" in out
    assert "all repairable: re-extract rows 0-3, 12-15" in out


# ----------------------------------------------------------------------------- ranges, overwrite

def test_row_ranges_cover_every_site(tmp_path):
    p, x = _make(tmp_path / "s.zarr", write=False)
    st = open_store(p, mode="a", exclusive=False)
    st.begin_ranges()
    rec = st.range_record(8, 16)
    st.write_rows(8, {k: v[:, 8:16] for k, v in x.items()})
    rec.update(16)
    st.close()
    s = open_store(p, mode="a")                      # exclusive: folds the record
    assert s.rows_done == 0 and s.ranges_done == [(8, 16)]
    s.close()
    rep = check_store(p)
    assert rep.ok and rep.blocks_checked == 2 * 4
    (p / "neurons" / "c" / "0" / "3" / "0").unlink()
    rep = check_store(p)
    assert [(q.array, q.rows) for q in rep.problems] == [("neurons", (12, 16))]
    assert rep.repairable and rep.bad_rows == [(12, 16)]


def test_overwrite_deletes_every_v2_array_and_nothing_else(tmp_path):
    offsets, ids = _ragged()
    p, _ = _make(tmp_path / "r.zarr", n=int(offsets[-1]), sites=WIDTHS, position="all",
                 tokens=(offsets, ids), n_texts=7)
    (p / "tokens" / "notes.txt").write_text("mine")
    (p / "entity_codes" / "score").mkdir()            # no code array for a float column
    with pytest.raises(StoreError, match=r"it holds 2 entries .*\(entity_codes/score/, "
                                         r"tokens/notes.txt\)"):
        remove_store(p)
    (p / "tokens" / "notes.txt").unlink()
    (p / "entity_codes" / "score").rmdir()
    remove_store(p)
    assert not p.exists()
    # an interrupted creation (header not yet written) holding the new groups is deletable
    p2, _ = _make(tmp_path / "s.zarr")
    node = json.loads((p2 / "zarr.json").read_text())
    node["attributes"] = {}
    (p2 / "zarr.json").write_text(json.dumps(node))
    for sub in ("resid", "attn_out", "entities"):
        shutil.rmtree(p2 / sub)
    remove_store(p2)
    assert not p2.exists()


def test_reading_bad_offsets_is_an_error(tmp_path):
    offsets, ids = _ragged()
    p, _ = _make(tmp_path / "r.zarr", n=int(offsets[-1]), sites={"resid": D},
                 position="all", tokens=(offsets, ids), n_texts=7)
    z = __import__("zarr").open_group(str(p), mode="r+")
    bad = offsets.copy()
    bad[2] = bad[3] + 1
    z["tokens"]["offsets"][:] = bad
    s = open_store(p, verify=False)
    with pytest.raises(StoreError, match=r"tokens/offsets: token offsets are not 8 "
                                         r"non-decreasing values"):
        s.text_offsets
    s.close()
