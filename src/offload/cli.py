"""The ``offload`` command: list devices, run a model on .npy files, benchmark, demo.

    offload devices
    offload run model.onnx --input x.npy --device cpu --output y.npy
    offload bench jet_mlp --device cpu --batch 1,1024 --profile
    offload warmup resnet50 --device opencl:0
    offload demo [--full]
    offload repo OUT jet_mlp --device cpu | offload serve jet_mlp | offload server-env
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

# Errors that end a command with one line on stderr and exit status 2 (no traceback).
EXIT_ERROR = 2

class CommandError(Exception):
    """A usage problem found after parsing (bad batch list, output count...)."""


def _err(message: str) -> None:
    print(f"offload: error: {message}", file=sys.stderr)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)) and e.filename:
        text = f"{e.filename}: {e.strerror or text}"
    return text[:2000] or type(e).__name__


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


MAX_BATCH = 2**31 - 1  # rows (as offload.batching.MAX_BATCH)
MAX_CLIENTS = 1024  # --clients: threads started at once
MAX_SECONDS = 3600.0  # --min-time


def _int_list(text: str, what: str, limit: int) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what} like 1,32; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be positive integers; got {text!r}")
    if any(v > limit for v in values):
        raise argparse.ArgumentTypeError(f"{what} must be at most {limit}; got {text!r}")
    return values


def _batches(text: str) -> list[int]:
    return _int_list(text, "batch sizes", MAX_BATCH)


def _clients(text: str) -> list[int]:
    return _int_list(text, "client counts", MAX_CLIENTS)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    value = _positive_float(text)
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_SECONDS:g} seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _device_list(values: list[str] | None, precision=None) -> list[str]:
    """--device may repeat and take commas; 'cpu' and 'cpu:0' are one device. Every device is
    opened and checked against ``precision`` here, before any work: an unknown or unavailable
    one raises DeviceUnavailableError naming the spec as given."""
    import offload
    specs = []
    for value in values or ["cpu"]:
        for part in value.split(","):
            if part.strip():
                dev = offload.device(part.strip())
                _check_precision(dev, precision)
                if dev.spec not in specs:
                    specs.append(dev.spec)
    return specs


def _check_precision(dev, precision) -> None:
    from .fpga import fixed_point
    runs = dev.capabilities.precisions
    family = fixed_point.FAMILY if precision and fixed_point.is_fixed_precision(precision) \
        else (precision or "float32")
    if family not in runs:
        hint = " (pass --precision, e.g. 'ap_fixed<16,6>')" if precision is None and \
            fixed_point.FAMILY in runs else ""
        raise CommandError(f"device {dev.spec} does not run precision {precision or 'float32'!r}"
                           f"; it runs {', '.join(sorted(runs))}{hint}")


def _check_model(model: str) -> None:
    """A model argument that is neither a file nor a zoo name: one line, with close zoo names."""
    from . import bench, zoo
    if bench._is_zoo(model) or os.path.exists(model):
        return
    close = zoo.suggest(model)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise CommandError(f"{model}: no such model file or zoo model{hint} (zoo models: "
                       f"{', '.join(zoo.NAMES)})")


# -- commands ------------------------------------------------------------------------------------
def cmd_devices(args) -> int:
    import offload
    infos = offload.devices(refresh=True)
    width = max([len(i.spec) for i in infos] + [4])
    for info in infos:
        state = "available" if info.available else f"unavailable: {info.reason}"
        print(f"{info.spec:<{width}}  {info.name or '-'}  ({state})")
    from offload.device import unavailable
    missing = unavailable(args.require or ())
    if missing:
        print("required device(s) unavailable: " + "; ".join(missing), file=sys.stderr)
        return 1
    return 0


def _load_npy(path: str) -> np.ndarray:
    # Memory-mapped first: a header that declares more data than the file holds (or none at
    # all) is refused here, before anything the size of the declaration is allocated.
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except EOFError:
        raise CommandError(f"{path}: is empty or ends inside its .npy header") from None
    except ValueError as e:
        why = "the header declares more data than the file holds" if "mmap length" in str(e) \
            else str(e)
        raise CommandError(f"{path}: cannot read as a .npy array without pickle ({why})") \
            from None
    if isinstance(data, np.lib.npyio.NpzFile):
        names = list(data.files)
        data.close()
        raise CommandError(f"{path}: is an .npz archive ({names}); pass one .npy file per input")
    return np.array(data)


def _output_paths(outputs: list[str], count: int) -> list[str]:
    if len(outputs) == count:
        return outputs
    if len(outputs) == 1:
        root, ext = os.path.splitext(outputs[0])
        return [f"{root}_{k}{ext or '.npy'}" for k in range(count)]
    raise CommandError(f"the model has {count} outputs but --output was given {len(outputs)} "
                       "times; give it once (numbered files) or once per output")


def _preview(a: np.ndarray, n: int = 8) -> str:
    flat = a.reshape(-1)[:n]
    values = ", ".join(f"{v:.6g}" for v in flat.tolist())
    return f"[{values}{', ...' if a.size > n else ''}]"


def cmd_run(args) -> int:
    import offload
    _check_model(args.model)
    (device,) = _device_list([args.device], args.precision)
    if args.input:
        arrays = [_load_npy(p) for p in args.input]
    else:
        from . import bench, zoo
        if not bench._is_zoo(args.model):
            raise CommandError(f"{args.model}: give the model's input(s) with --input X.npy "
                               "(only zoo models have a sample input)")
        arrays = [zoo.sample_input(args.model, 1)]
        print(f"(no --input: the zoo's seeded sample input, {list(arrays[0].shape)})")
    model = offload.load(args.model, device=device, precision=args.precision)
    result = model(*arrays)
    results = list(result) if isinstance(result, tuple) else [result]
    names = model.outputs
    if args.output:
        for path, name, y in zip(_output_paths(args.output, len(results)), names, results):
            np.save(path, y, allow_pickle=False)
            print(f"{name}: {list(y.shape)} {y.dtype} -> {path}")
    else:
        for name, y in zip(names, results):
            print(f"{name}: {list(y.shape)} {y.dtype} {_preview(y)}")
    return 0


def _rate(value) -> str:
    from .bench import rate
    return rate(value)


ROW_COLUMNS = [
    ("model", "model"), ("batch", "batch"), ("device", "device"),
    ("median_ms", "offload median ms", ".3f"), ("p90_ms", "p90 ms", ".3f"),
    ("samples_per_s", "samples/s", _rate), ("ort_median_ms", "onnxruntime median ms", ".3f"),
    ("ratio", "offload/onnxruntime", ".2f"), ("max_abs_diff", "max abs diff", ".1e"),
]


def _jsonable(rows: list[dict]) -> list[dict]:
    def fix(v):
        if isinstance(v, float) and not np.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: fix(u) for k, u in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(u) for u in v]
        return v
    return [fix(r) for r in rows]


def _print_profiles(rows: list[dict]) -> None:
    from . import bench
    for row in rows:
        if row.get("profile"):
            print(f"\n### Profile: {row['model']} b{row['batch']} on {row['device']}\n")
            print(bench.format_profile(row["profile"]))


def cmd_bench_clients(args, devices) -> int:
    from . import bench
    results = []
    for device in devices:
        _progress(f"bench {bench.model_label(args.model)} on {device}: clients {args.clients}, "
                  f"requests of {args.batch[0]} row(s), ~{args.min_time:g} s per point")
        result = bench.clients_sweep(args.model, device, args.clients, rows=args.batch[0],
                                     duration_s=args.min_time, max_batch=args.max_batch,
                                     max_delay_us=args.max_delay_us, progress=_progress)
        results.append(result)
        print(f"\n{result['model']} on {device}: 1 caller with batches of {args.max_batch}: "
              f"{result['reference_samples_per_s']:,.0f} samples/s")
        print(bench.format_table(result["rows"], bench.CLIENT_COLUMNS))
        if args.plot:
            path = args.plot if len(devices) == 1 else f"{os.path.splitext(args.plot)[0]}-" \
                f"{device.replace(':', '')}.png"
            reason = bench.plot_clients(result, path)
            _progress(f"plot: {reason}" if reason else f"wrote {path}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(command=["offload"] + list(args.argv), machine=bench.machine_info(),
                           results=results), f, indent=1)
        _progress(f"wrote {args.json}")
    return 0


def cmd_bench(args) -> int:
    from . import bench
    _check_model(args.model)
    devices = _device_list(args.device, args.precision)
    if args.clients:
        return cmd_bench_clients(args, devices)
    if not bench._is_zoo(args.model):
        # Fail early, in one line, on inputs that cannot be generated (free non-batch axes).
        import offload
        inputs = offload.import_onnx(args.model).inputs
        for b in args.batch:
            bench.make_input(args.model, b, inputs)
    cases = [bench.Case(args.model, b) for b in args.batch]
    ort_reason = bench.onnxruntime_missing_reason() if args.onnxruntime else None
    if ort_reason:
        _progress(f"onnxruntime: skipped, {ort_reason}")
    _progress(f"bench {bench.model_label(args.model)}: batches {args.batch} on "
              f"{', '.join(devices)}; {args.repeats} repeats, ~{args.min_time:g} s per contender")
    rows = bench.run_suite(cases, devices, repeats=args.repeats, min_time_s=args.min_time,
                           warmup=args.warmup, onnxruntime=args.onnxruntime and not ort_reason,
                           threads=args.threads, profile_runs=args.profile_runs if args.profile
                           else 0, progress=_progress, precision=args.precision)
    print(bench.format_suite(rows, ROW_COLUMNS))
    if args.profile:
        _print_profiles(rows)
    if args.json:
        doc = dict(command=["offload"] + list(args.argv), machine=bench.machine_info(),
                   repeats=args.repeats, min_time_s=args.min_time,
                   onnxruntime_threads=args.threads or os.cpu_count(), rows=_jsonable(rows))
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        _progress(f"wrote {args.json}")
    return 1 if any(r.get("error") for r in rows) else 0


def cmd_warmup(args) -> int:
    import offload
    _check_model(args.model)
    devices = _device_list(args.device, args.precision)
    model = offload.load(args.model, device=devices, precision=args.precision)
    before = {d.spec: dict(getattr(d, "build_stats", {})) for d in model.devices}
    took = model.warmup()
    for d in model.devices:
        stats, old = getattr(d, "build_stats", None), before[d.spec]
        if stats is None:
            built = "nothing to compile"
        else:
            built = f"{stats['compiled'] - old.get('compiled', 0)} programs compiled"
            if "from_disk" in stats:
                built += f", {stats['from_disk'] - old.get('from_disk', 0)} from the disk cache"
        print(f"{d.spec}: plan for batch 1 built and run once in {took[d.spec]:.2f} s ({built})")
    return 0


def cmd_demo(args) -> int:
    from . import demo, zoo
    names = list(zoo.NAMES)
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in names if n not in zoo.NAMES]
        if unknown:
            raise CommandError(f"unknown zoo model(s) {unknown}; choose from {list(zoo.NAMES)}")
    return demo.run(names, full=args.full, quick=args.quick,
                    plot_path=False if args.no_plot else args.plot, tolerance=args.tolerance)


# -- parser --------------------------------------------------------------------------------------
def _precision_option(p) -> None:
    p.add_argument("--precision", "-p", default=None, metavar="P",
                   help="float32 (default), float16, bfloat16, tf32, or a fixed-point type such "
                        "as 'ap_fixed<16,6>' (needed by xrt-emu:0 and xrt:N)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offload", description="Run ONNX models on the devices offload knows.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"offload {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("devices", help="list every device, available or not (with the reason)")
    p.add_argument("--require", action="append", metavar="SPEC",
                   help="exit 1 (naming the reason) unless SPEC is available; repeatable")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("run", help="run a model on .npy inputs")
    p.add_argument("model", metavar="MODEL", help="an .onnx file (or a zoo name)")
    p.add_argument("--input", "-i", action="append", metavar="X.npy",
                   help="an input array (.npy, read without pickle); repeat for several inputs, "
                        "in the model's input order (a zoo model without it: its sample input)")
    p.add_argument("--device", "-d", default="cpu", help="device spec (default: cpu)")
    _precision_option(p)
    p.add_argument("--output", "-o", action="append", default=[], metavar="Y.npy",
                   help="where to save the output; with several outputs, give it once "
                        "(y.npy -> y_0.npy, y_1.npy, ...) or once per output. Without it, "
                        "the shape and first values are printed")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="time a model beside onnxruntime")
    p.add_argument("model", metavar="MODEL", help="an .onnx file or a zoo name")
    p.add_argument("--device", "-d", action="append", metavar="D",
                   help="device spec(s), comma separated or repeated (default: cpu)")
    p.add_argument("--batch", "-b", type=_batches, default=[1], metavar="B[,B...]",
                   help="batch sizes, comma separated (default: 1)")
    _precision_option(p)
    p.add_argument("--repeats", type=_positive_int, default=5,
                   help="timing blocks per contender, alternated (default: 5)")
    p.add_argument("--min-time", type=_seconds, default=1.0, metavar="S",
                   help="seconds of timing per contender and point (default: 1.0)")
    p.add_argument("--warmup", type=_positive_int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--onnxruntime", action=argparse.BooleanOptionalAction, default=True,
                   help="time onnxruntime (CPUExecutionProvider) alongside (default: yes)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="onnxruntime intra-op threads (default: os.cpu_count())")
    p.add_argument("--profile", action="store_true", help="print the per-op profile after")
    p.add_argument("--profile-runs", type=_positive_int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--clients", type=_clients, metavar="C[,C...]",
                   help="instead: throughput and latency against concurrent callers, with and "
                   "without batching (requests of --batch rows, --min-time s per point)")
    p.add_argument("--max-batch", type=_positive_int, default=64, help="with --clients")
    p.add_argument("--max-delay-us", type=_positive_float, default=500.0, help="with --clients")
    p.add_argument("--plot", metavar="PNG", help="with --clients: write a plot (matplotlib)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("warmup", help="build every kernel a model needs on a device ahead of "
                       "time (OpenCL keeps them in its disk cache)")
    p.add_argument("model", metavar="MODEL", help="an .onnx file or a zoo name")
    p.add_argument("--device", "-d", action="append", metavar="D",
                   help="device spec(s), comma separated or repeated (default: cpu)")
    _precision_option(p)
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("demo", help="build the zoo and run every model on every device beside "
                       "onnxruntime: a table and a plot (about a minute; --full: the long sweep)")
    p.add_argument("--full", action="store_true",
                   help="the long sweep: more batch sizes (ResNet-50 up to 32), longer timing")
    p.add_argument("--quick", action="store_true", help="the shortest timings (a smoke test)")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="where to write the plot (default: ./offload-demo.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    p.add_argument("--models", help=argparse.SUPPRESS)  # e.g. jet_mlp,hcal_mlp (tests)
    p.add_argument("--tolerance", type=_positive_float, default=1e-3, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)

    from . import triton  # repo, serve, server-env (SONIC mode)
    triton.add_commands(sub, _positive_int, _positive_float)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``offload`` console script; returns the exit status."""
    from .errors import OffloadError
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    args.argv = argv
    try:
        return args.func(args)
    except (OffloadError, CommandError, OSError) as e:
        _err(_one_line(e))
        return EXIT_ERROR
    except MemoryError as e:  # e.g. an input generated for a huge --batch
        _err(f"out of memory: {_one_line(e)}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
