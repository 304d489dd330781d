"""Benchmark of ``convert_stablesr_checkpoint`` on full-size official-layout checkpoints (random values).

Builds a ``stablesr_000117``-like checkpoint (every key and shape of the official 512 model, 1616 keys, 1.41 B
parameters including the 354 M OpenCLIP text tower; float16 by default, 2.8 GB) and a ``vqgan_cfw_00011``-like one
(404 keys) in a temporary folder, converts them, with and without saving, and loads the saved folder back with
``StableSRPipeline.from_pretrained``.

Every phase runs in its own fresh Python process; its peak RSS is the kernel's ``ru_maxrss`` for that process
(``os.wait4``, the same number ``/usr/bin/time -v`` prints), and a sampler thread in the child also records the peak
of anonymous memory (``RssAnon``) and of file-backed pages (``RssFile``: the memory-mapped checkpoint, reclaimable).

Key lists: ``../shared/reference/official-keys`` (``--keys-dir``). Nothing is written into the repository; the work
folder (default: a new temporary folder) is deleted at the end unless ``--keep``.

    python scripts/bench_convert.py                    # float16 checkpoint, text tower included
    python scripts/bench_convert.py --float32          # float32 checkpoint (5.6 GB)
    python scripts/bench_convert.py --no-text          # checkpoint without cond_stage_model.* (stored embedding given)
    python scripts/bench_convert.py --profile          # cProfile of the conversion (top functions)
"""

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_KEYS_DIR = REPO_ROOT.parent / "shared" / "reference" / "official-keys"
TEXT_PREFIX = "cond_stage_model.model."
CKPT_NAME, CFW_NAME = "stablesr_000117.ckpt", "vqgan_cfw_00011.ckpt"


# ------------------------------------------------------------------------------------------------------- helpers
def read_key_table(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """key -> (shape, numel) from an official-keys TSV (columns key, shape, dtype, numel, kind)."""
    table = {}
    for line in Path(path).read_text().splitlines()[1:]:
        key, shape, _dtype, numel, _kind = line.split("\t")
        table[key] = (tuple(json.loads(shape)), int(numel))
    return table


def expected_param_counts(keys_dir: Path, with_text: bool) -> dict[str, int]:
    """Official parameter counts per pipeline component (param_counts.json), in diffusers component names."""
    counts = json.loads((keys_dir / "param_counts.json").read_text())
    sr, cfw = counts["stablesr_512"], counts["vqgan_cfw"]
    spade = sr["  of which spade layers"]
    expected = {
        "unet": sr["model.diffusion_model (UNetModelDualcondV2)"] - spade,
        "sft_adapter": spade,
        "time_aware_encoder": sr["structcond_stage_model (EncoderUNetModelWT)"],
        "vae": sr["first_stage_model (AutoencoderKL)"],
        "cfw_adapter": cfw["  of which decoder.fusion_layer_* (CFW)"],
    }
    if with_text:
        # The official conditioning is the penultimate layer: the last resblock, text_projection and logit_scale are
        # never run and are not converted.
        table = read_key_table(keys_dir / "stablesr_512.tsv")
        last = max(
            int(m.group(1))
            for k in table
            if (m := re.match(re.escape(TEXT_PREFIX) + r"transformer\.resblocks\.(\d+)\.", k))
        )
        unused = sum(
            numel
            for k, (_, numel) in table.items()
            if k.startswith(TEXT_PREFIX + f"transformer.resblocks.{last}.")
            or k in (TEXT_PREFIX + "text_projection", TEXT_PREFIX + "logit_scale")
        )
        expected["text_encoder"] = sr["cond_stage_model (FrozenOpenCLIPEmbedder, ViT-H-14 text tower)"] - unused
    return expected


def param_counts(pipe) -> dict[str, int]:
    out = {}
    for name in ("unet", "sft_adapter", "time_aware_encoder", "vae", "cfw_adapter", "text_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            out[name] = sum(p.numel() for p in module.parameters())
    return out


class MemorySampler:
    """Peak RssAnon / RssFile of this process, sampled every 20 ms (VmHWM gives the peak of their sum)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_anon, self.peak_file = interval, 0, 0
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def status() -> dict[str, int]:
        text = Path("/proc/self/status").read_text()
        return {k: int(v) * 1024 for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}

    def _run(self):
        while True:
            s = self.status()
            self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
            self.peak_file = max(self.peak_file, s.get("RssFile", 0))
            time.sleep(self.interval)

    def result(self) -> dict[str, float]:
        s = self.status()
        return {
            "vm_hwm_gb": s["VmHWM"] / 1e9,
            "peak_anon_gb": self.peak_anon / 1e9,
            "peak_file_gb": self.peak_file / 1e9,
        }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------------ child phases
def phase_build(args) -> dict:
    import torch

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from official_layout import random_state_dict  # the same generator as the tests (randn * 0.02, cast)
    from official_layout import read_key_table as read_table

    dtype = torch.float32 if args.float32 else torch.float16
    work = Path(args.workdir)
    result = {}
    cpu0, start = cpu_seconds(), time.perf_counter()
    table = read_table(Path(args.keys_dir) / "stablesr_512.tsv")
    if args.no_text:
        table = {k: v for k, v in table.items() if not k.startswith("cond_stage_model.")}
    sd = random_state_dict(table, dtype, seed=args.seed)
    # The 12 schedule buffers are float32 in the official files whatever the weights' dtype.
    for key, (_shape, dtype_name) in table.items():
        if dtype_name == "float32" and "." not in key:
            sd[key] = sd[key].float()
    result["generate_s"] = time.perf_counter() - start
    t = time.perf_counter()
    torch.save({"state_dict": sd, "global_step": 0, "epoch": 117}, work / CKPT_NAME)
    result["save_ckpt_s"] = time.perf_counter() - t
    result["ckpt_keys"], result["ckpt_params"] = len(sd), sum(v.numel() for v in sd.values())
    del sd
    cfw = random_state_dict(read_table(Path(args.keys_dir) / "vqgan_cfw.tsv"), dtype, seed=args.seed + 1)
    torch.save({"state_dict": cfw, "global_step": 0, "epoch": 11}, work / CFW_NAME)
    result["cfw_keys"], result["cfw_params"] = len(cfw), sum(v.numel() for v in cfw.values())
    result["ckpt_bytes"], result["cfw_bytes"] = (work / CKPT_NAME).stat().st_size, (work / CFW_NAME).stat().st_size
    result["seconds"], result["cpu_s"] = time.perf_counter() - start, cpu_seconds() - cpu0
    return result


def phase_convert(args) -> dict:
    sampler = MemorySampler()
    import torch

    from stablesr.conversion import convert_stablesr_checkpoint

    work = Path(args.workdir)
    out = work / "converted" if args.save else None
    kwargs = {}
    if args.no_text:
        kwargs["prompt_embeds"] = torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(0))
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu0, start = cpu_seconds(), time.perf_counter()
    pipe, report = convert_stablesr_checkpoint(work / CKPT_NAME, work / CFW_NAME, out, overwrite=True, **kwargs)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        buf = io.StringIO()
        stats = pstats.Stats(profiler, stream=buf)
        stats.sort_stats("tottime").print_stats(15)
        stats.sort_stats("cumulative").print_stats(r"stablesr|single_file_utils|modeling_clip", 25)
        print(buf.getvalue())

    # Independent key accounting: every source key is either under a converted part or skipped on purpose.
    from stablesr.checkpoint_io import load_checkpoint

    sd, _ = load_checkpoint(work / CKPT_NAME)
    cfw_sd, _ = load_checkpoint(work / CFW_NAME)
    skipped = {k for keys in report.skipped.values() for k in keys}
    parts = {
        "unet": lambda k: k.startswith("model.diffusion_model.") and ".spade." not in k,
        "sft_adapter": lambda k: k.startswith("model.diffusion_model.") and ".spade." in k,
        "time_aware_encoder": lambda k: k.startswith("structcond_stage_model."),
        "text_encoder": lambda k: k.startswith(TEXT_PREFIX),
    }
    source_keys = {name: 0 for name in parts}
    leftover = []
    for key in sd:
        if key in skipped:
            continue
        name = next((n for n, f in parts.items() if f(key)), None)
        if name is None:
            leftover.append(key)
        else:
            source_keys[name] += 1
    source_keys["vae (CFW file)"] = sum(1 for k in cfw_sd if not k.startswith(("decoder.fusion_layer", "loss.")))
    source_keys["cfw_adapter"] = sum(1 for k in cfw_sd if k.startswith("decoder.fusion_layer"))
    cfw_leftover = [k for k in cfw_sd if k.startswith("loss.") and k not in skipped]
    result = {
        "seconds": seconds,
        "cpu_s": cpu,
        "report_seconds": report.seconds,
        "converted": report.converted,
        "source_keys": source_keys,
        "skipped": {reason: len(keys) for reason, keys in report.skipped.items()},
        "leftover": leftover + cfw_leftover,
        "total_keys": len(sd) + len(cfw_sd),
        "param_counts": param_counts(pipe),
        "dtypes": sorted({str(p.dtype) for p in pipe.unet.parameters()}),
    }
    if out is not None:
        result["output_bytes"] = dir_size(out)
        result["output_parts"] = {p.name: dir_size(p) for p in sorted(out.iterdir()) if p.is_dir()}
    result.update(sampler.result())
    return result


def phase_load(args) -> dict:
    sampler = MemorySampler()
    from stablesr.pipelines.pipeline_stablesr import StableSRPipeline

    folder = Path(args.workdir) / "converted"
    result = {}
    cpu0, start = cpu_seconds(), time.perf_counter()
    try:
        pipe = StableSRPipeline.from_pretrained(folder)
    except ValueError as err:
        # A fresh process that imported only the pipeline module may not have imported stablesr.schedulers, which
        # model_index.json names for the scheduler; diffusers refuses to import it by itself.
        if "stablesr.schedulers" not in str(err):
            raise
        result["fresh_process_error"] = str(err).split(". ")[0]
        print(
            f"from_pretrained in a fresh process failed ({result['fresh_process_error']}); retrying after "
            "`import stablesr.schedulers`",
            flush=True,
        )
        import stablesr.schedulers  # noqa: F401

        cpu0, start = cpu_seconds(), time.perf_counter()
        pipe = StableSRPipeline.from_pretrained(folder)
    result.update(seconds=time.perf_counter() - start, cpu_s=cpu_seconds() - cpu0, param_counts=param_counts(pipe))
    result["components"] = sorted(k for k, v in pipe.components.items() if v is not None)
    result.update(sampler.result())
    return result


PHASES = {"build": phase_build, "convert": phase_convert, "load": phase_load}


# ---------------------------------------------------------------------------------------------------- the parent
def run_phase(name: str, args, *extra: str) -> dict:
    """Run one phase in a fresh interpreter; return its JSON result plus the kernel's rusage of that process."""
    result_file = Path(args.workdir) / f".result-{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        name,
        "--workdir",
        str(args.workdir),
        "--keys-dir",
        str(args.keys_dir),
        "--seed",
        str(args.seed),
        "--result",
        str(result_file),
        *extra,
    ]
    cmd += ["--float32"] * args.float32 + ["--no-text"] * args.no_text
    print(f"\n=== {name} {' '.join(extra)}", flush=True)
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed with exit code {proc.returncode}")
    result = json.loads(result_file.read_text())
    result["maxrss_gb"] = usage.ru_maxrss * 1024 / 1e9
    result["cpu_user_s"], result["cpu_sys_s"] = usage.ru_utime, usage.ru_stime
    return result


def gb(n: float) -> str:
    return f"{n:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="folder for the checkpoints and output (default: a new temporary folder)"
    )
    parser.add_argument(
        "--keys-dir", type=Path, default=DEFAULT_KEYS_DIR, help="official-keys folder (TSV, param_counts.json)"
    )
    parser.add_argument(
        "--float32", action="store_true", help="write the checkpoints in float32 (5.6 GB) instead of float16"
    )
    parser.add_argument(
        "--no-text", action="store_true", help="leave the OpenCLIP text tower (cond_stage_model.*) out"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run a cProfiled conversion (not timed) and print the top functions",
    )
    parser.add_argument("--skip-build", action="store_true", help="reuse the checkpoints already in --workdir")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:  # child process
        result = PHASES[args.phase](args)
        args.result.write_text(json.dumps(result, indent=1))
        return 0

    if not (args.keys_dir / "stablesr_512.tsv").is_file():
        raise SystemExit(f"official key lists not found in {args.keys_dir} (pass --keys-dir)")
    created = args.workdir is None
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="stablesr-bench-convert-", ))
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {args.workdir}")
    try:
        build = None
        if not args.skip_build:
            build = run_phase("build", args)
        if args.profile:  # a separate run: the profiler's overhead stays out of the timings below
            run_phase("convert", args, "--profile")
        plain = run_phase("convert", args)
        saved = run_phase("convert", args, "--save")
        loaded = run_phase("load", args)
    finally:
        if not args.keep:
            if created:
                shutil.rmtree(args.workdir, ignore_errors=True)
            else:
                for name in (CKPT_NAME, CFW_NAME, "converted"):
                    path = args.workdir / name
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                for f in args.workdir.glob(".result-*.json"):
                    f.unlink()

    expected = expected_param_counts(args.keys_dir, with_text=not args.no_text)
    problems = []
    print("\n=== results")
    if build:
        print(
            f"checkpoints: {build['ckpt_keys']} keys / {build['ckpt_params']:,} params ({gb(build['ckpt_bytes'] / 1e9)} GB) + "
            f"CFW {build['cfw_keys']} keys / {build['cfw_params']:,} params ({gb(build['cfw_bytes'] / 1e9)} GB); "
            f"built in {build['seconds']:.1f} s (generate {build['generate_s']:.1f} s, torch.save {build['save_ckpt_s']:.1f} s)"
        )
    print("converted tensors per part: " + ", ".join(f"{k} {v}" for k, v in plain["converted"].items()))
    print("source keys per part:       " + ", ".join(f"{k} {v}" for k, v in plain["source_keys"].items()))
    for reason, n in plain["skipped"].items():
        print(f"skipped ({reason}): {n}")
    accounted = sum(plain["source_keys"].values()) + sum(plain["skipped"].values())
    print(f"leftover keys: {len(plain['leftover'])} (accounted {accounted} of {plain['total_keys']} input keys)")
    if plain["leftover"] or accounted != plain["total_keys"]:
        problems.append(f"leftover keys: {plain['leftover'][:10]}")
    print(
        f"output folder: {gb(saved['output_bytes'] / 1e9)} GB: "
        + ", ".join(f"{k} {gb(v / 1e9)}" for k, v in saved["output_parts"].items())
    )
    print("\ncomponent            expected     converted       loaded")
    for name, want in expected.items():
        got, back = plain["param_counts"].get(name), loaded["param_counts"].get(name)
        flag = "" if got == want == back else "   MISMATCH"
        if flag:
            problems.append(f"{name}: expected {want}, converted {got}, loaded {back}")
        print(f"{name:18s} {want:>12,} {got or 0:>13,} {back or 0:>12,}{flag}")
    print(f"loaded components: {', '.join(loaded['components'])}")
    if "fresh_process_error" in loaded:
        problems.append(
            "StableSRPipeline.from_pretrained fails in a fresh process until stablesr.schedulers is "
            f"imported: {loaded['fresh_process_error']}"
        )

    print("\nphase                      wall s   cpu s (in phase / whole process)   peak RSS GB (anon / file-backed)")
    rows = [("build checkpoints", build)] if build else []
    rows += [("convert (no save)", plain), ("convert + save_pretrained", saved), ("from_pretrained", loaded)]
    for label, r in rows:
        split = f"({gb(r['peak_anon_gb'])} / {gb(r['peak_file_gb'])})" if "peak_anon_gb" in r else ""
        cpu = f"{r['cpu_s']:6.1f} / {r['cpu_user_s'] + r['cpu_sys_s']:6.1f}"
        print(f"{label:25s} {r['seconds']:7.1f}   {cpu:>33s}   {gb(r['maxrss_gb']):>11} {split}")
    print("(whole-process cpu includes ~10 s of imports; file-backed = pages of the memory-mapped files, reclaimable)")
    print(
        f"saving adds {saved['seconds'] - plain['seconds']:.1f} s; checkpoint dtype "
        f"{'float32' if args.float32 else 'float16'}, output dtype {', '.join(plain['dtypes'])}"
    )
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
