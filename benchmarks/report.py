"""BENCHMARKS.md from the results of `run_all.py`: headline, targets, method, machine, every section."""

from __future__ import annotations

import statistics

from benchmarks import coverage, distributed_scaling, latency, memory, numerics, onnx_fold, recalibration, startup
from benchmarks.common import table

LIMIT_TARGET = 1.03  # folded within 3% of the BN-deleted limit (eager PyTorch)
NOISE = 0.02  # a median ratio within 2% of 1 is not called slower: the spread of equal models is wider
MEMORY_TARGET = 2.0  # SECURITY.md: peak memory about twice the weights (plus one batch)
ABOUT = 1.15  # "about" a target: within 15% of it


def _median(values) -> float:
    return statistics.median(list(values))


def verdicts(results: dict) -> list[tuple[str, bool, str]]:
    """(target, holds, evidence) for every target of the issue that the results cover."""
    rows = []
    if "coverage" in results:
        behind = coverage.summary(results["coverage"])["bnfold_behind"]
        rows.append(("coverage at least every anchor's, on every model", not behind,
                     "bnfold leaves fewer or as many BN (counting wrong outputs as no fold) on every zoo model "
                     "(PyTorch and ONNX) and every hand-built ONNX pattern" if not behind
                     else f"bnfold leaves more BN on: {', '.join(behind)}"))
    if "latency" in results:
        configs = list(latency.configurations(results["latency"]))
        over = [f"{name} batch {batch} ({s['folded/deleted']['median']:.3f})" for name, runtime, batch, s in configs
                if runtime == "PyTorch eager" and s["folded/deleted"]["median"] > LIMIT_TARGET]
        rows.append(("folded within 3% of the BN-deleted limit, eager PyTorch, every architecture", not over,
                     "all within 3%" if not over else "over on " + "; ".join(over)))
        slower = [f"{name}, {runtime}, batch {batch} ({s['folded/original']['median']:.3f})"
                  for name, runtime, batch, s in configs if s["folded/original"]["median"] > 1 + NOISE]
        rows.append((f"folded never slower than the original in any runtime (median ratio ≤ {1 + NOISE:.2f})",
                     not slower, "never slower" if not slower else "slower on " + "; ".join(slower)))
    if "numerics" in results:
        failing = [name for name, r in results["numerics"].items() if not numerics.target_holds(r)]
        rows.append(("fold error no larger than the unfolded model's own error against float64", not failing,
                     "holds in every case" if not failing else "exceeded in: " + ", ".join(failing)))
    if "recalibration" in results:
        rec = results["recalibration"]
        low, whole = (recalibration.below_target(rec, ratio) for ratio in ("steady_vs_inference", "vs_inference"))
        rows.append((f"fast recalibration ≥ {recalibration.TARGET} of inference throughput (the steady state's samples "
                     "per second, section 4)", not low,
                     ("holds on every model" if not low else "below on " + "; ".join(low))
                     + (f"; whole calls of {next(iter(rec.values()))['samples']:,} samples, fixed costs included, "
                        "below on " + "; ".join(whole) if whole else "; also in whole calls")))
    if "memory" in results:
        largest, steepest = _memory_extremes(results["memory"])
        rows.append((f"peak memory about {MEMORY_TARGET:.0f}x the weights (SECURITY.md)",
                     max(largest["fold_over_weights"], steepest) <= MEMORY_TARGET * ABOUT,
                     f"ONNX: at {largest['weights_mb']:.0f} MB of weights the verified fold peaks at "
                     f"{largest['fold_over_weights']:.2f}x the weights over the baseline; each further MB costs at "
                     f"most {steepest:.2f} MB (section 8)"))
    return rows


def _memory_extremes(result: dict) -> tuple[dict, float]:
    """The largest ONNX model measured, and the steepest growth of any command's peak with the weights."""
    sizes = result["sizes"]
    slopes = memory.growth(sizes[0], sizes[-1]) if len(sizes) > 1 else {}
    return sizes[-1], max(slopes.values(), default=sizes[-1]["fold_over_weights"])


def headline(results: dict) -> list[str]:
    """The figures the README quotes."""
    lines = []
    if "coverage" in results:
        totals = coverage.summary(results["coverage"])
        t, o = totals["torch"], totals["onnx"]
        lines.append(
            f"**Coverage** ({t['models']} zoo architectures): PyTorch, bnfold folds {t['bnfold']['folded']} of "
            f"{t['exact']} exactly-foldable BN, `torch.fx` fuse {t['fx.fuse']['folded']} "
            f"(fails to trace {len(t['fx.fuse']['failed'])} models, wrong output on {len(t['fx.fuse']['wrong'])}); "
            f"ONNX, bnfold {o['bnfold']['folded']} of {o['exact']}, onnxruntime basic {o['ORT basic']['folded']}, "
            f"onnxoptimizer {o['onnxoptimizer']['folded']}, onnxslim {o['onnxslim']['folded']} "
            f"(wrong output on {len(o['onnxslim']['wrong'])}).")
    if "latency" in results:
        configs = list(latency.configurations(results["latency"]))

        def med(runtime: str, key: str) -> float:
            return _median(s[key]["median"] for _, r, _, s in configs if r == runtime)

        lines.append(
            f"**CPU latency** (median over {len(results['latency'])} architectures and batch 1/8, folded / original): "
            f"PyTorch eager {med('PyTorch eager', 'folded/original'):.2f}× (BN-deleted limit "
            f"{med('PyTorch eager', 'deleted/original'):.2f}×), onnxruntime without graph optimizations "
            f"{med('optimizations off', 'folded/original'):.2f}×, with all optimizations "
            f"{med('all optimizations', 'folded/original'):.2f}× (onnxruntime fuses Conv+BN itself).")
    if "numerics" in results:
        worst_ours = max(max(r["bnfold"]["weight_ulps"], r["bnfold"]["bias_ulps"]) for r in results["numerics"].values())
        worst_theirs = max(max(r["torch"]["weight_ulps"], r["torch"]["bias_ulps"])
                           for r in results["numerics"].values() if "failed" not in r["torch"])
        lines.append(f"**Fold numerics**: bnfold's folded weights and biases are within {worst_ours:.2f} ulp of the exact "
                     f"fold (float64, rounded once) in float32 and float16; `torch.nn.utils.fusion` is off by up to "
                     f"{worst_theirs:.0f} ulp and fails on grouped ConvTranspose.")
    if "recalibration" in results:
        rec = results["recalibration"]
        lines.append(
            "**Recalibration** throughput relative to plain inference, whole calls on "
            f"{next(iter(rec.values()))['samples']:,} samples: fast "
            + ", ".join(f"{r['fast']['vs_inference']:.2f}×" for r in rec.values())
            + " (steady state "
            + ", ".join(f"{r['fast']['steady_vs_inference']:.2f}×" for r in rec.values())
            + "); exact "
            + ", ".join(f"{r['exact']['vs_inference']:.2f}×" for r in rec.values())
            + f" (models: {', '.join(rec)}).")
    if "startup" in results:
        ms = {name: r["median_s"] * 1e3 for name, r in results["startup"].items()}
        lines.append(f"**Start-up**: `bnfold --help` {ms['bnfold --help']:.0f} ms, `bnfold inspect cnn.onnx` "
                     f"{ms['bnfold inspect cnn.onnx']:.0f} ms, against {ms[startup.BASELINE]:.0f} ms for "
                     f"`import onnx` (and {ms[startup.TORCH]:.0f} ms for `import torch`).")
    return lines


def _machine(m: dict) -> str:
    load = f"load average {m['load_before'][0]:.1f} before, {m['load_after'][0]:.1f} after"
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB, {m['os']}; Python {m['python']}, torch "
            f"{m['torch']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']}, onnxoptimizer {m['onnxoptimizer']}, "
            f"onnxslim {m['onnxslim']}; bnfold at {m['bnfold_commit']}; {m['threads']} intra-op thread(s); "
            f"{m['date']}; {load} (the machine is shared).")


METHOD = """\
- **Interleaved, medians, spreads.** Every comparison runs its variants in the same rounds
  (`bnfold.benchmark.time_interleaved`: A B C, C B A, A B C, ...), after warm-up calls; a sample repeats a
  call until it lasts at least 20 ms. A ratio is computed per round, so a slow moment of the shared
  machine hits both sides, and reported as the median with the min–max over rounds.
- **One intra-op thread** (`--threads`) for PyTorch and for onnxruntime sessions the benchmarks create: on
  a shared 2-core machine the spin-waits of multi-threaded kernels turn a neighbour's load into 100×
  outliers. One thread measures the model, not the neighbours; the ratios are what matters.
- **Models** are the repository's own (`tests/zoo.py`, {zoo} architectures with hand-derived fold ground
  truth, and the ResNet-50 layout of `benchmarks/onnx_fold.py`) with randomized BN statistics, so
  everything runs offline. The zoo models are small (a few thousand to a few hundred thousand parameters);
  latency runs them at 64×64 instead of their test resolution so that arithmetic, not Python dispatch,
  dominates, and adds ResNet-50 at 224×224 as a realistic model (7 rounds instead of 21).
- **"BN deleted"** replaces every BN layer that folds exactly (the zoo's ground truth) by an identity (a
  BN subclass keeps the activation it applies) and keeps the others: it computes something else, and no
  exact fold computes less. The layers no exact fold removes stay in both models; what they cost is
  shown separately (section 2).
- **Output errors** are max |a − b| / max |a| against the original float32 model on random inputs
  (onnxruntime with optimizations off for ONNX), and a fold with error above 1e-4 counts as wrong.
"""


def render(results: dict) -> str:
    parts = ["# Benchmarks", "",
             "Regenerate everything with `make bench` (or `.venv/bin/python benchmarks/run_all.py` after "
             "`pip install -e '.[dev,bench]'`); the raw numbers are in `benchmarks/results.json`. "
             f"This run took {sum(results['seconds'].values()) / 60:.1f} minutes"
             + (" in `--quick` mode (few models, few repetitions: not for publishing)." if results.get("quick")
                else "."), ""]
    parts += ["## Headline", "", *(f"- {line}" for line in headline(results)), ""]
    rows = [[target, "yes" if holds else "**no**", evidence] for target, holds, evidence in verdicts(results)]
    parts += ["## Targets", "", table(["target", "holds", "evidence"], rows), "", *_resolution(results),
              *_why_not(results), "## Machine and method", "", _machine(results["machine"]), "",
              METHOD.format(zoo=len(coverage.ZOO))]
    sections = [("coverage", "1. Fold coverage", coverage), ("latency", "2. CPU latency", latency),
                ("numerics", "3. Fold numerics", numerics), ("recalibration", "4. Recalibration", recalibration),
                ("startup", "5. CLI start-up", startup), ("onnx_fold", "6. ONNX fold time: ResNet-50", onnx_fold),
                ("distributed", "7. Recalibration across processes", distributed_scaling),
                ("memory", "8. Peak memory: inspect and fold of a large model", memory)]
    for key, title, module in sections:
        if key in results:
            parts += [f"## {title}", "", (module.__doc__ or "").strip(), "", module.markdown(results[key]), "",
                      *NOTES.get(key, []), *getattr(module, "subsections", lambda _: [])(results[key])]
    return "\n".join(parts).rstrip() + "\n"


def _why_not(results: dict) -> list[str]:
    """Plain words on every target that does not hold, and why, worked out from the results."""
    lines = []
    if "latency" in results:
        band = noise(results["latency"])["p90"]
        for name, runtime, batch, s in latency.configurations(results["latency"]):
            limit, original = s["folded/deleted"], s["folded/original"]
            if runtime == "PyTorch eager" and limit["median"] > LIMIT_TARGET:
                lines.append(f"- {name}, batch {batch}: folded {_ratio(limit)} × the BN-deleted model. "
                             + _limit_reason(s, band))
            if original["median"] > 1 + NOISE:
                lines.append(f"- {name}, {runtime}, batch {batch}: folded {_ratio(original)} × the original. "
                             + _slower_reason(runtime, s, band))
    if "recalibration" in results and recalibration.below_target(results["recalibration"], "vs_inference"):
        lines.append(_recalibration_reasons(results["recalibration"]))
    if "memory" in results:
        largest, steepest = _memory_extremes(results["memory"])
        if max(largest["fold_over_weights"], steepest) > MEMORY_TARGET * ABOUT:
            lines.append("- Peak memory above about 2x the weights: section 8 says which step holds which copy.")
    return (["Where a target does not hold, and why:", "", *lines, ""]) if lines else []


def _recalibration_reasons(results: dict) -> str:
    """Why fast recalibration falls short of the target where it does, with this run's fixed costs."""
    short = {name: r for name, r in results.items() if r["fast"]["vs_inference"] < recalibration.TARGET}
    costs = "; ".join(f"{name}: {r['fast']['fixed_s'] * 1e3:.0f} ms against "
                      f"{r['samples'] / r['inference']['steady_samples_per_s'] * 1e3:.0f} ms of inference"
                      for name, r in short.items())
    return ("- Fast recalibration below 0.85× of inference in whole calls, or in the steady state: the fast "
            "method normalizes each BN by its batch, so every BN input is read once more for its statistics "
            "before it is normalized, and models whose memory traffic is mostly BN inputs (depthwise convs "
            "cost little) pay most. PyTorch on the CPU reads them with bnfold's moments kernel "
            "(bnfold/_moments.c: each sample's sums in float64, the normalized values in the same call; "
            "torch's own passes where it is not built); onnxruntime with BatchNormalization in training mode, "
            "the cheapest of its CPU kernels for batch statistics (ReduceSumSquare and LayerNormalization "
            "cost more), whose batch means also give the standard errors. A whole call also pays fixed costs "
            "(copying and instrumenting the model, a fresh onnxruntime session, merging and storing the "
            f"statistics), which a call over {next(iter(results.values()))['samples']:,} samples of a small "
            f"model does not amortize; this run, beyond the steady state: {costs}. Exact recalibration needs "
            "one pass per dependency level, each stopping after its last layer, so its ratio is about the "
            "fast ratio divided by the levels' average share of the model.")


def _resolution(results: dict) -> list[str]:
    if "latency" not in results:
        return []
    band = noise(results["latency"])
    return [f"Resolution: the original timed against an identical copy of itself in the same rounds (A/A) "
            f"comes out typically {band['median']:.1%} from 1, in 90% of configurations within {band['p90']:.1%}, "
            f"at worst {band['max']:.1%} (median per configuration). A latency ratio within its own "
            "configuration's A/A deviation, or within the 90% band, is called noise below.", ""]


def _ratio(value: dict) -> str:
    return f"{value['median']:.3f} (rounds {value['min']:.2f}–{value['max']:.2f})"


def noise(results: dict) -> dict[str, float]:
    """How far from 1 the A/A controls (the original against an identical copy) got in this run: the
    median, the 90th percentile and the worst over configurations."""
    deviations = sorted(abs(s["A/A"]["median"] - 1) for *_, s in latency.configurations(results))
    return {"median": statistics.median(deviations), "p90": deviations[int(0.9 * (len(deviations) - 1))],
            "max": deviations[-1]}


def _within_noise(value: dict, summary: dict, band: float) -> bool:
    """A ratio no further from 1 than this configuration's own A/A control, or than most A/A controls."""
    return abs(value["median"] - 1) <= max(abs(summary["A/A"]["median"] - 1), band)


def _aa(summary: dict) -> str:
    return f"this configuration's A/A control: {summary['A/A']['median']:.3f}"


def _limit_reason(summary: dict, band: float) -> str:
    hand = summary.get("hand-folded/deleted")
    if _within_noise(summary["folded/deleted"], summary, band):
        return f"Within the noise of this run ({_aa(summary)})."
    if hand is not None and hand["median"] > LIMIT_TARGET:
        return (f"The fold's own arithmetic costs it: the BN-deleted model holding the folded weights and biases, "
                f"run by the model's own code, is {_ratio(hand)} × the BN-deleted model. Every fold leaves the "
                "BN's shift as a conv bias, which the BN-deleted model does not add; on convs that had none, "
                "PyTorch's CPU convolution takes microseconds longer per call at batch 1.")
    return f"Beyond the noise of this run ({_aa(summary)}); not explained."


def _slower_reason(runtime: str, summary: dict, band: float) -> str:
    if runtime == "all optimizations":
        return ("At this level onnxruntime fuses Conv+BN itself, so both models run the same fused graph and "
                f"the difference can only be noise ({_aa(summary)}).")
    if _within_noise(summary["folded/original"], summary, band):
        return f"Within the noise of this run ({_aa(summary)})."
    return f"Beyond the noise of this run ({_aa(summary)}); not explained."


NOTES = {
    "coverage": [
        "What it means: on the zoo's ONNX exports, bnfold and onnxruntime's basic level fold the same layers "
        "(the hand-built patterns below are where they differ); bnfold writes "
        "the result as a file you can ship and inspect, and proves it on every run. onnxoptimizer writes "
        "each fold as a run-time subgraph (the node counts in `results.json` grow instead of shrinking). In "
        "PyTorch, `torch.fx`'s fuse needs a symbolic trace (models with Python control flow on sizes fail "
        "whole), matches only module pairs (no BN subclasses with activations, no `F.batch_norm`, no "
        "look-alikes, no fold forward) and folds a conv shared by two BN layers once for both (wrong output).",
        ""],
    "latency": [
        "What it means: the BN-deleted model deletes only the BN layers that fold exactly, so it computes the "
        "folded model's arithmetic minus each BN's shift, which every fold leaves as a conv bias (PyTorch's CPU "
        "convolution takes microseconds longer per call with a bias at batch 1). \"Hand-folded\" runs the "
        "folded arithmetic in the model's own eager code: its ratio is what the fold itself costs, the rest is "
        "the form of bnfold's output. The folded eager model is "
        "a torch.fx GraphModule whose generated code runs one line per op and reaches every module and tensor "
        "through nested attribute lookups from the root (`getattr(getattr(self.trunk, \"0\").f.a, \"2\")`), "
        "each a Python call. bnfold streamlines it (`bnfold/pytorch/streamline.py`): parameterless modules "
        "(ReLU, SiLU, pooling) become the functions they call, what a folded BN leaves behind (an Identity, a "
        "flatten reshaped back to its source) disappears, and a graph captured with torch.export calls torch's "
        "bindings instead of `torch.ops.aten` objects. Its generated code then spends less Python per op than "
        "the model's own, which is why the folded model is often faster than both. The last column is the "
        "folded model without that step. "
        "Weights are still reached through their module paths, which keeps the original state_dict keys. With "
        "onnxruntime's optimizations off (the level bnfold "
        "verifies at) folding saves the BN kernels too; with all optimizations on, onnxruntime already fuses "
        "Conv+BN when it builds the session, so folding a model that only ever runs there saves session "
        "time, not latency. Session creation is faster for folded models at both levels (fewer nodes, no "
        "fusion work).",
        ""],
    "numerics": [
        "What it means: bnfold computes the fold in float64 and rounds once, so every folded weight is the "
        "correctly rounded value (≤ 0.5 ulp); `torch.nn.utils.fusion` computes in the model's dtype and "
        "loses several ulp on weights and hundreds on biases (where mean and bias cancel). The folded "
        "model's own output error is then no larger than the unfolded model's: with large running means "
        "it is far smaller, because the cancellation happens once, in float64, instead of at every inference.",
        ""],
    "memory": [
        "What it means: on ONNX, each further MB of weights costs every command 2 MB at its peak. inspect "
        "peaks while reading the file (protobuf parses it from a copy of its bytes); planning copies only the "
        "model's structure (large tensors are stand-ins that read the loaded model's data) and holds no copy "
        "of the weights. fold peaks while rewriting: the original weights and the folded ones (protobuf frees "
        "no part of a loaded model, so the original stays whole until it is dropped) plus the arithmetic of "
        "the layer being folded (its weight read out, a float64 copy, the rounded result: about 4 times the "
        "largest folded layer, 9 MB here). Verification runs the original alone first and keeps only its "
        "outputs, then the folded model once the original is dropped, each in an onnxruntime session loaded "
        "from a temporary file (one copy) next to the model in bnfold (one copy). What a command costs "
        "whatever the model (about 25 MB of code and runtime set-up, and the largest layer's arithmetic) is "
        "why the 99 MB model shows 2.5x and the 297 MB one 2.2x. The CLI fixes glibc's mmap threshold "
        "(`bnfold.memory`): by default freed weight-sized blocks stay in the heap, and the 297 MB verified "
        "fold peaked at 2.9x. On PyTorch `.pt2`, each further MB of weights costs inspect 1 MB and fold 2 MB: "
        "`torch.export.load` holds the weights once (and imports about 70 MB of deserializer code and builds "
        "the graph, about 25 MB: the fixed cost behind the 99 MB model's 2.1x and 3.5x); planning folds a "
        "captured module that shares the loaded tensors and leaves a one-element stand-in where each folded "
        "weight goes; fold then computes the folded weights into a new module that shares every other tensor "
        "(the original and the folded weights once each, plus three times the layer being folded), and "
        "re-exporting, running and writing it add no copy. "
        "`tests/test_hardening.py::test_peak_memory_is_about_twice_the_weights` guards the growth.",
        ""],
    "startup": [
        "What it means: `bnfold --help` costs about as much as importing onnx, and inspecting an ONNX model "
        "about twice that (loading onnx and numpy, reading the model); none of it imports torch.",
        ""],
    "distributed": [
        "What it means: two processes on two cores do not halve the time. The cores are shared with whatever "
        "else runs (the load average is above the table), each process also spends time outside the model "
        "(reading and checking batches), and the fixed cost doubles: torchrun's launcher and two interpreters "
        "import torch on the same cores. More processes pay when the work dominates: more data, larger "
        "models, more cores or machines. The statistics are those of one process either way (merged exactly), "
        "so the choice is only about time. Every configuration uses one thread per process, as torchrun sets "
        "it: in a 4,000-sample trial under heavy load (load average 8), one process with two intra-op threads "
        "was 10× slower than with one (likely its two threads waiting for each other on a busy core).",
        ""],
}
