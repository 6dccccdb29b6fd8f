"""The GPU job scripts, run on the CPU: a GPU session has minutes, so what its one call does
must already work (about a minute: tiny models are trained, averaged and scored)."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SMALL = "trainer=debug data.vocab_size=300 device=cpu"
TINY = f"{SMALL} model.d_model=32 model.n_heads=2 model.d_ff=64 model.n_enc_layers=1"
TINY += " model.n_dec_layers=1"
TINY_RNN = f"model=rnn {SMALL} model.emb_dim=32 model.hidden_size=32"
SIZE = dict(d_model=32, n_heads=2, d_ff=64, n_enc_layers=1, n_dec_layers=1)


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.sh")), ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def gpu_job(work: Path, out: Path, runs: list[str], **env) -> None:
    env = {
        **os.environ,
        "SKIP_INSTALL": "1",  # this machine has the packages
        # One thread per run: two concurrent runs at 2 threads each on a 2-core machine took
        # this test from about 22 s to 70-90 s.
        "RUN_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OUT": str(out),
        "MT_CACHE_DIR": str(work / "cache"),
        **env,
    }
    subprocess.run(["bash", "scripts/gpu_job.sh", *runs], cwd=work, env=env, check=True)


def test_gpu_job_trains_chooses_on_valid_and_scores_every_run(corpus_root, tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("conf", "transformer", "scripts", "train.py"):
        (work / name).symlink_to(ROOT / name)
    (work / ".gpudata").symlink_to(corpus_root)
    # A list override goes through the script's word splitting unglobbed ([0.0,1.0] would
    # match a file named "trainer.final.length_penalties=0").
    (work / "trainer.final.length_penalties=0").touch()
    keep = "trainer.keep_checkpoints=5 trainer.patience=0 trainer.final.length_penalties=[0.0,1.0]"
    gpu_job(
        work,
        tmp_path / "out",
        ["tf", f"{TINY} decode=beam {keep}", "rnn", f"{TINY_RNN} decode=beam {keep}"],
        DECODES="greedy",
    )
    for run in ("tf", "rnn"):
        final = json.loads((work / "runs" / run / "metrics.json").read_text())["final"]
        assert final["chosen_on"] == "valid"
        got = [(r["checkpoint"], r["length_penalty"]) for r in final["candidates"]]
        assert got == [
            (f"checkpoints/{c}.pt", a) for c in ("best", "avg_last2") for a in (0.6, 0.0, 1.0)
        ]
        rows = json.loads((work / f"runs/evaluate-{run}/results.json").read_text())
        assert [(r["name"], r["split"], r["decode"]) for r in rows] == [(run, "test2016", "greedy")]
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts/runs_table.py"), "--final", "runs/tf", "runs/rnn"],
        cwd=work, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    for line, run in zip(table[2:4], ("tf", "rnn")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        m = json.loads((work / "runs" / run / "metrics.json").read_text())
        assert cells[0] == f"[{run}]({run}/)" and len(cells) == 10
        assert cells[5] == f"{m['final']['candidates'][0]['valid_bleu']:.2f}"
        assert cells[6].endswith(f"beam 5, lp {m['final']['length_penalty']}")
        assert float(cells[8]) == pytest.approx(m["test2016"]["bleu"], abs=0.005)
    with tarfile.open(tmp_path / "out" / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    assert not any(n.endswith((".pt", ".train.lock")) for n in names)  # not a result
    # what a result folder is made of, for each run (the archive is all a GPU session keeps)
    for run in ("tf", "rnn"):
        kept = ["metrics.json", "valid.hyp", "test2016.hyp", "train_log.csv", "valid_log.csv",
                "train.log", ".hydra/config.yaml"]  # fmt: skip
        wanted = {f"runs/{run}/{name}" for name in kept}
        wanted |= {f"runs/{run}.log", f"runs/{run}.cmd", f"runs/evaluate-{run}/results.json"}
        assert wanted <= names, sorted(wanted - names)


def runs_table(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    script = str(ROOT / "scripts/runs_table.py")
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True)


def table_run(path: Path, **changes) -> Path:
    """A run folder with a metrics.json from before trainer.final.beam_sizes (its beam size
    is only under "decode"), with ``changes`` to its top-level keys."""
    path.mkdir()
    final = {
        "checkpoint": "checkpoints/avg_last5.pt",
        "length_penalty": 1.4,
        "candidates": [{"checkpoint": "checkpoints/best.pt", "valid_bleu": 41.88}],
    }
    scores = {"bleu": 42.46, "chrf": 60.0, "bleu_signature": "sig"}
    metrics = {
        "steps": 4374, "train_seconds": 6001.0, "train_tokens_per_s": 2692,
        "best_valid_bleu": 40.94, "decode": {"beam_size": 7}, "final": final,
        "valid": scores, "test2016": {**scores, "bleu": 41.13},
    }  # fmt: skip
    (path / "metrics.json").write_text(json.dumps({**metrics, **changes}))
    return path


def test_runs_table_names_folders_without_metrics_and_reads_older_runs(tmp_path):
    table_run(tmp_path / "old")
    done = runs_table(tmp_path, "--final", "old")
    assert done.returncode == 0, done.stderr
    cells = [c.strip() for c in done.stdout.splitlines()[2].strip("|").split("|")]
    assert cells[5:9] == ["41.88", "avg_last5, beam 7, lp 1.4", "42.46", "41.13"]
    # A folder without metrics.json is named, not skipped (a table missing a run reads as complete).
    (tmp_path / "unfinished").mkdir()
    done = runs_table(tmp_path, "old", "unfinished")
    assert done.returncode != 0 and "no metrics.json in: unfinished" in done.stderr
    assert done.stdout == ""


def test_runs_table_shows_each_runs_own_figures_in_their_columns(tmp_path):
    """Every cell of a row is its run's: updates, seconds, tokens/s, best valid BLEU, best.pt's
    valid BLEU (the first candidate), the choice (no checkpoint: the last weights), valid and
    test2016 BLEU, chrF; and every run's BLEU signature is listed."""
    table_run(tmp_path / "a")
    final = {"checkpoint": None, "length_penalty": 0.6, "beam_size": 4,
             "candidates": [{"valid_bleu": 35.5}, {"valid_bleu": 36.1}]}  # fmt: skip
    test = {"bleu": 33.0, "chrf": 55.5, "bleu_signature": "sig2"}
    table_run(tmp_path / "b", steps=100, train_seconds=12.4, train_tokens_per_s=5000,
              best_valid_bleu=30.0, final=final, test2016=test)  # fmt: skip
    done = runs_table(tmp_path, "--final", "a", "b")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:4]]
    assert rows == [
        ["[a](a/)", "4,374", "6001", "2,692", "40.94", "41.88", "avg_last5, beam 7, lp 1.4",
         "42.46", "41.13", "60.00"],
        ["[b](b/)", "100", "12", "5,000", "30.00", "35.50", "last, beam 4, lp 0.6", "42.46",
         "33.00", "55.50"],
    ]  # fmt: skip
    assert lines[-1] == "BLEU signature: `sig`, `sig2`"


def test_runs_table_help_is_help_and_a_bad_command_line_exits_2(tmp_path):
    done = runs_table(tmp_path, "--help")  # was read as a run folder named --help
    assert done.returncode == 0 and done.stdout.startswith("usage: runs_table.py")
    assert "--final" in done.stdout and done.stderr == ""
    for args in ([], ["--last", "run"]):
        done = runs_table(tmp_path, *args)
        assert done.returncode == 2 and "usage: runs_table.py" in done.stderr, args
        assert done.stdout == ""


@pytest.mark.parametrize(
    "error, change",
    [
        ('train_seconds must be a number, got "12"', {"train_seconds": "12"}),
        ("steps must be an integer, got null", {"steps": None}),
        ("best_valid_bleu must be a number, got null", {"best_valid_bleu": None}),
        ("steps must be an integer, got 4374.0", {"steps": 4374.0}),
        ("no test2016.bleu_signature", {"test2016": {"bleu": 41.0, "chrf": 60.0}}),
        ('test2016.bleu must be a number, got "41"',
         {"test2016": {"bleu": "41", "chrf": 60.0, "bleu_signature": "s"}}),
        ("valid must be an object, got [42.0]", {"valid": [42.0]}),
        ("no final.length_penalty",
         {"final": {"checkpoint": None, "candidates": [{"valid_bleu": 1.0}]}}),
        ("final.checkpoint must be text or null, got 3",
         {"final": {"checkpoint": 3, "length_penalty": 1.0, "candidates": [{}]}}),
        ("final.candidates[0] must be an object, got 41.9",
         {"final": {"checkpoint": None, "length_penalty": 1.0, "candidates": [41.9]}}),
        ("no final.candidates[0].valid_bleu",
         {"final": {"checkpoint": None, "length_penalty": 1.0, "candidates": [{}]}}),
        ('decode.beam_size must be an integer, got "5"', {"decode": {"beam_size": "5"}}),
        ("decode must be an object, got null", {"decode": None}),
    ],
)  # fmt: skip
def test_runs_table_checks_every_run_before_printing_a_line(tmp_path, error, change):
    """Each of these was a traceback after the rows before it had been printed."""
    table_run(tmp_path / "good")
    table_run(tmp_path / "bad", **change)
    done = runs_table(tmp_path, "--final", "good", "bad")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"error: bad/metrics.json: {error}\n"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_runs_table_names_a_metrics_file_that_is_no_json_object(tmp_path, text):
    table_run(tmp_path / "bad")
    (tmp_path / "bad" / "metrics.json").write_text(text)
    done = runs_table(tmp_path, "bad")
    assert done.returncode == 1 and done.stdout == "" and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: bad/metrics.json: not ")


def test_runs_table_shows_a_run_without_valid_or_test2016_scores(tmp_path):
    # data.test_splits=[] (or another test set): no test2016, and so no signature of its own
    metrics = json.loads((table_run(tmp_path / "a") / "metrics.json").read_text())
    bare = {k: v for k, v in metrics.items() if k not in ("valid", "test2016")}
    (table_run(tmp_path / "b") / "metrics.json").write_text(json.dumps(bare))
    done = runs_table(tmp_path, "a", "b")
    assert done.returncode == 0, done.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in done.stdout.splitlines()]
    assert rows[2][5:] == ["42.46", "41.13", "60.00"] and rows[3][5:] == ["-", "-", "-"]
    assert done.stdout.endswith("\nBLEU signature: `sig`\n")


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "compile, device, steps",
    [
        ("reduce-overhead", "cuda", [0, 1, 2, 3, 4, 2, 3, 4]),  # recorded at the second use
        ("max-autotune", "cuda", [0, 1, 2, 3, 4, 2, 3, 4]),
        ("default", "cuda", [0, 1, 2, 3, 4]),
        (None, "cuda", [0, 1, 2, 3, 4]),
        ("reduce-overhead", "cpu", [0, 1, 2, 3, 4]),  # no CUDA graphs on the CPU
    ],
)
def test_train_speed_times_no_cuda_graph_recording(monkeypatch, compile, device, steps):
    """The untimed steps before timing: the warm-up batches, then the timed batches once,
    or twice through CUDA graphs, whose graph for a shape is recorded at its second use (the
    H200 run of 2026-12-04 with one pass timed the recordings: 5x slower than eager)."""
    train_speed = load_bench("train_speed")
    stepped = []
    monkeypatch.setattr(train_speed, "make_step", lambda *a: stepped.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    batches = [SimpleNamespace(i=i) for i in range(5)]
    for b in batches:
        b.to = lambda device, b=b: b  # the batches stay on the host
    timing = train_speed.Timing(None, batches, 0, torch.device(device), "bf16", 3, 2, compile,
                                False, lambda: None)  # fmt: skip
    assert [b.i for b in stepped] == steps
    assert [b.i for b in timing.timed] == [2, 3, 4]


def test_profile_step_sorts_kernels_into_kinds_and_rates_the_matrix_products():
    profile = load_bench("profile_step")
    # the names torch.profiler reported on the H100 (profile_h100_eager.md: the cuDNN SDPA,
    # nvjet, direct_copy, reduce, GammaBeta, dropout and bfloat16 elementwise ones), and names
    # of the form the other SDPA kernels, cuBLAS, Triton and memsets take (not read off a
    # profile here)
    at = "void at::native::"
    kinds = {
        "attention": [
            "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x",
            "fmha_cutlassB_bf16_aligned_64x64_k64_sm80",
            "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128",
        ],
        "matrix products": [
            "nvjet_sm90_tst_64x128_64x8_2x1_v_bz_splitK_NTN",
            "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64",
            "triton_tem_fused_mm_0",
        ],
        "fused by torch.compile (Triton)": ["triton_poi_fused_add_native_dropout_0"],
        "casts and copies": [
            f"{at}unrolled_elementwise_kernel<at::native::direct_copy_k",
            "Memset (Device)",
        ],
        "reductions (bias gradients, sums)": [f"{at}reduce_kernel<128, 4, at::native::ReduceOp"],
        "layer norm": [f"{at}(anonymous namespace)::GammaBetaBackwardCUDAKernelTem"],
        "dropout": [f"{at}(anonymous namespace)::fused_dropout_kernel_vec<c10::"],
        "other elementwise": [f"{at}vectorized_elementwise_kernel<8, at::native::bfloat16"],
        "softmax and loss": ["void (anonymous namespace)::cunn_SoftMaxForward<4, float>"],
        "optimizer and gradient clipping": [f"{at}multi_tensor_apply_kernel<FusedAdamMath"],
        "other": ["some_new_kernel"],
    }
    for kind, names in kinds.items():
        for name in names:
            assert profile.kernel_kind(name) == kind, name
    # 2 steps: 2 ms of products per step at 1e12 FLOPs per step is 500 TFLOP/s
    kernels = [("nvjet_a", 6, 3000.0), ("nvjet_b", 2, 1000.0), ("flash_fwd", 4, 1000.0),
               ("void at::native::vectorized_elementwise_kernel<4>", 20, 5000.0)]  # fmt: skip
    rows = profile.kinds_table(kernels, 2, {"linear": 1e12, "attention": 5e10})
    assert [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]] == [
        ["other elementwise", "10", "2.50", "50%", "-"],
        ["matrix products", "4", "2.00", "40%", "500"],
        ["attention", "2", "0.50", "10%", "100"],
    ]


def test_ours_with_bf16_weights_is_compared_with_marian_in_its_own_mode():
    train_speed = load_bench("train_speed")
    batch = SimpleNamespace(src=torch.zeros(8, 12), tgt_in=torch.zeros(8, 10))
    graphs = "+compile:reduce-overhead"
    models = {
        "marian": (None, {}),
        "ours/bf16-weights": (None, {"precision": "bf16-weights", "ablation": True}),
        "marian" + graphs: (None, {}),
        "ours/bf16-weights" + graphs: (
            None,
            {"precision": "bf16-weights", "compare_to": "marian" + graphs},
        ),
    }
    tok_s = dict(zip(models, [100.0, 150.0, 200.0, 500.0]))
    stats = dict(step_ms=1.0, peak_gib=0.0, seconds=1.0, faults=0, batches=[batch])
    measured = {name: {"tok_s": v, **stats} for name, v in tok_s.items()}
    rows = train_speed.table_rows(models, measured, "multi30k-default", 4096, SIZE, 100, 0, None)
    ratios = {row.split(" | ")[2]: row.rstrip(" |").split(" | ")[-1] for row in rows}
    assert ratios["ours/bf16-weights"] == "1.50x"  # eager, against eager Marian
    assert ratios["ours/bf16-weights" + graphs] == "2.50x"  # not 5.00x against eager Marian
    # the first step's wall time (compiling, for the compiled rows) has its own column
    measured["marian" + graphs]["first_s"] = 61.25
    rows = train_speed.table_rows(models, measured, "multi30k-default", 4096, SIZE, 100, 0, None)
    first = {row.split(" | ")[2]: row.split(" | ")[7] for row in rows}
    assert first["marian" + graphs] == "61.2" and first["marian"] == "-"


class FakeTokenizer:
    pad_id, bos_id, eos_id = 0, 1, 2

    def __len__(self) -> int:
        return 100


@pytest.mark.parametrize(
    "argv",
    [
        # gpu_bench.sh defaults: the eager sweep, then the compiled models; next: compiled
        # rows of 128 in bf16-weights
        "--sdpa efficient --packed-rows 128 --bf16-weights --rounds 4",
        "--compiled-only --sdpa efficient --packed-rows 128",
        "--compiled-only --sdpa efficient --packed-rows 128 --bf16-weights",
        "--compiled-only --compile-mode reduce-overhead --sdpa efficient --bf16-weights",
        # every option at once
        "--compile --sdpa efficient,flash+efficient --packed-rows 128,256 --bf16-weights "
        "--ablate --rnn --kinds dot,local",
    ],
)
def test_train_speed_compares_each_ours_with_marian_in_its_own_mode(argv):
    """The models ``bench/train_speed.py`` times for a set of options: each variant of ours
    has a ratio in the table, and it is taken against Marian with the same SDPA kernels and
    the same compile mode (an ablation against plain eager Marian, which runs both as
    plain), listed right after its ours, so that a time limit cuts options before pairs."""
    train_speed = load_bench("train_speed")
    args = train_speed.parse_args(train_speed.make_parser(), ["--device", "cpu", *argv.split()])
    models = train_speed.models_to_time(args, "multi30k-default", SIZE, FakeTokenizer(), fused=True)
    names = list(models)
    assert len(names) == len(set(names)) and "ours" in names[0]
    batch = SimpleNamespace(src=torch.zeros(8, 12), tgt_in=torch.zeros(8, 10))
    stats = dict(step_ms=1.0, peak_gib=None, seconds=1.0, faults=0, batches=[batch])
    measured = {name: {"tok_s": 100.0 + i, **stats} for i, name in enumerate(names)}
    rows = train_speed.table_rows(models, measured, "multi30k-default", 4096, SIZE, 100, 0, None)
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows]
    ratio = {row[2]: row[-1] for row in cells}  # model: ours / Marian
    for name, (_, opt) in models.items():
        if not name.startswith("ours") or "kind" in opt:  # Marian, the RNN, other kinds
            assert ratio[name] == "", name
            continue
        assert ratio[name].endswith("x"), name
        mode = "" if opt.get("ablation") else name.removeprefix("ours").split("/bf16")[0]
        peer = opt.get("compare_to", "marian" + mode)
        peer_opt = models[peer][1]
        assert (peer_opt.get("sdpa"), peer_opt.get("compile")) == (
            opt.get("sdpa"), opt.get("compile")
        ), name  # fmt: skip
        assert names.index(peer) <= names.index(name) + 1, name
    for name in names:  # each pair: Marian right after ours of its mode
        if name.startswith("marian"):
            assert names[names.index(name) - 1] == "ours" + name.removeprefix("marian")
    if "--rnn" in argv:
        assert "rnn" in names and ratio["rnn"] == ""


def test_train_speed_times_only_the_models_asked_for_with_their_marian():
    """--models: the named rows, each with the Marian its ratio is taken against (Marian
    compiled in the same mode for a compiled variant, plain Marian for an ablation), in the
    table's order; without it, every model the options make."""
    train_speed = load_bench("train_speed")
    argv = ["--device", "cpu", "--sdpa", "efficient", "--packed-rows", "128", "--bf16-weights",
            "--compile", "--ablate"]  # fmt: skip
    args = train_speed.parse_args(train_speed.make_parser(), argv)
    every = train_speed.models_to_time(args, "multi30k-default", SIZE, FakeTokenizer(), True)
    assert train_speed.only_models(every, []) == every
    compiled = "ours/rows-128/bf16-weights+compile/sdpa=efficient"
    chosen = train_speed.only_models(every, [compiled, "ours/unfused-loss"])
    assert list(chosen) == ["marian", "marian+compile/sdpa=efficient", compiled,
                            "ours/unfused-loss"]  # fmt: skip
    assert chosen[compiled][1] == {"compile": "default", "sdpa": "efficient", "rows": 128,
                                   "compare_to": "marian+compile/sdpa=efficient",
                                   "precision": "bf16-weights"}  # fmt: skip


def test_the_ratio_to_marian_shows_the_spread_of_its_rounds():
    """With --rounds, each round times the same batches for both models: the range of the
    rounds' ratios says how far the machine's load moved the overall one."""
    train_speed = load_bench("train_speed")
    batch = SimpleNamespace(src=torch.zeros(8, 12), tgt_in=torch.zeros(8, 10))
    models = {
        "ours": (None, {}),
        "marian": (None, {}),
        "ours/unfused-loss": (None, {"ablation": True}),
    }
    stats = dict(step_ms=1.0, peak_gib=0.0, faults=0, batches=[batch])
    measured = {
        "ours": {"tok_s": 120.0, "seconds": 5.0, "round_s": [1.0, 2.0, 2.0], **stats},
        "marian": {"tok_s": 100.0, "seconds": 6.0, "round_s": [1.5, 2.0, 2.5], **stats},
        "ours/unfused-loss": {"tok_s": 110.0, "seconds": 5.5, "round_s": [5.5], **stats},
    }
    rows = train_speed.table_rows(models, measured, "multi30k-default", 4096, SIZE, 100, 0, None)
    ratios = {row.split(" | ")[2]: row.rstrip(" |").split(" | ")[-1] for row in rows}
    assert ratios["ours"] == "1.20x (1.00-1.50)"
    assert ratios["ours/unfused-loss"] == "1.10x"  # rounds that do not pair up: no spread


def test_train_speed_counts_the_graphs_compiled_before_and_while_timed(monkeypatch):
    """For the claim of no recompilation storm: a compiled model's row gives the graphs
    compiled before its timed steps and, in brackets, while they ran."""
    train_speed = load_bench("train_speed")
    compiled, seen, calls = [0], set(), []

    def step(b):  # compiles at each new shape, and once more at its 8th call
        calls.append(b)
        if b.shape not in seen or len(calls) == 8:
            seen.add(b.shape)
            compiled[0] += 1

    monkeypatch.setattr(train_speed, "make_step", lambda *a: step)
    monkeypatch.setattr(train_speed, "graphs_compiled", lambda: compiled[0])
    batches = [SimpleNamespace(shape=s, tgt_out=torch.ones(1)) for s in "aabbc"]
    for b in batches:
        b.to = lambda device, b=b: b
    cpu = torch.device("cpu")
    timing = train_speed.Timing(None, batches, 0, cpu, "fp32", 3, 2, "default", False,
                                lambda: None)  # fmt: skip
    assert timing.compiled == (3, 0)  # a, b, c: the warm-up and one pass over the timed
    timing.run(2)  # calls 6 and 7
    assert timing.result()["compiled"] == (3, 0)
    timing.run(1)  # call 8 compiles again
    assert timing.result()["compiled"] == (3, 1)
    eager = train_speed.Timing(None, batches, 0, cpu, "fp32", 3, 2, None, False, lambda: None)
    assert eager.compiled is None
    stats = dict(step_ms=1.0, peak_gib=0.0, seconds=1.0, faults=0, batches=[
        SimpleNamespace(src=torch.zeros(8, 12), tgt_in=torch.zeros(8, 10))])  # fmt: skip
    models = {"ours": (None, {}), "ours+compile": (None, {})}
    measured = {"ours": {"tok_s": 1.0, "compiled": None, **stats},
                "ours+compile": {"tok_s": 1.0, "compiled": (3, 1), **stats}}  # fmt: skip
    rows = train_speed.table_rows(models, measured, "multi30k-default", 4096, SIZE, 100, 0, None)
    graphs = {row.split(" | ")[2]: row.split(" | ")[8] for row in rows}
    assert graphs == {"ours": "-", "ours+compile": "3 (+1)"}


def test_join_pairs_makes_sentences_k_times_as_long_in_corpus_order():
    train_speed = load_bench("train_speed")
    from transformer.data import EncodedSplit

    src = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]
    tgt = [[10], [11, 12], [13], [14, 15], [16]]
    split = EncodedSplit.from_lists(src, tgt)
    assert train_speed.join_pairs(split, 1) is split
    joined = train_speed.join_pairs(split, 2)  # the fifth pair, a remainder, is left out
    got = joined.rows(np.arange(len(joined)))
    assert [x.tolist() for x in got[0]] == [[1, 2, 3], [4, 5, 6, 7]]
    assert [x.tolist() for x in got[1]] == [[10, 11, 12], [13, 14, 15]]
    assert joined.src_lens.tolist() == [3, 4] and joined.tgt_lens.tolist() == [3, 3]


class FakeAllocator:
    """torch.cuda's allocated-memory counters, moved by hand."""

    def __init__(self):
        self.now = self.top = 0

    def take(self, n: int) -> None:
        self.now += n
        self.top = max(self.top, self.now)

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: self.now)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: self.top)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: setattr(
            self, "top", self.now))  # fmt: skip
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def test_with_rounds_a_models_gpu_peak_leaves_out_what_the_others_hold(monkeypatch):
    """On a GPU, --rounds keeps every model built: each model's peak is what it holds
    between steps plus the most its own steps take on top, not the device's peak, which
    would count the models built before it (the reason rounds were CPU-only)."""
    train_speed = load_bench("train_speed")
    memory = FakeAllocator()
    memory.install(monkeypatch)
    batch = SimpleNamespace(tgt_out=torch.ones(2, 3))
    batch.to = lambda device: batch  # stays on the host
    timings = {}
    for name, keeps, steps_take in (("first", 100, 40), ("second", 30, 7)):
        held = memory.now
        memory.take(keeps)  # the model built: weights, optimizer state, kept between steps

        def step(_, extra=steps_take):
            memory.take(extra)  # activations, freed when the step ends
            memory.now -= extra

        monkeypatch.setattr(train_speed, "make_step", lambda *a, step=step: step)
        timings[name] = train_speed.Timing(None, [batch] * 4, 0, torch.device("cuda"), "bf16",
                                           4, 0, None, False, lambda: None, held=held)  # fmt: skip
    for _ in range(2):  # two alternating rounds of two steps
        for timing in timings.values():
            timing.run(2)
    assert memory.top == 130 + 7  # the device's peak counts both models
    assert timings["first"].peak == 100 + 40
    assert timings["second"].peak == 30 + 7


def test_attention_kernels_packs_the_real_tokens_as_a_variable_length_kernel_takes_them(
    monkeypatch,
):
    # The varlen kernel runs on a GPU only; here a loop over the sequences stands in for it,
    # so that the bench's packing (flat positions, cumulative lengths, causal and cross
    # lengths) and unpacking are checked against padded attention with the model's masks.
    import torch.nn.functional as F

    varlen = pytest.importorskip("torch.nn.attention.varlen")  # torch >= 2.10

    bench = load_bench("attention_kernels")

    def one_at_a_time(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1)):
        outs = []
        for i in range(len(cu_q) - 1):
            qi, ki, vi = (x[c[i] : c[i + 1]].transpose(0, 1)
                          for x, c in ((q, cu_q), (k, cu_k), (v, cu_k)))  # fmt: skip
            assert qi.shape[1] <= max_q and ki.shape[1] <= max_k
            causal = tuple(window_size) == (-1, 0)
            outs.append(
                F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal).transpose(0, 1)
            )
        return torch.cat(outs)

    monkeypatch.setattr(varlen, "varlen_attn", one_at_a_time)
    src_len, tgt_len = torch.tensor([7, 3, 1, 5, 6]), torch.tensor([2, 6, 4, 1, 3])
    src_mask = torch.arange(7)[None, :] < src_len[:, None]
    tgt_out = torch.where(torch.arange(6)[None, :] < tgt_len[:, None], 5, 0)  # pad id 0
    batch = SimpleNamespace(src=src_mask.long(), src_mask=src_mask, tgt_in=tgt_out, tgt_out=tgt_out)
    cpu = torch.device("cpu")
    for kind in bench.KINDS:
        call = bench.Call(kind, batch, 0, 2, 8, torch.float32, cpu)
        assert call.tokens == int((tgt_len if kind != "encoder self" else src_len).sum())
        assert bench.check(call, "math") < 1e-6
        if kind != "decoder self":  # torch takes no causal flag with nested tensors
            assert bench.check(call, "nested math") < 1e-5, kind
            assert bench.time_call(call, "nested math", 0.1, 1, cpu) > 0
        assert bench.check(call, "varlen") < 1e-5, kind
        call.pack_leaves()
        assert bench.check(call, "varlen (kernel)") < 1e-5, kind
        assert bench.time_call(call, "varlen", 0.0, 1, cpu) > 0  # backward through the packing
        assert call.q.grad is None and call.packed[0].grad is None
        # packed rows, several sentences to a row of 16 slots, the segment mask
        assert bench.check(call, "rows 128 math") < 1e-5, kind
        call.pack_rows(16)
        assert call.rows[16].leaves[0].shape[:2] == (2, 16)  # pairs 0-3, then pair 4
        assert bench.check(call, "rows 16 math") < 1e-5, kind
        assert bench.time_call(call, "rows 16 math", 0.1, 1, cpu) > 0
        assert call.rows[16].leaves[0].grad is None
    # the check can fail: cross-attention with the target's lengths for the keys
    call.cu_k = call.cu_q
    assert bench.check(call, "varlen") > 0.05


def test_mfu_counts_the_pairs_at_their_own_lengths_and_the_right_peak():
    """MFU counted the padded shapes' FLOPs only; H100 PCIe was divided by the SXM peak."""
    train_speed = load_bench("train_speed")
    cfg, V, pad = SIZE, 100, 0
    src = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    tgt_in = torch.tensor([[1, 5, 6], [1, 0, 0]])
    batch = SimpleNamespace(src=src, src_mask=src != pad, tgt_in=tgt_in)
    per_pair = train_speed.train_flops(cfg, 1, 4, 3, V) + train_speed.train_flops(cfg, 1, 2, 1, V)
    assert train_speed.real_flops(cfg, batch, pad, V) == per_pair
    assert per_pair < train_speed.train_flops(cfg, 2, 4, 3, V)  # the padded shapes' count
    full = SimpleNamespace(src=src[:1], src_mask=src[:1] != pad, tgt_in=tgt_in[:1])
    assert train_speed.real_flops(cfg, full, pad, V) == train_speed.train_flops(cfg, 1, 4, 3, V)
    peak = train_speed.peak_flops
    assert peak("NVIDIA H100 80GB HBM3", "bf16") == peak("NVIDIA H200", "bf16") == 989e12
    assert peak("NVIDIA H100 PCIe", "bf16") == 756e12 and peak("NVIDIA H100 NVL", "bf16") == 835e12
    assert peak("NVIDIA H200 NVL", "bf16") == 835e12  # not the SXM part's 989 of "H200"
    assert peak("NVIDIA H100 80GB HBM3", "fp32") is None and peak("NVIDIA A10", "bf16") is None


def test_marian_is_timed_without_its_decoding_cache():
    """HF's default use_cache=True copied every decoder layer's keys and values into a cache
    at each training step (it is off only when labels are given)."""
    train_speed, given = load_bench("train_speed"), {}

    class Recorder(torch.nn.Module):  # stands in for MarianMTModel
        def forward(self, **kwargs):
            given.update(kwargs)
            return SimpleNamespace(logits=torch.zeros(1))

    src = torch.tensor([[3, 4, 0]])
    train_speed.MarianAdapter(Recorder())(src, src != 0, torch.tensor([[1, 5]]))
    assert given["use_cache"] is False and given["attention_mask"].tolist() == [[1, 1, 0]]


def test_the_real_marian_keeps_no_cache_in_the_benchmark():
    pytest.importorskip("transformers")  # pip install -e .[bench]
    train_speed = load_bench("train_speed")
    model = train_speed.build_model("marian", SIZE, 50, 0, 1, 2).eval()
    seen = []
    model.model.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(out), with_kwargs=True
    )
    src = torch.randint(3, 50, (2, 5))
    model(src, src != 0, torch.randint(3, 50, (2, 4)))
    assert seen[0].past_key_values is None


def pairs_batch(src_lens, tgt_lens, pad=0):
    """A padded seq2seq.Batch of pairs of these lengths (source with its EOS; target y + EOS,
    so tgt_in = BOS + y), ids drawn from 3..49."""
    from transformer.seq2seq import Batch

    g = torch.Generator().manual_seed(0)
    S, T = max(src_lens), max(tgt_lens)
    src = torch.randint(3, 50, (len(src_lens), S), generator=g)
    tgt = torch.randint(3, 50, (len(tgt_lens), T), generator=g)
    src[torch.arange(S)[None, :] >= torch.tensor(src_lens)[:, None]] = pad
    tgt_in = torch.where(torch.arange(T)[None, :] < torch.tensor(tgt_lens)[:, None], tgt, pad)
    tgt_in[:, 0] = 1  # BOS
    tgt_out = tgt_in.roll(-1, dims=1)
    tgt_out[:, -1] = pad
    tgt_out[torch.arange(len(tgt_lens)), torch.tensor(tgt_lens) - 1] = 2  # EOS
    return Batch(src, src != pad, tgt_in, tgt_out)


def test_the_analytic_flops_are_those_torch_counts_for_our_model():
    """train_speed.flops_by_part (what MFU and step_flops.md divide) against torch's own count
    of a forward and backward pass of ours, with the math attention kernel (matrix products
    only; torch's FlopCounterMode counts a backward product twice the forward's): the weights'
    products (mm, addmm) and attention's (bmm) apart. A count without the backward, the
    output projection, the cross-attention or its keys and values over the source was wrong
    by that much with no test failing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    train_speed = load_bench("train_speed")
    cfg = dict(d_model=16, n_heads=2, d_ff=40, n_enc_layers=2, n_dec_layers=3)
    no_dropout = dict(dropout=0.0, attn_dropout=0.0, act_dropout=0.0)
    torch.manual_seed(0)
    model = train_speed.build_model("ours", cfg, 50, 0, 1, 2, no_dropout)
    batch = pairs_batch([7, 7, 7], [5, 5, 5])  # no padding: the shapes are the pairs'
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(batch.src, batch.src_mask, batch.tgt_in).float().sum().backward()
    counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    parts = train_speed.flops_by_part(cfg, 3, 7, 5, 50)
    assert parts == {"linear": counted["aten.mm"] + counted["aten.addmm"],
                     "attention": counted["aten.bmm"]}  # fmt: skip
    assert train_speed.train_flops(cfg, 3, 7, 5, 50) == counter.get_total_flops()


def test_mfu_columns_divide_the_pairs_and_the_padded_shapes_flops_by_the_time_and_peak():
    """MFU: the FLOPs of the pairs at their own lengths over the timed seconds and the peak;
    MFU (padded): of the padded shapes. The columns swapped, or the padded count taken on
    another shape, passed every test; the RNN and other attention kinds (another model than
    the count's) show none."""
    train_speed = load_bench("train_speed")
    V, peak = 100, 1e12
    batches = [pairs_batch([6, 3, 2], [5, 4, 1]), pairs_batch([9, 8], [2, 7])]
    pairs = [(6, 5), (3, 4), (2, 1), (9, 2), (8, 7)]  # source tokens, BOS + target tokens
    real = sum(train_speed.train_flops(SIZE, 1, s, t, V) for s, t in pairs)
    padded = train_speed.train_flops(SIZE, 3, 6, 5, V) + train_speed.train_flops(SIZE, 2, 9, 7, V)
    models = {"ours": (None, {}), "marian": (None, {}), "rnn": (None, {}),
              "ours/dot": (None, {"kind": "dot"})}  # fmt: skip
    seconds = real / (0.25 * peak)  # 25% MFU
    stats = dict(tok_s=1.0, step_ms=1.0, peak_gib=None, faults=0, batches=batches)
    measured = {name: {**stats, "seconds": seconds} for name in models}
    measured["marian"]["seconds"] = 2 * seconds
    rows = train_speed.table_rows(models, measured, "multi30k-default", 4096, SIZE, V, 0, peak)
    mfu = {c[2]: (c[9], c[10]) for c in ([x.strip() for x in r.split("|")[1:-1]] for r in rows)}
    assert padded > 1.3 * real  # the two counts apart
    padded_mfu = [f"{share * padded / real:.1f}%" for share in (25, 12.5)]
    assert mfu == {"ours": ("25.0%", padded_mfu[0]), "marian": ("12.5%", padded_mfu[1]),
                   "rnn": ("-", "-"), "ours/dot": ("-", "-")}  # fmt: skip


def test_train_speed_times_only_the_timed_batches_and_counts_their_target_tokens(monkeypatch):
    """tok/s: the timed batches' target tokens (not source tokens, not padding) over the timed
    steps' seconds (not the warm-up's); step ms: the median step; the FLOPs of MFU counted
    on the timed batches; a round's seconds: its own steps'."""
    train_speed = load_bench("train_speed")
    clock = [0.0]
    durations = iter([50.0] * 4 + [1.0, 2.0, 6.0])  # warm-up: batch 0, then 1-3 once; timed
    monkeypatch.setattr(train_speed, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def step(b):
        clock[0] += next(durations)

    monkeypatch.setattr(train_speed, "make_step", lambda *a: step)
    batches = [pairs_batch([4, 4], [2, 2]), pairs_batch([5, 2, 3], [3, 6, 1]),
               pairs_batch([2], [4]), pairs_batch([7, 1], [1, 2])]  # fmt: skip
    timing = train_speed.Timing(None, batches, 0, torch.device("cpu"), "fp32", 3, 1, None,
                                False, lambda: None)  # fmt: skip
    assert timing.first_s == 50.0
    timing.run(2)
    partial = timing.result()  # after a round: the MFU of a table saved then counts its batches
    assert partial["batches"] == batches[1:3] and partial["seconds"] == 3.0
    timing.run(1)
    r = timing.result()
    tokens = (3 + 6 + 1) + 4 + (1 + 2)  # y + EOS of each pair of batches 1-3
    assert r["tok_s"] == tokens / 9.0 and r["seconds"] == 9.0
    assert r["step_ms"] == 2000.0  # the median step, not the mean (3000)
    assert r["batches"] == batches[1:] and r["round_s"] == [3.0, 6.0]


def test_train_speed_rounds_alternate_between_the_models(monkeypatch):
    """--rounds: every model is warmed up first, then each round times the next steps of every
    model in turn, so that a change in the machine's load hits them alike."""
    train_speed = load_bench("train_speed")
    ran = []

    class Timed:
        def __init__(self, model, batches, *args, **kwargs):
            self.model, self.timed = model, batches[2:]

        def run(self, n):
            ran.append((self.model.name, n))

        def result(self):
            return {}

    monkeypatch.setattr(train_speed, "Timing", Timed)

    def model(name):
        def build():
            m = torch.nn.Module()
            m.name = name
            return m

        return build

    models = {"ours": (model("ours"), {}), "marian": (model("marian"), {})}
    args = SimpleNamespace(device=torch.device("cpu"), steps=5, warmup=2, rounds=2, out=None)
    batches = [pairs_batch([2], [2])] * 7
    train_speed.time_models(args, models, batches, 0, "fp32", False, "g", lambda m: [], [])
    assert ran == [("ours", 2), ("marian", 2), ("ours", 3), ("marian", 3)]
    # an epoch with fewer batches than --warmup + --steps: its timed steps split evenly (not
    # 10 and 10, nor with --rounds 4 and 3 timed steps a round of none, whose ratio was 0 / 0)
    for steps, rounds, timed, sizes in ((20, 2, 5, [2, 3]), (8, 4, 3, [1, 1, 1])):
        ran.clear()
        args.steps, args.rounds = steps, rounds
        train_speed.time_models(args, models, batches[: 2 + timed], 0, "fp32", False, "g",
                                lambda m: [], [])  # fmt: skip
        assert ran == [(name, n) for n in sizes for name in ("ours", "marian")]


def test_train_speed_table_header_says_what_was_run(monkeypatch, tmp_path):
    """The header names the command as given to main, the steps, warm-up and rounds, the
    precision the CPU runs (fp32, whatever --precision says) and the peak MFU divides by."""
    train_speed = load_bench("train_speed")
    batches = [pairs_batch([3, 2], [2, 2])] * 9
    monkeypatch.setattr(train_speed, "load_checked", lambda *a: ([], FakeTokenizer()))
    monkeypatch.setattr(train_speed, "load_batches", lambda *a: (batches, FakeTokenizer()))
    monkeypatch.setattr(train_speed, "apply_malloc", lambda *a: False)
    given = {}

    def time_models(args, models, batches, pad, precision, *rest):
        given.update(precision=precision, batches=len(batches))
        return []

    monkeypatch.setattr(train_speed, "time_models", time_models)
    out = tmp_path / "table.md"
    argv = ["--device", "cpu", "--configs", "multi30k-default", "--max-tokens", "4096",
            "--steps", "7", "--warmup", "2", "--rounds", "3", "--precision", "bf16",
            "--out", str(out)]  # fmt: skip
    train_speed.main(argv)
    text = out.read_text()
    assert given == {"precision": "fp32", "batches": 9}
    assert f"- command: `python bench/train_speed.py {' '.join(argv)}`" in text
    assert f"; torch {torch.__version__}; precision fp32; " in text
    assert "; 7 timed steps each, after 2 warm-up steps plus one untimed pass" in text
    assert "timed in 3 rounds that alternate between the models (each model 2-3 steps" in text
    assert "- MFU: no peak figure for this device" in text
    batches[6:] = []  # an epoch of 6 batches: 4 timed steps, in rounds of 1-2
    train_speed.main(argv)
    note = ("- multi30k-default at 4096 tokens: epoch 0 has 6 batches, so 4 timed steps, not 7 "
            "(1-2 per round, in 3 rounds)")  # fmt: skip
    assert note in out.read_text().splitlines()
    args = train_speed.parse_args(train_speed.make_parser(), argv)
    lines = train_speed.header(args, argv, "NVIDIA H100 PCIe", "bf16", False, False, 756e12)
    assert "- MFU peak: 756 TFLOP/s dense bf16 (datasheet)" in lines


def test_step_flops_reports_the_timed_batches_flops_and_the_step_an_mfu_needs(
    monkeypatch, tmp_path
):
    """step_flops.md: per timed step (the warm-up batches left out) the sentences, the source
    tokens per padded row and per sentence, the TFLOP of the padded shapes and of the pairs at
    their own lengths, and the longest step reaching --mfu at the H100 SXM's 989 TFLOP/s, on
    each count. (A vocabulary of 10^9 makes the FLOPs large enough to read in the table.)"""
    step_flops, train_speed = load_bench("step_flops"), load_bench("train_speed")

    class HugeVocabulary(FakeTokenizer):
        def __len__(self):
            return 10**9

    warm_up = pairs_batch([9] * 4, [9] * 4)
    lengths = [([6, 3, 2], [5, 4, 1]), ([200, 150, 40], [120, 180, 60])]  # source, target y + EOS
    timed = [pairs_batch(*b) for b in lengths]

    def batches(ap, max_tokens, n, join):
        return [warm_up, *timed][:n], HugeVocabulary()

    monkeypatch.setattr(step_flops, "load_checked", batches)
    out = tmp_path / "step_flops.md"
    step_flops.main(["--configs", "multi30k-default", "--max-tokens", "4096", "--warmup", "1",
                     "--steps", "2", "--mfu", "0.5", "--out", str(out)])  # fmt: skip
    cfg, V = train_speed.CONFIGS["multi30k-default"], 10**9

    def per_step(shapes) -> dict:  # (B, S, T) -> FLOPs by part, averaged over the 2 steps
        parts = [train_speed.flops_by_part(cfg, *shape, V) for shape in shapes]
        return {k: sum(p[k] for p in parts) / 2 for k in ("linear", "attention")}

    real = per_step([(1, s, t) for src, tgt in lengths for s, t in zip(src, tgt)])
    padded = per_step([(3, 6, 5), (3, 200, 180)])
    ms = [1e3 * sum(f.values()) / (0.5 * 989e12) for f in (real, padded)]
    assert ms[1] > ms[0] + 1 and padded["attention"] > real["attention"] + 1e8  # apart
    cells = ["multi30k-default", "4096", "2", "3", f"{(6 + 200) / 2:.1f}",
             f"{(11 / 3 + 390 / 3) / 2:.1f}", f"{padded['linear'] / 1e12:.3f}",
             f"{padded['attention'] / 1e12:.4f}", f"{real['linear'] / 1e12:.3f}",
             f"{real['attention'] / 1e12:.4f}", f"{ms[0]:.1f}", f"{ms[1]:.1f}"]  # fmt: skip
    text = out.read_text()
    assert "| " + " | ".join(cells) + " |" in text.splitlines(), text
    assert "the longest step that reaches it at 989 TFLOP/s" in text


def test_profile_step_rates_the_profiled_steps_flops_and_counts_every_launch(monkeypatch):
    """On a GPU (faked: the profiler's events are given): the TFLOP/s of the matrix products
    and of attention count the FLOPs of the profiled batches (not the warm-up's) per step, the
    target tokens per step are the profiled batches', and the launches per step count the
    cuBLASLt ones (cuLaunchKernelEx) too."""
    profile = load_bench("profile_step")
    train_speed = load_bench("train_speed")
    model = SimpleNamespace()
    monkeypatch.setattr(profile, "build_model", lambda *a: SimpleNamespace(to=lambda d: model))
    monkeypatch.setattr(profile, "make_step", lambda *a: lambda b: None)
    monkeypatch.setattr(profile, "on_device", lambda b, *a: b)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    warm_up = [pairs_batch([30] * 8, [30] * 8), pairs_batch([20] * 8, [25] * 8)]
    profiled = [pairs_batch([6, 3, 2], [5, 4, 2]), pairs_batch([9, 8], [2, 7])]
    cfg, n = train_speed.CONFIGS["multi30k-default"], 2
    flops = [train_speed.flops_by_part(cfg, *shape, 100) for shape in [(3, 6, 5), (2, 9, 7)]]
    per_step = {k: sum(f[k] for f in flops) / n for k in ("linear", "attention")}

    def event(key, device, count, us):
        return SimpleNamespace(key=key, count=count, device_type=SimpleNamespace(name=device),
                               self_cpu_time_total=us, self_device_time_total=us)  # fmt: skip

    # kernel times at which the products run at 100 TFLOP/s and attention at 40
    events = [event("nvjet_sm90_tst", "CUDA", 6, per_step["linear"] * n * 1e6 / 100e12),
              event("fmha_cutlassF", "CUDA", 4, per_step["attention"] * n * 1e6 / 40e12),
              event("aten::mm", "CPU", 6, 10.0), event("cudaLaunchKernel", "CPU", 10, 5.0),
              event("cuLaunchKernel", "CPU", 2, 1.0), event("cudaLaunchKernelExC", "CPU", 2, 1.0),
              event("cuLaunchKernelEx", "CPU", 6, 3.0)]  # fmt: skip

    class Profiled:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return events

    monkeypatch.setattr(profile, "profile", Profiled)
    args = SimpleNamespace(device=torch.device("cuda"), config="multi30k-default", steps=n,
                           fused_loss="false", compile=False, compile_mode="default",
                           top=3)  # fmt: skip
    lines = profile.profile_model("ours", args, warm_up + profiled, FakeTokenizer())
    rate = {c[0]: c[-1] for c in ([x.strip() for x in line.strip("|").split("|")]
                                  for line in lines if line.startswith("| "))}  # fmt: skip
    assert rate["matrix products"] == "100" and rate["attention"] == "40"
    tokens = " ms for 10 target tokens (profiled; the profiler adds host overhead)"
    assert any(line.endswith(tokens) for line in lines)  # (5 + 4 + 2 + 2 + 7) / 2 steps
    assert "- kernel launches per step: 10" in lines


def test_decode_speed_times_without_its_warm_up_and_counts_each_output_token_and_eos(monkeypatch):
    decode = load_bench("decode_speed")
    clock = [0.0]
    monkeypatch.setattr(decode, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def fn(src, mask):  # a second per call, the 4-sentence warm-up included
        clock[0] += 1.0
        return [int(x) for x in src[:, 0]]

    src = [torch.tensor([[20], [0]]), torch.tensor([[10]])]
    batches = [([2, 0], src[0], src[0] > 0), ([1], src[1], src[1] > 0)]
    assert decode.timed(fn, batches, torch.device("cpu")) == (2.0, [0, 10, 20])
    assert decode.rate(2.0, [([5, 6, 7], None), ([8], None)]) == (1.0, 3.0)  # EOS counted


def test_decode_speed_ratios_are_ours_over_theirs_and_the_bars_need_every_hypothesis(
    monkeypatch, tmp_path
):
    """The cached speed-up is the uncached time over the cached one; ours / Marian, ours
    sentences/s over Marian's; this tree / a baseline commit, the baseline's time over this
    tree's; the cached beam bar is met only with 3x and every hypothesis the same."""
    from omegaconf import OmegaConf

    decode = load_bench("decode_speed")
    tok = SimpleNamespace(pad_id=0, bos_id=1, eos_id=2)
    opts = OmegaConf.create({"beam_size": 5, "min_len": 0, "max_len_a": 1.2, "max_len_b": 10,
                             "length_penalty": 0.6, "max_tokens": 4096})  # fmt: skip
    searches = {"greedy": opts, "beam 5": opts}
    hyps = [([5, 6], -1.0), ([7], -2.0)]
    other = [([5, 6], -1.0), ([8], -2.5)]
    times = iter([(1.0, hyps), (4.0, hyps), (2.0, hyps), (5.0, other)])  # cached, uncached
    monkeypatch.setattr(decode, "timed", lambda *a: next(times))
    rows, found = decode.cache_rows("transformer", None, tok, [], searches, None)
    assert found == {"greedy": dict(speedup=4.0, same=2, n=2),
                     "beam 5": dict(speedup=2.5, same=1, n=2)}  # fmt: skip
    assert "| 4.00x | 2/2 (max score diff 0.0e+00) |" in rows[0]
    # ours forced to L = 3 tokens, Marian to L tokens then EOS; ours in 1 s, Marian in 3 s
    hf = SimpleNamespace(eval=lambda: hf)
    monkeypatch.setattr(decode, "marian", lambda *a: SimpleNamespace(to=lambda d: hf))
    times = iter([(1.0, [([5, 6, 7], -1.0)] * 6), (3.0, [([5, 6, 7, 2], None)] * 6)] * 2)
    marian_rows, ratios = decode.marian_rows(None, {}, FakeTokenizer(), [], searches, 3, None)
    assert ratios == {"greedy": 3.0, "beam 5": 3.0}
    assert marian_rows[0] == "| greedy | 3 | 6.0 | 2.0 | 3.00x | yes |"
    # this tree (ROOT) in 2 s, the baseline in 6 s, over 4 sentences
    runs = {"old": {s: [6.0, [[5], [6], [7], [8]], 40] for s in searches},
            "new": {s: [2.0, [[5], [6], [7], [9]], 20] for s in searches}}  # fmt: skip
    monkeypatch.setattr(decode, "run_package",
                        lambda root, *a: runs["new" if root == decode.ROOT else "old"])  # fmt: skip
    monkeypatch.setattr(decode, "tempfile", SimpleNamespace(mkdtemp=lambda: str(tmp_path)))
    archive = SimpleNamespace(stdout=b"")  # git archive, and tar extracting it
    monkeypatch.setattr(decode, "subprocess", SimpleNamespace(run=lambda *a, **k: archive))
    before = decode.baseline_rows("HEAD~1", "transformer", "x.pt", [[3]] * 4, searches, 1)
    assert before[0] == "| transformer | greedy | 0.7 | 2.0 | 3.00x | 10 | 5 | 3/4 |"
    args = SimpleNamespace(models=["transformer"], given="", baseline=None)
    found = {"transformer": {"what": "w", "params": 1e6, "n": 10, "cache": {
        "beam 5": dict(speedup=4.0, same=9, n=10)}}, "marian": {"beam 5": 1.6}}  # fmt: skip
    text = decode.report(args, torch.device("cpu"), searches, found, ([], [], []), [], ("", ""))
    assert ("- transformer: cached beam 5 is 4.00x uncached (bar 3x) with 9/10 identical "
            "hypotheses: **not met**") in text  # fmt: skip
    assert "- Transformer beam 5 vs Marian: 1.60x (bar 1.5x): **met**" in text


def test_data_workers_ratio_is_each_worker_count_mean_over_the_first_ones():
    data_workers = load_bench("data_workers")
    args = SimpleNamespace(steps=300, rounds=3, workers=[0, 2])
    tok_s = {0: [100, 100, 130], 2: [150, 120, 120]}  # means 110 and 130 (medians 100, 120)
    lines = data_workers.report([], args, [], tok_s, "NVIDIA H200", "2.11")
    assert lines[-2:] == ["| 0 | 100, 100, 130 | 110 | 1.00x |",
                          "| 2 | 150, 120, 120 | 130 | 1.18x |"]  # fmt: skip


def test_packed_fill_counts_the_tokens_of_both_sides_and_pairs_per_row(monkeypatch, tmp_path):
    """real: the tokens of sources and targets over their positions; pairs per row: the
    padded batch's rows over the packed rows; open rows "all" (0): any row a pair fits in."""
    packed_fill = load_bench("packed_fill")
    batch = pairs_batch([10, 10, 5, 5], [10, 10, 5, 5])  # rows of 16: 3 with open rows 1, 2 any
    assert packed_fill.real_share([batch], 0) == (30 + 30) / (4 * 10 + 4 * 10)
    train = SimpleNamespace(src_lens=np.array([5, 2]), tgt_lens=np.array([4, 3]))
    monkeypatch.setattr(packed_fill, "load_checked", lambda *a: ([batch], FakeTokenizer()))
    monkeypatch.setattr(packed_fill, "training_pairs", lambda join: (train, None))
    out = tmp_path / "fill.md"
    packed_fill.main(["--max-tokens", "4096", "--widths", "16", "--open-rows", "1,0",
                      "--batches", "1", "--repeats", "1", "--out", str(out)])  # fmt: skip
    rows = {c[2]: c[3:6] for c in ([x.strip() for x in line.strip("|").split("|")]
            for line in out.read_text().splitlines() if line.startswith("| 4096 |"))}  # fmt: skip
    assert "weighs): 5.0 slots" in out.read_text()  # the longer side of (5, 4), (2, 3), + 1
    assert rows["-"] == ["4", "1", "75.0%"]
    for open_rows, n in (("1", 3), ("all", 2)):
        assert rows[open_rows] == [str(n), f"{4 / n:.1f}", f"{100 * 60 / (n * 32):.1f}%"]


def test_attention_claims_counts_the_flops_torch_counts_and_keeps_the_fastest_and_the_peak(
    monkeypatch,
):
    """Claim (2)'s analytic FLOPs against torch's count of MultiHeadAttention's forward (math
    kernel: softmax, which torch does not count, apart); the time, the fastest call after the
    warm-up; the peak memory, the most held during the call (CPU profiler), or (CUDA) the
    allocator's peak above what was held before."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from transformer import attention as A

    claims = load_bench("attention_claims")
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as c:
        A.MultiHeadAttention(32, 4).eval()(torch.randn(2, 12, 32))
    flops = claims.mha_flops(2, 12, 32, 4)
    assert flops["proj"] + flops["scores"] == c.get_total_flops()
    assert flops["total"] == c.get_total_flops() + flops["softmax"]
    clock, durations = [0.0], iter([9.0, 5.0, 1.0, 3.0])  # the warm-up, then 3 calls
    monkeypatch.setattr(claims, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def call():
        clock[0] += next(durations)

    assert claims.best_time(call, 3) == 1.0

    def temporary():  # 4 MiB held for a while, 64 bytes returned
        x = torch.empty(2**20)
        del x
        return torch.empty(16)

    assert 2**22 <= claims.peak_bytes(temporary) < 2**22 + 4096
    memory = FakeAllocator()
    memory.install(monkeypatch)
    monkeypatch.setattr(claims, "DEVICE", torch.device("cuda"))
    memory.take(1000)  # the inputs, held before the call

    def on_gpu():
        memory.take(300)
        memory.now -= 300
        memory.take(20)

    assert claims.peak_bytes(on_gpu) == 300


def test_attention_kernels_times_after_two_untimed_passes_and_sums_each_kinds_layers(
    monkeypatch, tmp_path
):
    """A pass is timed after two untimed ones, the median; per step, each kind's call times
    its layers (encoder self-attention: the encoder's; the other two: the decoder's)."""
    bench = load_bench("attention_kernels")
    clock, durations = [0.0], iter([100.0, 100.0, 1.0, 2.0, 3.0])
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    q = torch.zeros(1, requires_grad=True)

    def one_pass(call, method, dropout):
        clock[0] += next(durations)
        return q * 1, torch.ones(1)

    monkeypatch.setattr(bench, "run", one_pass)
    call = SimpleNamespace(q=q, k=q, v=q)
    assert bench.time_call(call, "math", 0.0, 3, torch.device("cpu")) == 2.0
    monkeypatch.undo()  # the real clock and passes
    batches = [pairs_batch([6, 3, 2], [5, 4, 1])]
    monkeypatch.setattr(bench, "load_checked", lambda *a: (batches, FakeTokenizer()))
    ms = {"encoder self": 1.0, "decoder self": 2.0, "cross": 4.0}  # ms of a call, by kind
    monkeypatch.setattr(bench, "mean_ms",
                        lambda calls, method, p, *a: ms[calls[0].lengths[4]] * (1 + p))  # fmt: skip
    out = tmp_path / "kernels.md"
    bench.main(["--device", "cpu", "--config", "multi30k-default", "--methods", "math",
                "--batches", "1", "--out", str(out)])  # fmt: skip
    text = out.read_text()
    assert "| math | 21.00 | 23.10 |" in text.splitlines()  # 3 layers x (1 + 2 + 4) ms
    assert "61% of the source positions are real tokens" in text  # 11 of 3 x 6


def test_host_overhead_counts_computing_operators_and_gives_marian_over_each_model(
    monkeypatch, tmp_path
):
    """ops/step counts the operators that compute (not views, not bare allocations); the
    table's Marian / this columns are Marian's count and time over the row's model's."""
    from collections import Counter

    host = load_bench("host_overhead")
    x = torch.ones(4)
    with host.Dispatched() as seen:
        (x.view(2, 2).t() + 1).detach()
    assert seen.ops == Counter({"add": 1})
    counts = {"ours": Counter(mm=50, _to_copy=10), "ours/bf16-weights": Counter(mm=40),
              "marian": Counter(mm=100, _to_copy=20)}  # fmt: skip
    gpu_like = {"ours": Counter(mm=30), "ours/bf16-weights": Counter(mm=20),
                "marian": Counter(mm=90)}  # fmt: skip

    def count_ops(cfg, vocab, dropout=None):  # with a dropout: the GPU-like count
        return gpu_like if dropout else counts

    monkeypatch.setattr(host, "count_ops", count_ops)
    ms = {"ours": 2.0, "ours/bf16-weights": 1.0, "marian": 4.0}
    monkeypatch.setattr(host, "time_steps", lambda *a: ms)
    monkeypatch.setattr(host.dropout, "RAND_MASK_ON_CPU", host.dropout.RAND_MASK_ON_CPU)
    out = tmp_path / "host.md"
    host.main(["--configs", "multi30k-default", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| multi30k")]
    assert rows == [
        "| multi30k-default | ours | 60 | 10 | 2.00 | 2.00x | 2.00x | 30 | 3.00x |",
        "| multi30k-default | ours/bf16-weights | 40 | 0 | 1.00 | 3.00x | 4.00x | 20 | 4.50x |",
        "| multi30k-default | marian | 120 | 20 | 4.00 | 1.00x | 1.00x | 90 | 1.00x |",
    ]


def test_update_time_and_dropout_masks_leave_their_untimed_first_calls_out(monkeypatch, tmp_path):
    """Each way's first call (the optimizers make their state; a first use) is run untimed."""
    clock = [0.0]
    fake_time = SimpleNamespace(perf_counter=lambda: clock[0])
    masks = load_bench("dropout_masks")
    monkeypatch.setattr(masks, "time", fake_time)
    durations = iter([100.0, 1.0, 2.0])

    def fn():
        clock[0] += next(durations)

    assert masks.median_ms(fn, 2) == 1500.0
    update = load_bench("update_time")
    monkeypatch.setattr(update, "time", fake_time)
    calls = []

    def ways(model, mixed):  # each way's calls: 100 s the first time, then 1, 2 and 6 s
        def call(name):
            clock[0] += [100.0, 1.0, 2.0, 6.0][calls.count(name)]
            calls.append(name)

        return {name: (lambda: None, lambda n=name: call(n)) for name in ("a", "b")}

    monkeypatch.setattr(update, "ways", ways)
    out = tmp_path / "update.md"
    update.main(["--configs", "multi30k-default", "--rounds", "3", "--calls", "1",
                 "--out", str(out)])  # fmt: skip
    assert calls == ["a", "b"] * 4  # alternating, the first round untimed
    assert out.read_text().splitlines()[-2:] == ["| multi30k-default | a | 2000.000 |",
                                                 "| multi30k-default | b | 2000.000 |"]  # fmt: skip
