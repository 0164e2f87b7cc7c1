"""Scale-out benchmark: rows/s of `actstore extract` and `fastprobe fit` with 1 vs N processes.

Each configuration is the documented command run through torchrun
(``python -m torch.distributed.run --nproc-per-node P -m actstore extract ...``), so the numbers
include everything a user pays inside the job: tokenising, forward passes, store writes, the
rank-0 store creation, the barriers and the final fold of the progress records. Model loading and
interpreter start-up are reported apart (``wall``). The distributed store is checked byte for
byte against the one-process store.

Model: a random-init Llama (``--config``; weights do not change the speed) with a byte-level
BPE tokenizer trained on the entities, saved as a local HF directory. Data: the paper's
world_place.csv (first ``--rows`` rows).

  python -m bench.scale_out                        # 1 vs 2 processes, CPU, 1 thread each
  python -m bench.scale_out --procs 1,2,4 --rows 4096 --device cuda   # a multi-GPU node
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import PAPER_CSV, REPO
from bench.extract import CONFIGS  # random-init Llama shapes, shared


def make_model_dir(path: Path, config: str, entities: list[str]) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(entities + ["What are the lat/lon coordinates of "] * 20,
                           trainers.BpeTrainer(vocab_size=1024,
                                               special_tokens=["<s>", "</s>", "<pad>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                               show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=512, bos_token_id=0,
                      eos_token_id=1, pad_token_id=2, **CONFIGS[config])
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def torchrun(procs: int, args: list[str], threads: int, timeout: float = 1800):
    from actstore.distributed import _free_port
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
           "--master-port", str(_free_port()), *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p.stdout, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--procs", default="1,2", help="process counts to compare (default 1,2)")
    ap.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rows-per-chunk", type=int, default=128,
                    help="store chunk = work unit dealt to ranks (default 128: many per rank)")
    ap.add_argument("--fit", action="store_true", help="also time fastprobe fit --all-layers")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)

    import pandas as pd

    import actstore
    procs = [int(x) for x in a.procs.split(",")]
    work = Path(tempfile.mkdtemp(prefix="scale_out_"))
    rows = []
    try:
        names = pd.read_csv(PAPER_CSV, nrows=a.rows)["name"].astype(str).tolist()
        model = make_model_dir(work / "model", a.config, names)
        stores = {}
        for p in procs:
            out = work / f"p{p}.zarr"
            so, wall = torchrun(p, ["-m", "actstore", "extract", "--model", str(model),
                                    "--dataset", str(PAPER_CSV), "--limit", str(a.rows),
                                    "--prompt", "coords", "--out", str(out), "--no-progress",
                                    "--device", a.device, "--batch-size", str(a.batch_size),
                                    "--rows-per-chunk", str(a.rows_per_chunk)],
                                a.threads)
            m = re.search(r"in ([\d.]+) s \(([\d.]+) rows/s", so)
            sec, rps = float(m.group(1)), float(m.group(2))
            stores[p] = out
            row = {"processes": p, "threads_per_process": a.threads, "rows": a.rows,
                   "extract_s": sec, "extract_rows_per_s": rps, "extract_wall_s": round(wall, 1)}
            if a.fit:
                so, wall = torchrun(p, ["-m", "probes", "fit", "--all-layers", str(out),
                                        "--quiet", "--device", a.device], a.threads)
                m = re.search(r"\(([\d.]+) s;", so)
                row.update(fit_s=float(m.group(1)), fit_wall_s=round(wall, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
        # the distributed stores hold the bytes of the one-process store
        import numpy as np
        ref = actstore.open(stores[procs[0]])
        same = all(np.array_equal(actstore.open(s).read(slice(0, a.rows)),
                                  ref.read(slice(0, a.rows))) for s in stores.values())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = rows[0]["extract_rows_per_s"]
    cfg = CONFIGS[a.config]
    stamp = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    print(f"\n{platform.node()} {os.cpu_count()} CPUs, {stamp}; "
          f"random-init Llama d={cfg['hidden_size']} x {cfg['num_hidden_layers']} layers, "
          f"{a.rows} rows of world_place, batch {a.batch_size}, {a.rows_per_chunk} rows per "
          f"chunk, device {a.device}, "
          f"{a.threads} thread(s) per process; stores byte-identical: {same}\n")
    head = "| processes | extract rows/s | speed-up | extract s | wall s (incl. start-up) |"
    sep = "|---|---|---|---|---|"
    if a.fit:
        head += " fit s (in job) | fit wall s |"
        sep += "---|---|"
    print(head)
    print(sep)
    for r in rows:
        line = (f"| {r['processes']} | {r['extract_rows_per_s']:.1f} | "
                f"{r['extract_rows_per_s'] / base:.2f}x | {r['extract_s']:.1f} | "
                f"{r['extract_wall_s']:.1f} |")
        if a.fit:
            line += f" {r['fit_s']:.2f} | {r['fit_wall_s']:.1f} |"
        print(line)
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "identical": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
