"""``offload demo``: the zoo models on every available device beside onnxruntime.

The default run is sized to finish in well under two minutes on a 2-core machine (one ResNet-50
point, a batch sweep of the small HEP models, short alternating timing blocks); ``--full`` runs
the long sweep. It shows a live status line while it runs (on a terminal; one line per step
otherwise), then prints the comparison table and writes a PNG of latency and throughput against
batch size per device.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import threading
import time

from . import bench

# Batch sizes per zoo model: the default run, and the long sweep of --full.
BATCHES = {"resnet50": (1,), "jet_mlp": (1, 64, 1024, 16000), "hcal_mlp": (1, 64, 1024, 16000),
           "jet_cnn": (1, 16, 128)}
FULL_BATCHES = {"resnet50": (1, 8, 32), "jet_mlp": (1, 16, 64, 256, 1024, 4096, 16000),
                "hcal_mlp": (1, 16, 64, 256, 1024, 4096, 16000),
                "jet_cnn": (1, 4, 16, 64, 256, 1024)}
# (repeats, seconds of timed calls per contender and point)
TIMING = {"default": (3, 0.15), "full": (5, 0.4)}

# For context only, not measured here: the 2019 figures for ResNet-50 on a GPU in CMS software
# that the project's brief quotes (issue 4: "batch 1: 7 ms and 143 img/s; batch 32: 667 img/s").
# The brief cites no such figures for jet_mlp, hcal_mlp or jet_cnn, so they have none.
CONTEXT_2019 = {("resnet50", 1): "7 ms, 143/s", ("resnet50", 32): "667/s"}
CONTEXT_2019_POINTS = {"resnet50": [(1, 7.0, 143.0), (32, None, 667.0)]}  # batch, ms, samples/s
CONTEXT_NOTE = ("2019 column: ResNet-50 on a GPU in CMS software, as the project's brief quotes "
                "it (batch 1: 7 ms, 143 img/s; batch 32: 667 img/s); for context, not measured "
                "here. No 2019 figures are cited for the HEP models.")


class Progress:
    """A status line on stderr: on a terminal it is rewritten in place with a running clock and
    each step's last line is kept when the next step begins; elsewhere one line per message."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.since = time.perf_counter()
        self.text = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = None
        if self.tty:
            self._ticker = threading.Thread(target=self._tick, daemon=True,
                                            name="offload-demo-progress")
            self._ticker.start()

    def _line(self) -> str:
        now = time.perf_counter()
        line = f"{now - self.start:5.0f} s  {self.text}"
        if now - self.since >= 1.0:
            line += f"  ({now - self.since:.0f} s)"
        width = shutil.get_terminal_size((100, 20)).columns - 1
        return line[:width]

    def _tick(self):
        while not self._stop.wait(0.5):
            with self._lock:
                if self.text:
                    self.stream.write("\r\x1b[K" + self._line())
                    self.stream.flush()

    def __call__(self, text: str) -> None:
        """A new status. Messages of one step share the prefix before ': '."""
        with self._lock:
            if not self.tty:
                self.stream.write(f"{time.perf_counter() - self.start:5.0f} s  {text}\n")
            else:
                if self.text and self.text.split(": ")[0] != text.split(": ")[0]:
                    self.stream.write("\r\x1b[K" + self._line() + "\n")
                self.text, self.since = text, time.perf_counter()
                self.stream.write("\r\x1b[K" + self._line())
            self.stream.flush()

    def note(self, text: str) -> None:
        """A line printed above the status line (log messages)."""
        with self._lock:
            self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
            if self.tty and self.text:
                self.stream.write(self._line())
            self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            if self.tty and self.text:
                self.stream.write("\r\x1b[K" + self._line() + "\n")
            self.text = ""
            self.stream.flush()


class _ToProgress(logging.Handler):
    def __init__(self, progress: Progress):
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record):
        self.progress.note(f"note: {record.getMessage()}")


def latency(ms) -> str:
    """'4.1 µs', '12.3 ms', '1.46 s'."""
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    if ms < 1:
        return f"{ms * 1e3:.3g} µs"
    if ms < 1000:
        return f"{ms:.3g} ms"
    return f"{ms / 1e3:.3g} s"


COLUMNS = [("model", "model"), ("batch", "batch"), ("device", "device"),
           ("latency", "latency"), ("samples_per_s", "samples/s", bench.rate),
           ("vs_ort", "vs onnxruntime"), ("max_abs_diff", "max abs diff", ".1e"),
           ("context", "2019 (context)")]


def table_rows(rows: list[dict]) -> list[dict]:
    """One line per (model, batch, device), then one for onnxruntime, from run_suite rows."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["batch"]), []).append(row)
    for (model, batch), group in groups.items():
        context = CONTEXT_2019.get((model, batch))
        lines = []
        for row in group:
            if row.get("error"):
                lines.append(dict(model=model, batch=batch, device=row["device"],
                                  latency="error (below)"))
                continue
            ratio = row.get("ratio")
            lines.append(dict(model=model, batch=batch, device=row["device"],
                              latency=latency(row.get("median_ms")),
                              samples_per_s=row.get("samples_per_s"),
                              vs_ort=f"{ratio:.2f}x" if ratio else None,
                              max_abs_diff=row.get("max_abs_diff")))
        ort = next((r for r in group if r.get("ort_median_ms") is not None), None)
        if ort is not None:
            lines.append(dict(model=model, batch=batch, device="onnxruntime",
                              latency=latency(ort["ort_median_ms"]),
                              samples_per_s=ort.get("ort_samples_per_s"), vs_ort="1"))
        if lines and context:
            lines[0]["context"] = context
        out.extend(lines)
    return out


def plot(rows: list[dict], path, title: str) -> str | None:
    """Latency and throughput against batch size, one panel per model and one line per device
    (and onnxruntime), as a PNG; returns why not when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install 'offload[bench]')"
    models = list(dict.fromkeys(r["model"] for r in rows))
    series: dict[str, dict[str, list]] = {m: {} for m in models}
    for r in rows:
        if r.get("median_ms") is not None:
            series[r["model"]].setdefault(f"offload {r['device']}", []).append(
                (r["batch"], r["median_ms"], r["samples_per_s"]))
    for m in models:
        seen = set()
        for r in rows:
            if r["model"] == m and r.get("ort_median_ms") is not None and r["batch"] not in seen:
                seen.add(r["batch"])
                series[m].setdefault("onnxruntime", []).append(
                    (r["batch"], r["ort_median_ms"], r["ort_samples_per_s"]))
    names = sorted({n for s in series.values() for n in s}, key=lambda n: (n == "onnxruntime", n))
    colors = {n: f"C{k}" for k, n in enumerate(names)}
    fig, axes = plt.subplots(2, len(models), figsize=(3.6 * len(models), 6.4), squeeze=False)
    for col, m in enumerate(models):
        top, bottom = axes[0][col], axes[1][col]
        for name in names:
            points = sorted(series[m].get(name, []))
            if not points:
                continue
            b, ms, rate = zip(*points)
            style = dict(color=colors[name], marker="o", ls="--" if name == "onnxruntime" else "-")
            top.plot(b, ms, label=name, **style)
            bottom.plot(b, rate, label=name, **style)
        for b, ms, rate in CONTEXT_2019_POINTS.get(m, []):
            style = dict(color="gray", marker="*", ms=11, ls="none", label="2019 GPU (context)")
            if ms is not None:
                top.plot([b], [ms], **style)
            bottom.plot([b], [rate], **style)
        top.set(title=m, xscale="log", yscale="log", ylabel="latency per call (ms)" if col == 0
                else None)
        bottom.set(xscale="log", yscale="log", xlabel="batch size",
                   ylabel="throughput (samples/s)" if col == 0 else None)
        ticks = sorted({b for points in series[m].values() for b, _, _ in points})
        for ax in (top, bottom):
            ax.grid(True, which="major", alpha=0.3)
            ax.set_xticks(ticks, [str(b) for b in ticks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if len(ticks) == 1:
                ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in list(axes[0][1:]) + list(axes[1]):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        return f"cannot write {path}: {e.strerror or e}"
    finally:
        plt.close(fig)
    return None


def run(names: list[str], full: bool = False, quick: bool = False, plot_path=None,
        tolerance: float = 1e-3, out=None) -> int:
    """The demo; returns the exit status (1 when a device fails or disagrees with onnxruntime).
    ``plot_path``: where to write the PNG (None: ./offload-demo.png; False: no plot)."""
    out = out or sys.stdout
    say = Progress()
    handler = _ToProgress(say)
    logger = logging.getLogger("offload")
    logger.addHandler(handler)
    try:
        return _run(names, full, quick, plot_path, tolerance, out, say)
    finally:
        say.close()
        logger.removeHandler(handler)


def _run(names, full, quick, plot_path, tolerance, out, say) -> int:
    import offload
    from . import zoo
    t_start = time.perf_counter()
    mode = "full" if full else "default"
    repeats, min_time = TIMING[mode]
    if quick:
        mode, repeats, min_time = "quick", 2, 0.05

    def show(text=""):
        with say._lock:  # never print in the middle of the status line
            if say.tty and say.text:
                say.stream.write("\r\x1b[K")
                say.stream.flush()
            print(text, file=out, flush=True)
            if say.tty and say.text:
                say.stream.write(say._line())
                say.stream.flush()

    infos = offload.devices(refresh=True)
    show("Devices:")
    for info in infos:
        state = "available" if info.available else f"unavailable: {info.reason}"
        show(f"  {info.spec:<10} {info.name or '-'}  ({state})")
    specs = [i.spec for i in infos if i.available]
    fixed_only = [s for s in specs if "float32" not in offload.device(s).capabilities.precisions]
    if fixed_only:  # the demo runs the float32 models (FPGA devices: benchmarks/bench_fpga.py)
        show(f"  (the float32 demo skips {', '.join(fixed_only)}: fixed point only; see "
             "`offload bench jet_mlp --device xrt-emu:0 --precision 'ap_fixed<16,6>'`)")
        specs = [s for s in specs if s not in fixed_only]

    t0 = time.perf_counter()
    for name in names:
        say(f"building zoo model {name}")
        zoo.path(name)
    t_build = time.perf_counter() - t0

    ort_reason = bench.onnxruntime_missing_reason()
    if ort_reason:
        show(f"onnxruntime: not compared, {ort_reason}")
    batches = FULL_BATCHES if mode == "full" else BATCHES
    cases = [bench.Case(name, b) for name in names for b in batches[name]
             if not (quick and b > 1024)]
    t0 = time.perf_counter()
    rows = bench.run_suite(cases, specs, repeats=repeats, min_time_s=min_time, warmup=1,
                           onnxruntime=not ort_reason, progress=say, pause_s=0.05)
    t_suite = time.perf_counter() - t0

    path = None
    reason = None
    if plot_path is not False:
        say("writing the plot")
        path = os.path.abspath(plot_path or "offload-demo.png")
        reason = plot(rows, path, f"offload demo ({mode}): median latency and throughput per "
                      f"call, {bench.machine_info().get('cpu', '')}")
    say.close()

    show()
    for name in names:
        show(f"- {zoo.describe(name)}")
    show()
    show(bench.format_table(table_rows(rows), COLUMNS))
    notes = [f"- {r['model']} b{r['batch']} {r['device']}: {r['error']}" for r in rows
             if r.get("error")]
    notes += [f"- {r['model']} b{r['batch']}: onnxruntime: {r['ort_error']}" for r in rows
              if r.get("ort_error")]
    if notes:
        show("\n" + "\n".join(dict.fromkeys(notes)))
    show()
    show(f"Latency: median per call over {repeats} alternating timing blocks per contender "
         f"(~{min_time / repeats:.2g} s each, at least one call), after one checked warmup call "
         "and a calibration; samples/s = batch / latency. onnxruntime: CPUExecutionProvider, "
         f"{os.cpu_count()} threads.")
    show(CONTEXT_NOTE)
    busy = [r["other_cores"] for r in rows if r.get("other_cores") is not None]
    if busy and sum(busy) / len(busy) > 0.25:
        show(f"Note: other processes kept {sum(busy) / len(busy):.1f} of {os.cpu_count()} cores "
             "busy on average while timing: these figures are noisy (rerun on a quiet machine).")
    total = time.perf_counter() - t_start
    show(f"Wall time {total:.0f} s: building models {t_build:.1f} s, loading, checking and "
         f"timing {t_suite:.0f} s." + ("" if full else " The long sweep: offload demo --full."))
    if path:
        show(f"plot: {reason}" if reason else f"Plot: {path}")
    bad = [r for r in rows if r.get("max_abs_diff") is not None and
           not r["max_abs_diff"] <= tolerance]
    for r in bad:
        show(f"WARNING: {r['model']} b{r['batch']} on {r['device']}: output differs from "
             f"onnxruntime by {r['max_abs_diff']:.3g} (> {tolerance:g})")
    return 1 if bad or any(r.get("error") for r in rows) else 0
