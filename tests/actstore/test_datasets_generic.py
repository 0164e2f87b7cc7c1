"""actstore.datasets.generic: anyone's table (CSV, TSV, Parquet, JSON Lines, saved HF datasets,
hf:NAME) as an EntityDataset of kind "table": the three modes, target kinds, split/id/group
columns, every bad input with its error, and the paper loaders left as they were."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from actstore.cli import run
from actstore.datasets import (
    DatasetError,
    EntityDataset,
    TableSpec,
    add_cli,
    load_dataset,
    load_table,
    parse_hf,
)
from actstore.datasets.cli import TABLE_FIELDS
from actstore.store.format import column_kind


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "cache"))


def frame(n=8) -> pd.DataFrame:
    """Reviews with a text, an entity in the text, a string label, a float score, a small
    integer rating, a bool flag, a group and a train/test split column."""
    cities = ["Paris", "Rome", "Oslo", "Lima"]
    return pd.DataFrame({
        "review": [f"{cities[i % 4]} was {'great' if i % 2 else 'bad'} ({i})" for i in range(n)],
        "city": [cities[i % 4] for i in range(n)],
        "label": ["pos" if i % 2 else "neg" for i in range(n)],
        "score": [0.5 + i for i in range(n)],
        "rating": [1 + i % 3 for i in range(n)],
        "flag": [i % 2 == 0 for i in range(n)],
        "region": ["north" if i < n // 2 else "south" for i in range(n)],
        "split": ["train" if i % 4 else "test" for i in range(n)],
        "uid": [f"r{i:03d}" for i in range(n)],
    })


def write(df: pd.DataFrame, path):
    fmt = path.suffix
    if fmt == ".csv":
        df.to_csv(path, index=False)
    elif fmt == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif fmt == ".parquet":
        df.to_parquet(path)
    elif fmt in (".jsonl", ".ndjson"):
        df.to_json(path, orient="records", lines=True)
    return path


SPEC = TableSpec(text_column="review", targets=("label", "score", "rating", "flag"),
                 group_columns=("region",), split_column="split", id_column="uid")


# ----------------------------------------------------------------------------- formats

@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl", ".ndjson"])
def test_every_file_format_gives_the_same_table(tmp_path, suffix):
    df = frame()
    ds = load_dataset(write(df, tmp_path / f"reviews{suffix}"), table=SPEC)
    assert isinstance(ds, EntityDataset) and ds.kind == "table" and ds.name == "reviews"
    assert ds.targets == ("label", "score", "rating", "flag")
    assert ds.target_kinds == {"label": "class", "score": "regression", "rating": "class",
                               "flag": "class"}
    t = ds.table
    assert list(t.columns) == ["name", "entity", "text", "entity_start", "entity_end", "label",
                               "score", "rating", "flag", "is_test", "entity_type", "region"]
    assert t["text"].tolist() == df["review"].tolist()
    assert t["name"].tolist() == df["uid"].tolist()
    assert t["label"].tolist() == df["label"].tolist()
    assert t["score"].dtype == np.float64 and t["score"].tolist() == df["score"].tolist()
    assert t["rating"].dtype == np.int64 and t["rating"].tolist() == df["rating"].tolist()
    assert t["flag"].dtype == bool and t["flag"].tolist() == df["flag"].tolist()
    assert t["is_test"].tolist() == (df["split"] == "test").tolist()
    assert t["region"].tolist() == df["region"].tolist()
    assert set(t["entity"]) == {""} and set(t["entity_type"]) == {""}
    assert (t["entity_start"] == -1).all() and (t["entity_end"] == -1).all()
    assert not ds.has_entity and ds.template is None and ds.n_dropped == 0
    # every column is one the store can keep
    assert {column_kind(t[c]) for c in t.columns} <= {"bool", "int64", "float64", "str"}
    assert ds.source == str((tmp_path / f"reviews{suffix}").resolve())
    json.dumps(ds.summary())


def test_sha256_follows_the_data(tmp_path):
    df = frame()
    a = load_dataset(write(df, tmp_path / "a.csv"), table=SPEC)
    df.loc[0, "score"] = 99.0
    b = load_dataset(write(df, tmp_path / "b.csv"), table=SPEC)
    assert a.sha256 != b.sha256 and len(a.sha256) == 64


def test_saved_hf_dataset_and_datasetdict(tmp_path):
    datasets = pytest.importorskip("datasets")
    df = frame()
    datasets.Dataset.from_pandas(df).save_to_disk(str(tmp_path / "one"))
    ds = load_dataset(str(tmp_path / "one"), table=SPEC)
    assert ds.name == "one" and len(ds) == len(df)
    assert ds.table["score"].tolist() == df["score"].tolist()
    assert ds.target_kinds["rating"] == "class" and ds.table["rating"].dtype == np.int64

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(df.iloc[:6]),
                               "test": datasets.Dataset.from_pandas(df.iloc[6:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    spec = TableSpec(text_column="review", targets="score", id_column="uid")
    test = load_dataset(f"{tmp_path / 'dd'}@test", table=spec)
    assert len(test) == 2 and test.table["name"].tolist() == ["r006", "r007"]
    train = load_dataset(f"{tmp_path / 'dd'}@train", table=spec)
    assert len(train) == 6 and train.sha256 != test.sha256
    with pytest.raises(DatasetError, match=r"has the splits train, test; pick one with .*dd@SPLIT"):
        load_dataset(str(tmp_path / "dd"), table=SPEC)
    with pytest.raises(DatasetError, match=r"has no split 'valid'; its splits are train, test"):
        load_dataset(f"{tmp_path / 'dd'}@valid", table=SPEC)
    with pytest.raises(DatasetError, match=r"one Dataset, not a DatasetDict.*drop @test"):
        load_dataset(f"{tmp_path / 'one'}@test", table=SPEC)
    # a DatasetDict with a single split needs no @SPLIT
    datasets.DatasetDict({"train": datasets.Dataset.from_pandas(df)}).save_to_disk(
        str(tmp_path / "single"))
    assert len(load_dataset(str(tmp_path / "single"), table=SPEC)) == len(df)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DatasetError, match=r"plain: a directory, but not a dataset saved"):
        load_dataset(str(tmp_path / "plain"), table=SPEC)


def test_hf_classlabel_is_a_class_target_with_int_codes(tmp_path):
    datasets = pytest.importorskip("datasets")
    names = [f"c{i}" for i in range(25)]  # more than 20 codes: ClassLabel still says class
    feats = datasets.Features({"text": datasets.Value("string"),
                               "topic": datasets.ClassLabel(names=names)})
    d = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(50)],
                                    "topic": [i % 25 for i in range(50)]}, features=feats)
    d.save_to_disk(str(tmp_path / "topics"))
    ds = load_dataset(str(tmp_path / "topics"), table=TableSpec(text_column="text",
                                                                 targets="topic"))
    assert ds.target_kinds == {"topic": "class"} and ds.table["topic"].dtype == np.int64


def test_parse_hf():
    assert parse_hf("hf:imdb") == ("imdb", None, None)
    assert parse_hf("hf:glue:sst2@validation") == ("glue", "sst2", "validation")
    assert parse_hf("hf:org/name@train[:100]") == ("org/name", None, "train[:100]")
    for bad in ("hf:", "hf::cfg", "hf:name:", "hf:name@"):
        with pytest.raises(DatasetError, match="hf:NAME:CONFIG@SPLIT"):
            parse_hf(bad)


HF_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import datasets
    import pandas as pd
    from actstore.datasets import DatasetError, TableSpec, load_dataset

    root = Path(sys.argv[1])
    src = root / "src" / "tiny_reviews"
    src.mkdir(parents=True)
    pd.DataFrame({"text": ["good film", "bad film", "fine film", "poor film"],
                  "label": [1, 0, 1, 0]}).to_parquet(src / "train.parquet")
    datasets.load_dataset(str(src))          # builds the local cache entry tiny_reviews
    spec = TableSpec(text_column="text", targets="label")
    out = {}
    ds = load_dataset("hf:tiny_reviews@train", table=spec)
    out["rows"], out["kinds"], out["source"] = len(ds), ds.target_kinds, ds.source
    out["sha"] = ds.sha256
    out["nosplit"] = len(load_dataset("hf:tiny_reviews", table=spec))
    for bad in ("hf:nobody/absent_set", "hf:tiny_reviews@nope"):
        try:
            load_dataset(bad, table=spec)
        except DatasetError as exc:
            out[bad] = str(exc)
    print(json.dumps(out))
""")


def test_hf_name_from_the_offline_cache(tmp_path):
    pytest.importorskip("datasets")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               ACTSTORE_CACHE=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", HF_SCRIPT, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rows"] == 4 and out["nosplit"] == 4
    assert out["kinds"] == {"label": "class"} and out["source"] == "hf:tiny_reviews@train"
    assert len(out["sha"]) == 64
    absent = out["hf:nobody/absent_set"]
    assert "not found in the Hugging Face datasets cache" in absent
    assert str(tmp_path / "hf" / "datasets") in absent and "HF_DATASETS_OFFLINE" in absent
    assert 'cannot load it: Unknown split "nope"' in out["hf:tiny_reviews@nope"]


# ----------------------------------------------------------------------------- modes

def test_template_mode(tmp_path):
    df = frame()
    spec = TableSpec(entity_column="city", template="The {capital} of {entity} is",
                     targets="score")
    ds = load_dataset(write(df, tmp_path / "c.csv"), table=spec)
    t = ds.table
    assert ds.has_entity and ds.template == "The {capital} of {entity} is"
    assert t["entity"].tolist() == df["city"].tolist()
    assert t["text"].iloc[0] == "The {capital} of Paris is"   # other braces are literal
    for text, ent, a, b in zip(t["text"], t["entity"], t["entity_start"], t["entity_end"]):
        assert text[a:b] == ent and a == len("The {capital} of ")
    assert t["name"].tolist() == [str(i) for i in range(len(df))]  # no id column: row number
    assert ds.summary()["template"] == spec.template


def test_located_mode_first_occurrence(tmp_path):
    df = pd.DataFrame({"sentence": ["Oslo is north of Oslo fjord", "I like Rome", "x Lima"],
                       "place": ["Oslo", " Rome ", "Lima"]})
    ds = load_dataset(write(df, tmp_path / "s.jsonl"),
                      table=TableSpec(text_column="sentence", entity_column="place"))
    t = ds.table
    assert ds.has_entity and ds.template is None and ds.targets == ()
    assert t["entity_start"].tolist() == [0, 7, 2] and t["entity_end"].tolist() == [4, 11, 6]
    assert t["entity"].tolist() == ["Oslo", "Rome", "Lima"]   # surrounding spaces removed


def test_target_kinds_inferred_and_forced(tmp_path):
    n = 60
    df = pd.DataFrame({"text": [f"row {i}" for i in range(n)],
                       "year": [1900 + i // 2 for i in range(n)],     # int, 30 values
                       "stars": [1 + i % 5 for i in range(n)],         # int, 5 values
                       "level": [float(i % 3) for i in range(n)],      # float
                       "code": [str(i % 2) + "x" for i in range(n)]})
    path = write(df, tmp_path / "k.parquet")
    ds = load_dataset(path, table=TableSpec(text_column="text",
                                            targets="year,stars,level,code"))
    assert ds.target_kinds == {"year": "regression", "stars": "class", "level": "regression",
                               "code": "class"}
    assert ds.table["year"].dtype == np.float64 and ds.table["stars"].dtype == np.int64
    ds = load_dataset(path, table=TableSpec(text_column="text",
                                            targets="year:class,stars:regression,level:class"))
    assert ds.target_kinds == {"year": "class", "stars": "regression", "level": "class"}
    assert ds.table["year"].dtype == np.int64 and ds.table["stars"].dtype == np.float64
    assert ds.table["level"].dtype == np.int64   # integral floats as class: integer codes
    assert ds.targets == ("year", "stars", "level")


def test_csv_values_are_typed(tmp_path):
    (tmp_path / "v.csv").write_text("text,b,i,f,s\nA,True,1,1.5,x\nB,false,2,2,y\nC,TRUE,1,3e0,x\n"
                                    "D,False,2,4,y\n")
    ds = load_dataset(tmp_path / "v.csv", table=TableSpec(text_column="text",
                                                          targets="b,i,f,s"))
    assert ds.target_kinds == {"b": "class", "i": "class", "f": "regression", "s": "class"}
    assert ds.table["b"].tolist() == [True, False, True, False]
    assert ds.table["f"].tolist() == [1.5, 2.0, 3.0, 4.0]


def test_split_column_forms(tmp_path):
    df = frame()
    spec = TableSpec(text_column="review", split_column="flag")
    ds = load_dataset(write(df, tmp_path / "a.parquet"), table=spec)
    assert ds.is_test.tolist() == df["flag"].tolist()             # bool: True = test
    df["bit"] = df["flag"].astype(int)
    ds = load_dataset(write(df, tmp_path / "b.csv"),
                      table=TableSpec(text_column="review", split_column="bit"))
    assert ds.is_test.tolist() == df["flag"].tolist()             # 0/1
    df["split"] = ["TRAIN", " test", "train", "Test"] * 2
    ds = load_dataset(write(df, tmp_path / "c.csv"),
                      table=TableSpec(text_column="review", split_column="split"))
    assert ds.is_test.tolist() == [False, True, False, True] * 2
    df["split"] = ["train", "validation", "test", "dev"] * 2
    with pytest.raises(DatasetError, match=r"row 1 \(line 3\), column 'split': 'validation' is "
                       r"not a split.*'validation', 'dev'"):
        load_dataset(write(df, tmp_path / "d.csv"),
                     table=TableSpec(text_column="review", split_column="split"))
    ds = load_dataset(tmp_path / "d.csv", drop_invalid=True,
                      table=TableSpec(text_column="review", split_column="split"))
    assert len(ds) == 4 and ds.n_dropped == 4


def test_hash_split_by_id_else_text(tmp_path):
    df = pd.DataFrame({"text": [f"sentence number {i}" for i in range(400)],
                       "uid": [f"u{i}" for i in range(400)]})
    a = load_dataset(write(df, tmp_path / "a.csv"), table=TableSpec(text_column="text"))
    b = load_dataset(write(df.iloc[::-1], tmp_path / "b.csv"), table=TableSpec(text_column="text"))
    assert 0.1 < a.is_test.mean() < 0.3
    # independent of row order: the same texts land on the same side
    assert dict(zip(a.table["text"], a.is_test)) == dict(zip(b.table["text"], b.is_test))
    c = load_dataset(tmp_path / "a.csv", table=TableSpec(text_column="text", id_column="uid"))
    assert c.table["name"].tolist() == df["uid"].tolist()
    assert not np.array_equal(c.is_test, a.is_test)


def test_group_columns_keep_their_type(tmp_path):
    df = pd.DataFrame({"text": ["a", "b", "c", "d"], "decade": [1990, 2000, 1990, 2000],
                       "country": ["FR", None, "IT", "IT"]})
    ds = load_dataset(write(df, tmp_path / "g.jsonl"),
                      table=TableSpec(text_column="text", group_columns="decade,country"))
    assert ds.table["decade"].dtype == np.int64
    assert ds.table["country"].tolist() == ["FR", "unknown", "IT", "IT"]
    assert ds.group_columns == ("decade", "country")
    # a group column that is also a target appears once
    ds = load_dataset(tmp_path / "g.jsonl", table=TableSpec(
        text_column="text", targets="decade:class", group_columns="decade"))
    assert list(ds.table.columns).count("decade") == 1


# ----------------------------------------------------------------------------- bad input

def test_missing_column_names_it_and_lists_the_columns(tmp_path):
    for suffix in (".csv", ".parquet", ".jsonl"):
        path = write(frame(), tmp_path / f"m{suffix}")
        with pytest.raises(DatasetError, match=r"no column\(s\) 'lable'; its columns are "
                           r"'review', 'city', 'label'"):
            load_dataset(path, table=TableSpec(text_column="review", targets="lable"))
        with pytest.raises(DatasetError, match=r"no column\(s\) 'body'"):
            load_dataset(path, table=TableSpec(text_column="body"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(entity_column="city", template="The capital is"), r"has no \{entity\}"),
    (dict(entity_column="city", template="{entity} and {entity}"), r"\{entity\} 2 times"),
    (dict(text_column="review", entity_column="city", template="x {entity}"),
     r"--template builds the text.*drop one"),
    (dict(entity_column="city"), r"--entity-column needs --template"),
    (dict(template="a {entity}"), r"needs --text-column"),
    (dict(), r"needs --text-column COL"),
    (dict(text_column="review", targets="a,,b"), r"empty column name"),
])
def test_bad_specs(kwargs, message):
    with pytest.raises(DatasetError, match=message):
        TableSpec(**kwargs)


def test_spec_accepts_comma_lists_and_tuples():
    s = TableSpec(text_column="t", targets="a, b:class", group_columns=["g"])
    assert s.targets == ("a", "b:class") and s.group_columns == ("g",)
    assert s.target_requests() == [("a", None), ("b", "class")]
    assert TableSpec(text_column="t", targets="x:y").target_requests() == [("x:y", None)]
    assert TableSpec(text_column="t").mode == "text"
    assert TableSpec(entity_column="e", template="{entity}").mode == "template"
    assert TableSpec(text_column="t", entity_column="e").mode == "located"
    assert [f.name for f in dataclasses.fields(TableSpec)] == list(TABLE_FIELDS)


def test_entity_not_in_text_names_the_row_and_line(tmp_path):
    df = pd.DataFrame({"text": ["in Paris", "in\nRome", "in Oslo"],
                       "ent": ["Paris", "Roma", "Oslo"]})
    path = write(df, tmp_path / "e.csv")
    spec = TableSpec(text_column="text", entity_column="ent")
    with pytest.raises(DatasetError, match=r"(?s)1 invalid row\(s\) of 3.*row 1 \(line 3\), column "
                       r"'ent': entity 'Roma' is not in its text \(column 'text'\)"):
        load_dataset(path, table=spec)
    ds = load_dataset(path, table=spec, drop_invalid=True)
    assert ds.table["entity"].tolist() == ["Paris", "Oslo"] and ds.n_dropped == 1
    # row numbers of JSON Lines name their line too (a blank line skipped)
    (tmp_path / "e.jsonl").write_text('{"text": "in Paris", "ent": "Paris"}\n\n'
                                      '{"text": "in Rome", "ent": "Roma"}\n')
    with pytest.raises(DatasetError, match=r"row 1 \(line 3\)"):
        load_dataset(tmp_path / "e.jsonl", table=spec)


def test_empty_text_and_entity(tmp_path):
    path = write(pd.DataFrame({"text": ["ok", "  ", "fine"], "ent": ["a", "b", " "]}),
                 tmp_path / "x.csv")
    with pytest.raises(DatasetError, match=r"row 1 \(line 3\), column 'text': empty text"):
        load_dataset(path, table=TableSpec(text_column="text"))
    with pytest.raises(DatasetError, match=r"row 2 \(line 4\), column 'ent': empty entity"):
        load_dataset(path, table=TableSpec(entity_column="ent", template="{entity}!"))
    (tmp_path / "n.parquet").unlink(missing_ok=True)
    write(pd.DataFrame({"text": ["ok", None, "x"]}), tmp_path / "n.parquet")
    ds = load_dataset(tmp_path / "n.parquet", table=TableSpec(text_column="text"),
                      drop_invalid=True)
    assert ds.table["text"].tolist() == ["ok", "x"] and ds.n_dropped == 1


def test_non_numeric_and_missing_regression_targets(tmp_path):
    (tmp_path / "r.csv").write_text("text,temp\na,1.5\nb,warm\nc,\nd,2\ne,inf\n")
    spec = TableSpec(text_column="text", targets="temp:regression")
    with pytest.raises(DatasetError) as exc:
        load_dataset(tmp_path / "r.csv", table=spec)
    msg = str(exc.value)
    assert "3 invalid row(s) of 5" in msg
    assert "row 1 (line 3), column 'temp': 'warm' is not a number" in msg
    assert "row 2 (line 4), column 'temp': missing target value" in msg
    assert "row 4 (line 6), column 'temp': 'inf' is not a finite number" in msg
    ds = load_dataset(tmp_path / "r.csv", table=spec, drop_invalid=True)
    assert ds.table["temp"].tolist() == [1.5, 2.0] and ds.n_dropped == 3
    # a float column with a NaN (Parquet) is a missing target too
    write(pd.DataFrame({"text": ["a", "b"], "y": [1.0, np.nan]}), tmp_path / "y.parquet")
    with pytest.raises(DatasetError, match=r"row 1, column 'y': missing target value"):
        load_dataset(tmp_path / "y.parquet", table=TableSpec(text_column="text", targets="y"))


def test_missing_class_target(tmp_path):
    write(pd.DataFrame({"text": list("abcde"), "lab": ["x", "y", None, "x", "y"]}),
          tmp_path / "c.jsonl")
    with pytest.raises(DatasetError, match=r"row 2 \(line 3\), column 'lab': missing target"):
        load_dataset(tmp_path / "c.jsonl", table=TableSpec(text_column="text", targets="lab"))


def test_class_with_one_member(tmp_path):
    path = write(pd.DataFrame({"text": list("abcde"), "lab": ["x", "y", "z", "x", "y"]}),
                 tmp_path / "c.csv")
    spec = TableSpec(text_column="text", targets="lab")
    with pytest.raises(DatasetError, match=r"row 2 \(line 4\), column 'lab': class 'z' of target "
                       r"'lab' has only this row; a class needs at least two rows"):
        load_dataset(path, table=spec)
    ds = load_dataset(path, table=spec, drop_invalid=True)
    assert ds.table["lab"].tolist() == ["x", "y", "x", "y"] and ds.n_dropped == 1
    # an integer-coded class suggests the regression alternative
    write(pd.DataFrame({"text": list("abc"), "n": [1, 1, 2]}), tmp_path / "i.parquet")
    with pytest.raises(DatasetError, match=r"class 2 .*'n:regression'"):
        load_dataset(tmp_path / "i.parquet", table=TableSpec(text_column="text", targets="n"))


def test_class_target_with_a_single_class(tmp_path):
    path = write(pd.DataFrame({"text": list("abcd"), "lab": ["x", "x", "x", "y"]}),
                 tmp_path / "c.csv")
    spec = TableSpec(text_column="text", targets="lab")
    with pytest.raises(DatasetError, match=r"target 'lab' has a single class \('x'\) in 3 rows"):
        load_dataset(path, table=spec, drop_invalid=True)   # dropping 'y' leaves one class


def test_dropping_every_row_is_an_error(tmp_path):
    path = write(pd.DataFrame({"text": ["", " "], "y": [1.0, 2.0]}), tmp_path / "e.csv")
    with pytest.raises(DatasetError, match=r"all 2 rows are invalid, so --drop-invalid"):
        load_dataset(path, table=TableSpec(text_column="text"), drop_invalid=True)


def test_reserved_and_duplicate_target_names(tmp_path):
    path = write(pd.DataFrame({"text": ["a", "b"], "name": [1.0, 2.0]}), tmp_path / "r.csv")
    with pytest.raises(DatasetError, match=r"'name' cannot be a target or group column"):
        load_dataset(path, table=TableSpec(text_column="text", targets="name"))
    with pytest.raises(DatasetError, match=r"'name' named more than once"):
        load_dataset(path, table=TableSpec(text_column="text", targets="name,name:class"))


def test_unreadable_inputs(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl: line 2: a list, not a JSON object"):
        load_dataset(tmp_path / "bad.jsonl", table=TableSpec(text_column="text"))
    (tmp_path / "bad2.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DatasetError, match=r"line 2: not a JSON object"):
        load_dataset(tmp_path / "bad2.jsonl", table=TableSpec(text_column="text"))
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match=r"x.parquet: cannot read as Parquet"):
        load_dataset(tmp_path / "x.parquet", table=TableSpec(text_column="text"))
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(DatasetError, match=r"unknown table format '.xlsx'"):
        load_dataset(tmp_path / "x.xlsx", table=TableSpec(text_column="text"))
    with pytest.raises(DatasetError, match=r"no such file or directory"):
        load_dataset(tmp_path / "absent.csv", table=TableSpec(text_column="text"))
    write(pd.DataFrame({"text": ["a", "b"], "v": [[1], [2]]}), tmp_path / "l.parquet")
    with pytest.raises(DatasetError, match=r"target column 'v' holds .* values; a target must"):
        load_dataset(tmp_path / "l.parquet", table=TableSpec(text_column="text", targets="v"))


# ----------------------------------------------------------------------------- the front door

def test_paper_and_builtin_datasets_are_unchanged(tmp_path):
    ds = load_dataset("nobel")
    assert ds.target_kinds == {"year": "regression"} and ds.has_entity and ds.template is None
    assert "text" not in ds.table.columns and ds.head(3).target_kinds == ds.target_kinds
    assert "target_kinds" not in ds.summary()
    (tmp_path / "h.csv").write_text("name,birth_year,death_year\nAda Lovelace,1815,1852\n")
    ds = load_dataset(tmp_path / "h.csv")
    assert ds.kind == "historical_figure" and ds.target_kinds == {"year": "regression"}
    assert ds.target_array.tolist() == [[1852.0]]


def test_front_door_errors_point_to_the_table_flags(tmp_path):
    path = write(frame(), tmp_path / "mine.csv")
    with pytest.raises(DatasetError, match=r"cannot tell which dataset kind.*--text-column COL "
                       r"\(the full text\) or --entity-column COL --template"):
        load_dataset(path)
    write(frame(), tmp_path / "mine.parquet")
    with pytest.raises(DatasetError, match=r"mine.parquet is not a paper CSV; to read your own "
                       r"table pass --text-column"):
        load_dataset(tmp_path / "mine.parquet")
    with pytest.raises(DatasetError, match=r"hf:imdb is your own table: pass --text-column"):
        load_dataset("hf:imdb")
    with pytest.raises(DatasetError, match=r"kind 'table' is your own table"):
        load_dataset(path, kind="table")
    with pytest.raises(DatasetError, match=r"--kind art names a paper schema"):
        load_dataset(path, kind="art", table=TableSpec(text_column="review"))
    with pytest.raises(DatasetError, match=r"table= takes a TableSpec"):
        load_table(path, {"text_column": "review"})
    ds = load_dataset(path, kind="table", table=TableSpec(text_column="review"))
    assert ds.kind == "table"


def test_target_array_refuses_string_classes(tmp_path):
    ds = load_dataset(write(frame(), tmp_path / "f.csv"), table=SPEC)
    with pytest.raises(DatasetError, match=r"'label' are class labels"):
        ds.target_array
    only_numbers = load_dataset(tmp_path / "f.csv", table=TableSpec(
        text_column="review", targets="score,rating,flag"))
    assert only_numbers.target_array.shape == (8, 3)


def cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="actstore")
    add_cli(parser.add_subparsers(dest="command"))
    rc = run(parser, argv, "actstore")
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_show_your_own_table(tmp_path, capsys):
    path = write(frame(), tmp_path / "f.csv")
    rc, out, _ = cli(["datasets", "show", str(path), "--text-column", "review", "--targets",
                      "label,score", "--group-columns", "region", "--split-column", "split"],
                     capsys)
    assert rc == 0
    assert "kind table" in out and "target      label: class, 2 classes" in out
    assert "target      score: 0.5 .. 7.5" in out and "rows        8  (test 2, train 6)" in out
    rc, out, _ = cli(["datasets", "show", str(path), "--entity-column", "city", "--template",
                      "Where is {entity}?", "--json"], capsys)
    s = json.loads(out)
    assert rc == 0 and s["template"] == "Where is {entity}?" and s["has_entity"]
    assert s["examples"][0] == "Where is Paris?"
    rc, _, err = cli(["datasets", "show", str(path), "--text-column", "nope"], capsys)
    assert rc != 0 and "no column(s) 'nope'; its columns are 'review'" in err
    with pytest.raises(SystemExit):
        cli(["datasets", "show", "--help"], capsys)
    out = capsys.readouterr().out
    assert "--split-column COL" in out and "20 % test" in out


def test_na_spellings_and_almost_numeric_targets(tmp_path):
    (tmp_path / "n.csv").write_text("text,y,region\na,1.5,NA\nb,NaN,EU\nc,2,EU\nd,null,NA\n"
                                    "e,3,NA\nf,4,EU\n")
    spec = TableSpec(text_column="text", targets="y,region")
    with pytest.raises(DatasetError, match=r"row 1 \(line 3\), column 'y': missing target"):
        load_dataset(tmp_path / "n.csv", table=spec)
    ds = load_dataset(tmp_path / "n.csv", table=spec, drop_invalid=True)
    assert ds.target_kinds == {"y": "regression", "region": "class"}
    assert ds.table["region"].tolist() == ["NA", "EU", "NA", "EU"] and ds.n_dropped == 2
    assert ds.table["y"].tolist() == [1.5, 2.0, 3.0, 4.0]
    # a column of numbers with a typo is not a column of classes
    (tmp_path / "t.csv").write_text("text,y\n" + "".join(f"r{i},{i}.5\n" for i in range(9))
                                    + "r9,1,5\n".replace(",5", "x5"))
    with pytest.raises(DatasetError, match=r"target 'y' is numbers except 1 value\(s\) \(row 9 "
                       r"\(line 11\): '1x5'\); fix them, or say 'y:regression'"):
        load_dataset(tmp_path / "t.csv", table=TableSpec(text_column="text", targets="y"))
    # strings that all look like numbers (Parquet) stay a string class target
    write(pd.DataFrame({"text": list("abcd"), "zip": ["01", "02", "01", "02"]}),
          tmp_path / "z.parquet")
    ds = load_dataset(tmp_path / "z.parquet", table=TableSpec(text_column="text", targets="zip"))
    assert ds.target_kinds == {"zip": "class"} and ds.table["zip"].tolist() == ["01", "02"] * 2


def test_the_table_flags_do_not_import_pandas():
    code = ("import argparse, sys\n"
            "from actstore.datasets import add_cli\n"
            "p = argparse.ArgumentParser(); add_cli(p.add_subparsers())\n"
            "p.format_help()\n"
            "print('pandas' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "False"
