"""The ONNX pattern models of the coverage benchmark (tests/onnx_builders.PATTERNS): bnfold folds exactly
the BN nodes each must fold, to the same outputs in onnxruntime, and keeps the others."""

from __future__ import annotations

import numpy as np
import pytest

from tests.onnx_builders import PATTERNS, fold_checked
from tests.zoo import onnx_bn_nodes


@pytest.mark.parametrize("pattern", PATTERNS, ids=[p.name for p in PATTERNS])
def test_pattern_folds_what_it_must_and_keeps_the_rest(pattern):
    model = pattern.build(np.random.default_rng(0))
    folded, plan = fold_checked(model, check=False)
    assert sum(d.status.value == "foldable" for d in plan.decisions) == pattern.foldable
    assert len(onnx_bn_nodes(folded)) == len(onnx_bn_nodes(model)) - pattern.foldable


def test_coverage_benchmark_counts_a_fold_and_a_kept_bn(tmp_path):
    """benchmarks/coverage.py on two patterns: BN left and errors per tool, and the subsection it renders."""
    pytest.importorskip("onnxoptimizer")
    pytest.importorskip("onnxslim")
    from benchmarks import coverage

    chosen = {p.name: p for p in PATTERNS if p.name in ("concat-of-convs", "keep-training-mode")}
    cases = {name: coverage.pattern_case(pattern, tmp_path) for name, pattern in chosen.items()}
    assert cases["concat-of-convs"]["bnfold"]["left"] == 0 and cases["concat-of-convs"]["bnfold"]["error"] < 1e-5
    assert all(cases["keep-training-mode"][tool]["left"] == 1 for tool in coverage.ONNX_TOOLS)
    results = {"zoo": {}, "onnx_patterns": cases}
    assert coverage.summary(results)["onnx_patterns"]["bnfold"]["folded"] == 1
    text = "\n".join(coverage.subsections(results))
    assert "bnfold folds 1 of 1 exactly-foldable BN" in text and "| `concat-of-convs`:" in text
